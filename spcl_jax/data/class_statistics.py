"""Per-class file statistics of a built split: for every record, which of
the 19 stored trainIds its label contains (the released code's
`gtav_label_info.p`, made by `datasets/generate_gta5_label_info.py`: for
every class, the files that contain it).

They are computed once, by reading every label of the split, and kept in the
build's own directory (`statistics_path`: DATA/NAME[/CONFIG]/VERSION/
class_statistics.<split>.npz), written atomically (a temporary name renamed,
or one object upload in a `gs://` data directory). A rebuilt dataset
replaces its version directory, so a file never outlives the records it
describes. The class-balanced source sampler (`class_balanced`) and the
report's sampled class shares read them; no run rescans the labels.

Stored per trainId, not per class of a label space: one file serves every
`data.label_space` (`for_label_space` picks the space's columns).
"""

import dataclasses
import io
import os
from typing import Iterable

import grain
import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.data import sources
from spcl_jax.infra import console
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib

# Bumped when the file's content changes meaning; a file of another format
# is refused, naming it.
FORMAT = 1


class StatisticsError(ValueError):
  """A statistics file that does not describe its split, or a split whose
  labels hold no class (images only)."""


@dataclasses.dataclass(frozen=True)
class ClassStatistics:
  """`present[i, t]`: record i's label contains trainId t (bool
  [records, 19])."""
  present: np.ndarray

  @property
  def num_records(self) -> int:
    return self.present.shape[0]

  def for_label_space(self, space: str) -> np.ndarray:
    """bool [records, C]: record i contains class c of the label space
    `space` (its trainIds' columns, in the space's order)."""
    return self.present[:, list(label_table.check_label_space(space))]


def label_presence(label) -> np.ndarray:
  """bool [19]: which trainIds occur in one stored label map (255 and
  values outside the 19 trainIds are no class)."""
  counts = np.bincount(np.asarray(label, np.uint8).ravel(), minlength=256)
  return counts[:label_table.NUM_CLASSES] > 0


def statistics_path(dataset_directory: str, split: str) -> str:
  """Where the statistics of `split` live: in the build's version directory
  (`sources.dataset_directory`), beside its ArrayRecord shards."""
  return os.path.join(dataset_directory, f'class_statistics.{split}.npz')


def to_bytes(statistics: ClassStatistics) -> bytes:
  buffer = io.BytesIO()
  np.savez_compressed(buffer, format=np.int64(FORMAT),
                      present=statistics.present.astype(bool))
  return buffer.getvalue()


def from_bytes(data: bytes, path: str, num_records: int) -> ClassStatistics:
  """The statistics stored in `data` (read from `path`), checked against
  the split's `num_records`; a StatisticsError naming `path` and what to
  do otherwise."""
  remedy = 'delete it and it is computed again on the next run'
  try:
    with np.load(io.BytesIO(data)) as stored:
      found_format = int(stored['format'])
      present = np.asarray(stored['present'])
  except (OSError, ValueError, KeyError) as e:
    raise StatisticsError(f'{path} is not a class-statistics file ({e}); '
                          f'{remedy}') from None
  if found_format != FORMAT:
    raise StatisticsError(f'{path} has format {found_format}, expected '
                          f'{FORMAT}; {remedy}')
  expected = (num_records, label_table.NUM_CLASSES)
  if present.dtype != bool or present.shape != expected:
    raise StatisticsError(f'{path} holds {present.dtype} {present.shape}, '
                          f'expected bool {expected} (one row per record of '
                          f'the split); {remedy}')
  return ClassStatistics(present)


def presence_rows(labels: Iterable) -> np.ndarray:
  """bool [n, 19]: `label_presence` of each label map of `labels`."""
  rows = [label_presence(label) for label in labels]
  return (np.stack(rows) if rows else
          np.zeros((0, label_table.NUM_CLASSES), bool))


def _label_only_source(dataset: str, split: str, data_dir: str):
  """The split's data source decoding labels only (images are skipped)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return sources.open_source(dataset, split, data_dir, decoders={
      'image': tfds.decode.SkipDecoding()})


def compute(dataset: str, split: str, data_dir: str, threads: int,
            source=None) -> ClassStatistics:
  """Reads every label of the split once (with `threads` threads; 0: this
  one), reporting progress (`console.progress`). `source`: a data source of
  the split to read instead of the build's (tests)."""
  source = source if source is not None else _label_only_source(
      dataset, split, data_dir)
  read = grain.MapDataset.source(source).map(
      lambda record: label_presence(record['label']))
  iterator = read.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(2 * threads, 1)))
  rows = list(console.progress(iter(iterator),
                               f'class statistics of {dataset}:{split}',
                               len(source), items='labels', unit='labels'))
  return ClassStatistics(np.stack(rows) if rows else np.zeros(
      (0, label_table.NUM_CLASSES), bool))


def check_has_classes(statistics: ClassStatistics, dataset: str,
                      split: str) -> None:
  """Refuses a split whose labels hold no class at all (an images-only
  split, stored as all 255): there is nothing to balance."""
  if not statistics.present.any():
    raise StatisticsError(
        f"data.source_sampling = 'class_balanced' needs labels, but no "
        f'label of {dataset}:{split} holds any class (an images-only '
        "split, stored as all 255); use data.source_sampling = 'uniform' or "
        'a labelled source')


def load(dataset: str, split: str, data_dir: str,
         num_records: int) -> ClassStatistics | None:
  """The stored statistics of the split, or None where there are none."""
  path = statistics_path(sources.dataset_directory(dataset, data_dir), split)
  if not storage.exists(path):
    return None
  return from_bytes(storage.read_bytes(path), path, num_records)


def save(statistics: ClassStatistics, dataset: str, split: str,
         data_dir: str) -> str:
  """Writes the statistics of the split atomically; returns the path."""
  path = statistics_path(sources.dataset_directory(dataset, data_dir), split)
  data = to_bytes(statistics)
  workdir_lib.write_atomically(path, lambda f: f.write(data), binary=True)
  return path


def load_or_compute(dataset: str, split: str, data_dir: str,
                    threads: int = 4, source=None) -> ClassStatistics:
  """The split's statistics: read from the build, else computed (with a
  progress line) and kept there. Refuses a split without any class."""
  if source is None:
    source = sources.open_source(dataset, split, data_dir)
  statistics = load(dataset, split, data_dir, len(source))
  if statistics is None:
    statistics = compute(dataset, split, data_dir, threads)
    if statistics.num_records != len(source):
      raise StatisticsError(
          f'{dataset}:{split}: read {statistics.num_records} labels, but the '
          f'split has {len(source)} records')
    check_has_classes(statistics, dataset, split)
    save(statistics, dataset, split, data_dir)
  check_has_classes(statistics, dataset, split)
  return statistics


def sampled_shares(presence: np.ndarray, record_keys) -> np.ndarray:
  """float [C]: the share of the records `record_keys` (with repeats: one
  entry per sampled image) whose label contains each class; `presence`:
  bool [records, C]."""
  keys = np.asarray(record_keys, np.int64)
  if not keys.size:
    return np.zeros(presence.shape[1])
  return presence[keys].mean(axis=0)
