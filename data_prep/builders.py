"""The dataset builders by name, and building one (no flags: importable from
the training pipeline and the tests)."""

import os

import tensorflow_datasets as tfds

from data_prep import sim2real_demo

DATASETS = {'sim2real_demo': sim2real_demo.Sim2RealDemo}


def make_builder(dataset: str, data_dir: str, config=None):
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; known: '
                     f'{", ".join(sorted(DATASETS))}')
  return DATASETS[dataset](data_dir=data_dir, config=config,
                           file_format='array_record')


def build(dataset: str, data_dir: str, config=None, manual_dir=None):
  """Builds `dataset` (if not built yet) into `data_dir`; returns the
  builder. TFDS writes into a temporary directory renamed when complete."""
  builder = make_builder(dataset, os.path.abspath(data_dir), config)
  download_config = tfds.download.DownloadConfig(
      manual_dir=manual_dir and os.path.abspath(manual_dir))
  builder.download_and_prepare(download_config=download_config)
  return builder
