"""The dataset builders by name, and building one (no flags: importable from
the training pipeline and the tests). `folder` is not a dataset but the
builder of any folder of images (data_prep/folder.py): the dataset is
named by the caller (`name=`)."""

import json
import os

import tensorflow_datasets as tfds

from data_prep import acdc
from data_prep import cityscapes
from data_prep import dark_zurich
from data_prep import folder
from data_prep import gta5
from data_prep import segmentation_builder
from data_prep import sim2real_demo
from data_prep import synscapes
from data_prep import synthia

DATASETS = {'sim2real_demo': sim2real_demo.Sim2RealDemo,
            'gta5': gta5.Gta5,
            'synthia': synthia.Synthia,
            'synscapes': synscapes.Synscapes,
            'spcl_cityscapes': cityscapes.Cityscapes,
            'acdc': acdc.Acdc,
            'dark_zurich': dark_zurich.DarkZurich}
# DATASETS' names are spcl_jax.data.catalog.DATASET_NAMES (tested).
FOLDER = 'folder'


def make_builder(dataset: str, data_dir: str, config=None,
                 skip_corrupt: bool = False, name: str | None = None,
                 label_map: str | None = None, image_suffix: str = '',
                 label_suffix: str = folder.DEFAULT_LABEL_SUFFIX):
  """The builder of `dataset` (`NAME/CONFIG` chooses a config, as in
  `data.source`). `dataset='folder'`: the folder dataset `name`, its labels
  read with the label map file `label_map` (None: Cityscapes label ids)
  and paired by `image_suffix` / `label_suffix` (data_prep/folder.py)."""
  if '/' in dataset and config is None:
    dataset, config = dataset.split('/', 1)
  if dataset == FOLDER:
    if config:
      raise ValueError('a folder dataset has no builder configs (--config)')
    return folder.builder_class(name, reserved=DATASETS)(
        data_dir=data_dir, file_format='array_record',
        skip_corrupt=skip_corrupt,
        label_map=folder.read_label_map(label_map),
        image_suffix=image_suffix, label_suffix=label_suffix)
  if name or label_map:
    raise ValueError(f'--name and --label_map are for --dataset {FOLDER}, '
                     f'not {dataset!r}')
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; known: '
                     f'{", ".join(sorted(DATASETS))} (or {FOLDER} --name '
                     'NAME: any folder of images)')
  configs = [c.name for c in DATASETS[dataset].BUILDER_CONFIGS or ()]
  if config is not None and isinstance(config, str) and config not in configs:
    raise ValueError(f'dataset {dataset!r} has no config {config!r}; '
                     f'configs: {configs or "none"}')
  kwargs = {} if dataset == 'sim2real_demo' else {'skip_corrupt':
                                                  skip_corrupt}
  return DATASETS[dataset](data_dir=data_dir, config=config,
                           file_format='array_record', **kwargs)


def _check_same_folder_build(builder) -> None:
  """A folder dataset already built under its name with other settings
  (label map, suffixes) is refused: TFDS would keep the old build."""
  if not isinstance(builder, folder.FolderDataset) or not os.path.exists(
      os.path.join(builder.data_dir, 'dataset_info.json')):
    return
  def without_source(settings):  # the map file's path may differ
    settings = json.loads(json.dumps(settings or {}))
    settings.get('label_map', {}).pop('source', None)
    return settings
  built = tfds.builder_from_directory(builder.data_dir).info.metadata or {}
  if without_source(built.get('build')) != without_source(
      builder.build_settings()):
    raise ValueError(
        f'{builder.name} is already built in {builder.data_dir} with other '
        f'settings ({built.get("build")}); remove that directory to rebuild '
        'it, or choose another --name')


def build(dataset: str, data_dir: str, config=None, manual_dir=None,
          skip_corrupt: bool = False, should_stop=None, **folder_options):
  """Builds `dataset` (if not built yet) into `data_dir`; returns the
  builder. TFDS writes into a temporary directory renamed when complete.
  `folder_options`: `name`, `label_map`, `image_suffix`, `label_suffix` of
  a folder dataset (`make_builder`). `should_stop()`: a builder that looks
  at it between records (sim2real_demo) stops with
  `sim2real_demo.BuildStopped` once it is true (its temporary directory
  left behind)."""
  builder = make_builder(dataset, os.path.abspath(data_dir), config,
                         skip_corrupt, **folder_options)
  if should_stop is not None:
    builder.should_stop = should_stop
  _check_same_folder_build(builder)
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
