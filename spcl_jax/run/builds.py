"""The one door from a run to `data_prep`: the demo dataset a run builds
itself when it is missing (`data.build_if_missing`), the splits and configs
the config check reads of it, and the renderer of the demo's pretraining
images. No other module of spcl_jax imports data_prep (.importlinter).

data_prep's modules are imported when a function here needs them (TFDS and
every builder load in seconds), not when a run starts."""

import os

from absl import logging
import jax
import numpy as np

from spcl_jax.data import catalog
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.run import processes


def ensure_demo_data(ctx) -> None:
  """Builds the demo dataset if its current version is missing (a build of
  an older version is left alone and not read). Never into a remote data
  directory (`gs://`): `config_checks.check_datasets` has refused a run
  that would read a missing dataset there."""
  data = ctx.config.data
  if not data.build_if_missing or storage.is_remote(ctx.data_dir()):
    return
  from data_prep import builders  # pylint: disable=g-import-not-at-top
  for dataset in {data.source, data.target}:
    name, _, config_name = dataset.partition('/')
    if name not in catalog.BUILT_BY_RUNS:
      continue
    version = str(builders.DATASETS[name].VERSION)
    config_dir = os.path.join(ctx.data_dir(), name, config_name or 'default')
    info = os.path.join(config_dir, version, 'dataset_info.json')
    if processes.any_process(not os.path.exists(info)):
      def build(stop):   # on process 0; the others wait for it
        if jax.process_index() == 0:
          logging.info('building %s %s into %s', dataset, version,
                       ctx.data_dir())
          builders.build(name, ctx.data_dir(), config_name or None,
                         should_stop=stop.is_set)
      # SIGTERM stops the build between two records; the next run builds
      # it again (and removes what this one left)
      processes.interruptible(ctx, 'build', f'building {dataset}', build,
                              stops=True)
    if jax.process_index() == 0:   # what a killed build left behind
      workdir_lib.remove_incomplete_tfds_builds(config_dir)


def demo_splits(field: str, dataset: str) -> list | None:
  """The splits of `dataset` if it is one a run builds when it is missing
  (the demo's, with `data.build_if_missing`), else None; a config name it
  lacks is refused here, before anything is built."""
  name, _, config_name = dataset.partition('/')
  if name not in catalog.BUILT_BY_RUNS:
    return None
  from data_prep import builders  # pylint: disable=g-import-not-at-top
  from data_prep import sim2real_demo  # pylint: disable=g-import-not-at-top
  configs = [c.name for c in builders.DATASETS[name].BUILDER_CONFIGS]
  if config_name and config_name not in configs:
    raise ValueError(f'data.{field} = {dataset!r}: dataset {name!r} has no '
                     f'config {config_name!r}; its configs: {configs}')
  return sorted(sim2real_demo.SPLITS)


def pretraining_categories() -> tuple:
  """The category names of the demo's pretraining task."""
  from data_prep import pretrain_render  # pylint: disable=g-import-not-at-top
  return tuple(pretrain_render.CATEGORIES)


def render_pretraining_images(seeds, size: int):
  """(images uint8 [n, size, size, 3], categories int32 [n]) of the
  pretraining task, one image per seed tuple of `seeds`."""
  from data_prep import pretrain_render  # pylint: disable=g-import-not-at-top
  pairs = [pretrain_render.render(seed, size) for seed in seeds]
  return (np.stack([p[0] for p in pairs]),
          np.asarray([p[1] for p in pairs], np.int32))
