"""grain input pipelines over TFDS ArrayRecord data sources.

A pipeline reads records `{"image": uint8 [H, W, 3], "label": uint8 [H, W]
or [H, W, 1], "image_id": str}` from `tfds.data_source`, optionally swaps the
label for a stored pseudo-label map (joined by `image_id`), applies the
recipe's transforms, batches per process, and hands out global `jax.Array`s
sharded over the mesh. Elements leave the transforms as
`{"image": float32 [h, w, 3] (ImageNet-normalised), "label": int32 [h, w],
"image_id": str, "valid": bool}`; `valid` is False only for padding in
evaluation batches.

A training stream's records are a seeded shuffle of every epoch, or the
released code's class-balanced draws (`PipelineSpec.sampling`,
class_balanced.py); either is a pure function of (seed, stream position).
Randomness comes from grain's per-record generators, seeded by the sampler's
seed and the record's position in the stream. The same seed gives the same
global batches whatever the number of processes (each reads its slice of
one stream: `ProcessSliceSampler`), and a restored iterator state continues
exactly where it stopped. The number of grain worker processes
(`data.worker_count`) changes which records of the stream share a batch
(each worker batches its own records): keep it to reproduce a run.
"""

import dataclasses
import os
from typing import Any, Iterator

from absl import flags
import grain
import jax
import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.data import class_balanced
from spcl_jax.data import class_statistics
from spcl_jax.data import pseudo_labels
from spcl_jax.data import sources
from spcl_jax.data import transforms
from spcl_jax.data import workers
from spcl_jax.infra import console


# `data.color_jitter_order` (PipelineSpec.color_jitter_order).
COLOR_JITTER_ORDERS = ('after_resize', 'before_resize')


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """What one input stream reads and how it transforms it."""
  dataset: str                       # TFDS name, e.g. 'sim2real_demo/default'
  split: str
  data_dir: str
  global_batch_size: int
  num_classes: int = 19
  label_space: str = 'cityscapes19'  # labels.LABEL_SPACES
  size: tuple | None = None          # resize to (height, width) first
  interpolation: str = 'bilinear'    # of every image resize (resize.INTERPOLATIONS)
  resize_label: bool = True          # False: keep labels at full resolution
  color_jitter: tuple | None = None  # (brightness, contrast, saturation, hue)
  color_jitter_implementation: str = 'float'   # a key of transforms.COLOR_JITTERS
  # 'after_resize': jitter the image resized to `size`; 'before_resize':
  # jitter it at its stored resolution, then resize (the released order)
  color_jitter_order: str = 'after_resize'
  scale_range: tuple | None = None   # random scale (low, high)
  crop: tuple | None = None          # random crop (height, width)
  flip: bool = False
  scaled_size_rounding: str = 'round'   # transforms.SCALED_SIZE_ROUNDINGS
  mean: tuple = (0.485, 0.456, 0.406)
  std: tuple = (0.229, 0.224, 0.225)
  pseudo_labels: str | None = None   # pseudo_labels.PseudoLabelStore directory
  shuffle: bool = True
  seed: int = 0
  # Which records a training stream reads: 'uniform' (a seeded shuffle of
  # every epoch) or 'class_balanced' (the released code's rule,
  # class_balanced.py, with these numbers; the split's class statistics
  # are read from its build, computed there first if missing).
  sampling: str = 'uniform'
  sub_epoch_draws: int = 3000
  log_offset: float = 1.01
  worker_count: int = 0
  # Training loaders: threads that read (decode) records, and how many
  # records each stream of each worker reads ahead of its transforms
  # (grain.ReadOptions; grain's own default, 500 records, is ~4 GB at the
  # recipe's sizes). The evaluation passes bound theirs by their batch.
  read_threads: int = 4
  read_ahead: int = 16


def transforms_of(spec: PipelineSpec) -> list:
  ops: list[Any] = [transforms.CheckRecord(spec.num_classes, spec.label_space)]
  if spec.pseudo_labels:
    ops.append(pseudo_labels.AttachPseudoLabels(
        pseudo_labels.PseudoLabelStore(spec.pseudo_labels)))
  resize_and_jitter = [
      spec.size and transforms.Resize(tuple(spec.size), spec.resize_label,
                                      spec.interpolation),
      spec.color_jitter and transforms.ColorJitter(
          *spec.color_jitter, implementation=spec.color_jitter_implementation)]
  if spec.color_jitter_order not in COLOR_JITTER_ORDERS:
    raise ValueError(f'colour jitter order {spec.color_jitter_order!r} is '
                     f'not one of {COLOR_JITTER_ORDERS}')
  if spec.color_jitter_order == 'before_resize':
    resize_and_jitter.reverse()
  ops.extend(op for op in resize_and_jitter if op)
  if spec.scale_range or spec.crop or spec.flip:
    fill = tuple(int(round(255 * m)) for m in spec.mean)
    ops.append(transforms.RandomScaleCropFlip(
        spec.scale_range and tuple(spec.scale_range),
        spec.crop and tuple(spec.crop), spec.flip, fill,
        spec.interpolation, spec.scaled_size_rounding))
  ops.append(transforms.Normalize(tuple(spec.mean), tuple(spec.std)))
  return ops


def _resolve(spec, source, process_index, process_count):
  """Defaults: the spec's data source, this process among all processes."""
  if source is None:
    source = sources.open_source(spec.dataset, spec.split, spec.data_dir)
  return (source,
          jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


SAMPLINGS = ('uniform', 'class_balanced')


def record_sampler(spec: PipelineSpec, source, presence=None):
  """The sampler of one process's whole record stream (positions 0, 1,
  ... of the global stream): `spec.sampling`'s. `presence` (bool
  [records, C], class_statistics): what a class-balanced sampler balances;
  read from the split's statistics when not given."""
  if spec.sampling == 'uniform':
    return grain.samplers.IndexSampler(
        len(source), shard_options=grain.sharding.ShardOptions(
            0, 1, drop_remainder=True),
        shuffle=spec.shuffle, num_epochs=None, seed=spec.seed)
  if spec.sampling != 'class_balanced':
    raise ValueError(f'PipelineSpec.sampling = {spec.sampling!r}, expected '
                     f'one of {SAMPLINGS}')
  if presence is None:
    presence = class_statistics.load_or_compute(
        spec.dataset, spec.split, spec.data_dir, spec.read_threads,
        source=source).for_label_space(spec.label_space)
  return class_balanced.ClassBalancedSampler(
      presence, spec.seed, class_balanced.BalancingRule(
          spec.sub_epoch_draws, spec.log_offset))


def stream_positions(num_batches: int, global_batch_size: int,
                     worker_count: int) -> np.ndarray:
  """int64 [num_batches, global_batch_size]: the stream positions of the
  first `num_batches` global batches of `train_loader` (whatever the
  number of processes; `ProcessSliceSampler`): batch n = k W + w of W
  workers holds w + W (k G + m), m < G."""
  workers = max(worker_count, 1)
  k, w = np.divmod(np.arange(num_batches, dtype=np.int64), workers)
  return w[:, None] + workers * (k[:, None] * global_batch_size
                                 + np.arange(global_batch_size))


def train_loader(spec: PipelineSpec, source=None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.DataLoader:
  """An endless loader of this process's slices of the global batches
  (`ProcessSliceSampler`), shuffled or class-balanced (`spec.sampling`).
  Its worker processes exit when the process that made it dies
  (`workers.Lifeline`); each reads at most `spec.read_ahead` records
  ahead."""
  source, process_index, process_count = _resolve(
      spec, source, process_index, process_count)
  local = spec.global_batch_size // process_count
  if local * process_count != spec.global_batch_size:
    raise ValueError(f'global batch size {spec.global_batch_size} is not '
                     f'divisible by the {process_count} processes')
  one_stream = grain.sharding.ShardOptions(0, 1, drop_remainder=True)
  sampler = ProcessSliceSampler(
      record_sampler(spec, source), local_batch_size=local,
      process_index=process_index, process_count=process_count,
      worker_count=spec.worker_count)
  if spec.worker_count and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside `app.run` (tests,
    # notebooks) the defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(
      data_source=source, sampler=sampler, shard_options=one_stream,
      operations=[workers.Lifeline()] + transforms_of(spec) + [
          grain.transforms.Batch(local, drop_remainder=True)],
      worker_count=spec.worker_count,
      read_options=grain.ReadOptions(num_threads=spec.read_threads,
                                     prefetch_buffer_size=spec.read_ahead))


class ProcessSliceSampler:
  """Process `process_index`'s part of one process's record stream, so that
  the global batches (and every record's random transform) are the same
  whatever the number of processes: a resumed or rescaled run reads what a
  one-process run reads.

  grain's loader asks the sampler for stream positions j = 0, 1, ...; with
  W workers (W = 1 without), worker w = j mod W batches its own positions,
  and the loader hands out worker batches in turn. Position j is element i
  of local batch k of worker w (r = j // W, k, i = divmod(r, L)), i.e. of
  the loader's batch n = k W + w; one process of global batch G = L P
  reads, as element p L + i of its batch n, stream position
  w + W (k G + p L + i). With one process that is j itself."""

  def __init__(self, sampler, *, local_batch_size: int, process_index: int,
               process_count: int, worker_count: int):
    self.sampler = sampler
    self.local_batch_size = local_batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.workers = max(worker_count, 1)

  def __len__(self) -> int:
    return len(self.sampler)

  def __getitem__(self, position: int):
    worker, r = position % self.workers, position // self.workers
    k, i = divmod(r, self.local_batch_size)
    return self.sampler[worker + self.workers * (
        (k * self.process_count + self.process_index) * self.local_batch_size
        + i)]

  def __repr__(self) -> str:   # stored in grain's iterator state
    return (f'ProcessSliceSampler({self.sampler!r}, local_batch_size='
            f'{self.local_batch_size}, process_index={self.process_index}, '
            f'process_count={self.process_count}, workers={self.workers})')


def _pad_batch(batch: dict, size: int) -> dict:
  n = len(batch['image_id'])
  if n == size:
    return batch
  padded = {}
  for key, value in batch.items():
    value = np.asarray(value)
    fill = {'label': label_table.IGNORE_LABEL, 'valid': False, 'image_id': ''}.get(key, 0)
    pad = np.full((size - n, *value.shape[1:]), fill, value.dtype)
    padded[key] = np.concatenate([value, pad])
  return padded


def eval_batches(spec: PipelineSpec, source=None,
                 process_index: int | None = None,
                 process_count: int | None = None,
                 purpose: str = '',
                 threads: int | None = None) -> Iterator[dict]:
  """Every record of the split exactly once (this process's share), in
  local batches padded with `valid=False`, label-255 elements; every process
  yields the same number of batches so that collectives stay in step. The
  pass reports its progress (`console.progress`) as `<split>` or, when a
  stage reads the split more than once, `<split> <purpose>`. `threads`
  threads (default `eval_read_threads()`; 0: this thread) decode and
  transform the records, each its own, so that decoding overlaps; the
  batches are the same whatever their number."""
  threads = eval_read_threads() if threads is None else threads
  if threads < 0:
    raise ValueError(f'threads must be >= 0, got {threads}')
  source, process_index, process_count = _resolve(
      spec, source, process_index, process_count)
  local = spec.global_batch_size // process_count
  if local < 1:
    raise ValueError(f'evaluation batch size {spec.global_batch_size} is '
                     f'fewer than one image per process ({process_count} '
                     'processes)')
  per_process = -(-len(source) // process_count)
  num_batches = -(-per_process // local)
  return console.progress(
      _eval_batches(spec, source, process_index, process_count, local,
                    num_batches, threads),
      ' '.join(filter(None, (spec.split, purpose))),
      num_batches, count=lambda batch: int(np.sum(batch['valid'])))


def eval_read_threads() -> int:
  """The default number of threads that read an evaluation pass: one per
  CPU core this process may use, at most 16 (grain's default)."""
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
           else os.cpu_count() or 1)
  return max(1, min(16, cores))


def _read_in_order(dataset: grain.MapDataset, batch_size: int,
                   threads: int) -> Iterator[dict]:
  """The batches of `dataset` in order (the last one short), its elements
  read and transformed by `threads` threads (0: in this thread) at most
  2 batches + `threads` elements ahead, so that memory stays bounded."""
  read = grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=2 * batch_size + threads)
  iterator = iter(dataset.to_iter_dataset(read).batch(
      batch_size, drop_remainder=False))
  try:
    yield from iterator
  finally:
    iterator.close()   # stops the threads of a pass given up half-way


def _eval_batches(spec, source, process_index, process_count, local,
                  num_batches, threads) -> Iterator[dict]:
  indices = np.array_split(np.arange(len(source)), process_count)[
      process_index]
  ops = transforms_of(dataclasses.replace(
      spec, color_jitter=None, scale_range=None, crop=None, flip=False))
  if not len(indices):
    raise ValueError(f'{spec.dataset}:{spec.split} has {len(source)} records,'
                     f' fewer than the {process_count} processes')
  dataset = grain.MapDataset.source(source)[indices[0]:indices[-1] + 1]
  for op in ops:
    dataset = dataset.map(op)
  count = 0
  for batch in _read_in_order(dataset, local, threads):
    count += 1
    yield _pad_batch(batch, local)
  # a process with one record fewer may need an all-padding batch more
  padding = _pad_batch({k: np.asarray(v)[:0] for k, v in batch.items()},
                       local)
  for _ in range(count, num_batches):
    yield padding
