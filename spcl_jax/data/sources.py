"""The built datasets a run reads: where a build lives in a data directory
(local or `gs://`), the command that builds a missing one, and a split's
ArrayRecord data source."""

import os

from etils import epath

from spcl_jax.data import catalog
from spcl_jax.infra import storage


class DatasetNotBuiltError(FileNotFoundError):
  """A dataset that is not (completely) built in the data directory."""


def data_dir_path(data_dir: str) -> str:
  """A data directory as the pipeline reads it: a URL (`gs://bucket/tfds`)
  as it is, a local path with `~` expanded."""
  if storage.is_remote(data_dir):
    return data_dir
  return os.path.expanduser(data_dir)


def copy_up_command(name: str, data_dir: str) -> str:
  """The command that copies the dataset `name` built into a local
  LOCAL_DIR up to the remote `data_dir` (builds write local files only:
  array_record's writer)."""
  return f'gsutil -m cp -r LOCAL_DIR/{name} {data_dir.rstrip("/")}/'


def build_command(dataset: str, data_dir: str) -> str:
  """The command that builds `dataset` into `data_dir`; for a remote
  `data_dir`, into LOCAL_DIR and then copied up (`copy_up_command`)."""
  name, _, config = dataset.partition('/')
  remote = storage.is_remote(data_dir)
  output = 'LOCAL_DIR' if remote else data_dir
  if name not in catalog.DATASET_NAMES:   # a folder of the user's images
    command = (f'python -m data_prep.build --dataset folder --name {name} '
               f'--manual_dir FOLDER --data_dir {output}')
  else:
    config_flag = f' --config {config}' if config else ''
    manual = ('' if name in catalog.BUILT_BY_RUNS   # nothing to download
              else ' --manual_dir DOWNLOAD_DIR')
    command = (f'python -m data_prep.build --dataset {name}{config_flag} '
               f'--data_dir {output}{manual}')
  return f'{command} && {copy_up_command(name, data_dir)}' if remote else (
      command)


def dataset_directory(dataset: str, data_dir: str) -> str:
  """DATA_DIR/NAME[/CONFIG]/VERSION of the newest complete build, or
  `DatasetNotBuiltError` naming the dataset, the directory looked in and
  the exact build command. Only directories holding `dataset_info.json` are
  complete: TFDS renames a build there when it has finished. A local
  `data_dir` is made absolute; a URL (`gs://`) is listed through
  etils.epath and stays a URL."""
  data_dir = storage.resolve(data_dir)
  name, _, config = dataset.partition('/')
  where = epath.Path(data_dir, name, *([config] if config else []))
  versions = []
  if where.is_dir():
    for entry in where.iterdir():
      parts = entry.name.split('.')
      if (len(parts) == 3 and all(p.isdigit() for p in parts) and
          (entry / 'dataset_info.json').exists()):
        versions.append(tuple(int(p) for p in parts))
  if not versions:
    raise DatasetNotBuiltError(
        f'dataset {dataset!r} is not built in {data_dir} (looked in '
        f'{where}); build it with:\n  {build_command(dataset, data_dir)}')
  return str(where / '.'.join(map(str, max(versions))))


def open_source(dataset: str, split: str, data_dir: str, decoders=None):
  """The ArrayRecord data source of one split of a built dataset
  (`decoders`: TFDS's, e.g. `{'image': tfds.decode.SkipDecoding()}` to
  leave a feature undecoded).

  Reads the build's own files (`tfds.builder_from_directory`), so it needs
  no registered builder class — and is not confused by TFDS's own, different
  `cityscapes` builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(dataset_directory(dataset, data_dir))
  if split not in builder.info.splits:
    raise ValueError(f'dataset {dataset!r} in {builder.data_dir} has no split '
                     f'{split!r}; it has {sorted(builder.info.splits)}')
  return builder.as_data_source(split=split, decoders=decoders)


def built_without_labels(dataset: str, split: str, data_dir: str) -> bool:
  """Whether the build's metadata says `split` was built without labels
  (`has_labels: False`: images only, every label 255). False for a split
  whose metadata says nothing (then its labels are read)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  directory = dataset_directory(dataset, data_dir)
  metadata = tfds.builder_from_directory(directory).info.metadata or {}
  entry = metadata.get(split)
  return isinstance(entry, dict) and entry.get('has_labels') is False


class UnlabelledSplitError(ValueError):
  """Evaluation asked of a split built without labels."""


def check_labelled(dataset: str, split: str, data_dir: str) -> None:
  """Refuses to evaluate on a split built without labels (stored as all
  255; `has_labels: False` in the build's metadata, data_prep/
  segmentation_builder.py): its mIoU would be computed over no pixels. A
  dataset that is not built is left to `open_source` to report."""
  try:
    directory = dataset_directory(dataset, data_dir)
  except DatasetNotBuiltError:
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  metadata = tfds.builder_from_directory(directory).info.metadata or {}
  entry = metadata.get(split)
  if isinstance(entry, dict) and entry.get('has_labels') is False:
    labelled = sorted(name for name, value in metadata.items()
                      if isinstance(value, dict) and value.get('has_labels'))
    raise UnlabelledSplitError(
        f'cannot evaluate on split {split!r} of dataset {dataset!r}: it was '
        f'built without labels (images only; every label is 255, '
        f'{directory}). Evaluate on a labelled split instead '
        f'(data.val_split, or --split): {labelled or "none in this dataset"}')
