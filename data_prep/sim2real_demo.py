"""`sim2real_demo`: the built-in, procedurally rendered sim-to-real dataset.

Splits: `source_train` (synthetic domain, labelled), `target_train` (real-like
domain; its labels are stored but only the oracle run may use them),
`target_val` (real-like, disjoint seeds), `source_val` (synthetic, disjoint
seeds: for same-domain control runs). Records: `image` uint8 [H, W, 3],
`label` uint8 [H, W, 1] trainIds (255 = ignore), `image_id`.

Configs: `default` (128x256; 2000 / 1000 / 200 / 200 images) and `tiny`
(64x128; 48 / 24 / 16 / 16, for smoke tests); `make_config` makes others. Every record is
rendered from the seed sequence (config seed, split, index), so the same
config gives byte-identical records.
"""

import multiprocessing
import os

import tensorflow_datasets as tfds

from data_prep import records
from data_prep import sim2real_render
from spcl_jax.data.codecs import encode_png

SPLITS = {'source_train': 'synthetic', 'target_train': 'real',
          'target_val': 'real', 'source_val': 'synthetic'}


class BuildStopped(Exception):
  """The build was asked to stop (`Sim2RealDemo.should_stop`)."""


class Sim2RealDemoConfig(tfds.core.BuilderConfig):
  """Image size, split sizes and seed of a demo dataset."""

  def __init__(self, *, height: int, width: int, num_source_train: int,
               num_target_train: int, num_target_val: int, seed: int = 0,
               **kwargs):
    super().__init__(**kwargs)
    self.height, self.width, self.seed = height, width, seed
    self.counts = {'source_train': num_source_train,
                   'target_train': num_target_train,
                   'target_val': num_target_val,
                   'source_val': num_target_val}


def make_config(name: str | None = None, *, height: int = 128,
                width: int = 256, counts=(2000, 1000, 200),
                seed: int = 0) -> Sim2RealDemoConfig:
  """A config; unnamed ones are named after their numbers."""
  if any(c <= 0 for c in counts) or height < 32 or width < 32:
    raise ValueError(f'sim2real_demo needs positive counts and images of at '
                     f'least 32x32, got counts {counts}, size {height}x{width}')
  name = name or (f'c{counts[0]}-{counts[1]}-{counts[2]}_{height}x{width}'
                  f'_seed{seed}')
  return Sim2RealDemoConfig(
      name=name, height=height, width=width, num_source_train=counts[0],
      num_target_train=counts[1], num_target_val=counts[2], seed=seed,
      description=f'{height}x{width}, {counts[0]} / {counts[1]} / {counts[2]} '
                  f'images, seed {seed}')


class Sim2RealDemo(tfds.core.GeneratorBasedBuilder):
  """Procedural street scenes: a synthetic source and a real-like target."""

  name = 'sim2real_demo'
  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '2.0.0': 'Photo-like source domain (per-object colours, textures, '
               'uneven light); sensor-like shift to the target; objects '
               'resolvable at 96x192; a source_val split.'}
  BUILDER_CONFIGS = [make_config('default'),
                     make_config('tiny', height=64, width=128,
                                 counts=(48, 24, 16))]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=records.record_features(),
        homepage='https://github.com/BinhuiXie/SPCL',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  # set by builders.build: () -> bool, looked at between records
  should_stop = None

  def _stop_if_asked(self, split) -> None:
    if self.should_stop is not None and self.should_stop():
      raise BuildStopped(f'{self.name}/{self.builder_config.name}: build '
                         f'stopped in split {split}')

  def _generate_examples(self, split):
    config = self.builder_config
    split_index = list(SPLITS).index(split)
    jobs = [(config.seed, split_index, i, SPLITS[split], config.height,
             config.width) for i in range(config.counts[split])]
    # Records are rendered in worker processes ('spawn': the caller may hold
    # JAX threads), in order; each depends on its own seed only.
    workers = min(os.cpu_count() or 1, 8)
    if workers == 1 or len(jobs) < 64:
      for job in jobs:
        self._stop_if_asked(split)
        record = _render_record(job)
        yield record['image_id'], record
      return
    # stopped: the pool's workers are terminated as the `with` ends
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
      for record in pool.imap(_render_record, jobs, chunksize=16):
        self._stop_if_asked(split)
        yield record['image_id'], record


def _render_record(job) -> dict:
  seed, split_index, i, domain, height, width = job
  image, label = sim2real_render.render([seed, split_index, i], domain,
                                        height, width)
  image_id = f'{list(SPLITS)[split_index]}_{i:06d}'
  return {'image': encode_png(image), 'label': encode_png(label),
          'image_id': image_id}
