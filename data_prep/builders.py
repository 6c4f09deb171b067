"""The dataset builders by name, and building one (no flags: importable from
the training pipeline and the tests)."""

import os

import tensorflow_datasets as tfds

from data_prep import cityscapes
from data_prep import gta5
from data_prep import segmentation_builder
from data_prep import sim2real_demo
from data_prep import synscapes
from data_prep import synthia

DATASETS = {'sim2real_demo': sim2real_demo.Sim2RealDemo,
            'gta5': gta5.Gta5,
            'synthia': synthia.Synthia,
            'synscapes': synscapes.Synscapes,
            'spcl_cityscapes': cityscapes.Cityscapes}


def make_builder(dataset: str, data_dir: str, config=None,
                 skip_corrupt: bool = False):
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; known: '
                     f'{", ".join(sorted(DATASETS))}')
  kwargs = {} if dataset == 'sim2real_demo' else {'skip_corrupt':
                                                  skip_corrupt}
  return DATASETS[dataset](data_dir=data_dir, config=config,
                           file_format='array_record', **kwargs)


def build(dataset: str, data_dir: str, config=None, manual_dir=None,
          skip_corrupt: bool = False):
  """Builds `dataset` (if not built yet) into `data_dir`; returns the
  builder. TFDS writes into a temporary directory renamed when complete."""
  builder = make_builder(dataset, os.path.abspath(data_dir), config,
                         skip_corrupt)
  instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if instructions and not (manual_dir and os.path.isdir(manual_dir)
                           and os.listdir(manual_dir)):
    raise segmentation_builder.LayoutError(
        f'{dataset}: --manual_dir {manual_dir} does not exist or is empty.'
        f'\n{instructions}')
  download_config = tfds.download.DownloadConfig(
      manual_dir=manual_dir and os.path.abspath(manual_dir))
  builder.download_and_prepare(download_config=download_config)
  return builder
