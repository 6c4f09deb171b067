"""What the four real datasets' builders share: reading a manual download
(extracted, or the official zip archives), converting labels once to
trainIds, and reporting defects instead of hiding them.

Records (SPEC §5): `image` uint8 [H, W, 3] PNG, `label` uint8 [H, W, 1]
trainIds (255 = ignore) PNG, `image_id` (the source file's stem).

Defects, all listed in the build log and in the dataset's metadata
(`tfds.builder_from_directory(DIR).info.metadata`):
  * missing pairs (an image without its label, or the reverse): skipped;
  * image / label size mismatches: the label is resized to the image's size
    with nearest neighbour (GTA5 has a few);
  * label ids outside the dataset's label table (or, for colour-coded
    labels, colours outside the label map): counted per id / colour and
    mapped to 255;
  * unreadable files: the build fails naming every such file, unless
    `skip_corrupt=True` (`--skip_corrupt`) records and skips them;
  * a label file of the wrong kind for its label table (a colour image
    where ids are expected, or the reverse): the build fails naming it.

Each split's metadata also says whether the split has labels
(`has_labels`): a split built without them (Cityscapes `test`, an
images-only folder split) stores all-255 labels, and evaluating on it is
refused (`spcl_jax.data.sources.check_labelled`).
"""

import abc
import collections
import io
import os
import zipfile
from typing import Iterator, NamedTuple

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_prep import records
from spcl_jax.core import labels as label_table
from spcl_jax.data.codecs import encode_png
from spcl_jax.data.resize import resize_label

IGNORE = 255


class LayoutError(FileNotFoundError):
  """The manual directory does not hold the expected layout."""


class LabelFormatError(ValueError):
  """A label file of the wrong kind for the label table (never skipped:
  every label of the dataset would be)."""


class ManualFiles:
  """The files of a manual download, by relative POSIX path: an extracted
  tree under `root`, plus the members of any `*.zip` directly in `root`
  (official archives, read in place)."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self._zips: dict[str, str] = {}
    self._files: set[str] = set()
    for directory, _, files in os.walk(self.root):
      for name in files:
        path = os.path.join(directory, name)
        relative = os.path.relpath(path, self.root).replace(os.sep, '/')
        if name.endswith('.zip') and directory == self.root:
          with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
              if not member.endswith('/'):
                self._zips.setdefault(member, path)
        else:
          self._files.add(relative)
    self._handles: dict[str, zipfile.ZipFile] = {}

  def exists(self, relative: str) -> bool:
    return relative in self._files or relative in self._zips

  def has_dir(self, prefix: str) -> bool:
    prefix = prefix.rstrip('/') + '/'
    return any(p.startswith(prefix) for p in self._files) or any(
        p.startswith(prefix) for p in self._zips)

  def list(self, prefix: str, suffix: str) -> list[str]:
    """Sorted paths under `prefix` ('': every file) ending in `suffix`."""
    prefix = prefix.rstrip('/') + '/' if prefix else ''
    return sorted({p for p in (*self._files, *self._zips)
                   if p.startswith(prefix) and p.endswith(suffix)})

  def read(self, relative: str) -> bytes:
    if relative in self._files:
      with open(os.path.join(self.root, relative), 'rb') as f:
        return f.read()
    archive = self._zips[relative]
    if archive not in self._handles:
      self._handles[archive] = zipfile.ZipFile(archive)
    return self._handles[archive].read(relative)

  def describe(self, relative: str) -> str:
    if relative in self._zips:
      return f'{self._zips[relative]}:{relative}'
    return os.path.join(self.root, relative)


class Pair(NamedTuple):
  image_id: str
  image: str | None        # relative path, None if missing
  label: str | None        # relative path, None if missing (or no labels)


class BuildReport:
  """Defects met while building one split."""

  def __init__(self):
    self.missing: list[str] = []
    self.size_mismatch: list[str] = []
    self.unreadable: list[str] = []
    self.out_of_table = collections.Counter()
    self.colors_outside_map = collections.Counter()  # 'R,G,B' -> pixels

  def as_metadata(self) -> dict:
    return {'missing_pairs': list(self.missing),
            'resized_labels': list(self.size_mismatch),
            'skipped_unreadable': list(self.unreadable),
            'label_ids_outside_table': {str(k): int(v) for k, v in
                                        sorted(self.out_of_table.items())},
            'label_colors_outside_map': dict(sorted(
                self.colors_outside_map.items()))}

  def log(self, dataset: str, split: str) -> None:
    if self.missing:
      logging.warning('%s/%s: %d missing pairs skipped: %s', dataset, split,
                      len(self.missing), ', '.join(self.missing))
    if self.size_mismatch:
      logging.warning('%s/%s: %d labels resized (nearest) to their image '
                      'size: %s', dataset, split, len(self.size_mismatch),
                      ', '.join(self.size_mismatch))
    if self.out_of_table:
      logging.warning('%s/%s: label ids outside the table, mapped to 255 '
                      '(id: pixels): %s', dataset, split,
                      dict(sorted(self.out_of_table.items())))
    if self.colors_outside_map:
      logging.warning('%s/%s: label colours outside the label map, mapped to '
                      '255 (R,G,B: pixels): %s', dataset, split,
                      dict(sorted(self.colors_outside_map.items())))
    if self.unreadable:
      logging.warning('%s/%s: unreadable files skipped: %s', dataset, split,
                      ', '.join(self.unreadable))


def read_rgb(data: bytes) -> tuple[bytes, tuple[int, int]]:
  """(PNG bytes of an 8-bit RGB image, (height, width)); the original bytes
  when they already are an 8-bit RGB PNG."""
  image = Image.open(io.BytesIO(data))
  image.load()
  size = (image.height, image.width)
  if image.format == 'PNG' and image.mode == 'RGB':
    return data, size
  return encode_png(np.asarray(image.convert('RGB'))), size


def lookup(raw: np.ndarray, table: dict[int, int], known_ids,
           report: BuildReport) -> np.ndarray:
  """Raw label ids -> uint8 trainIds by `table` (absent ids -> 255); ids not
  in `known_ids` are counted in the report (and also become 255)."""
  raw = np.asarray(raw).astype(np.int64)
  values, counts = np.unique(raw, return_counts=True)
  lut_size = int(max(values.max(initial=0), max(table, default=0))) + 1
  lut = np.full(lut_size, IGNORE, np.uint8)
  for raw_id, train_id in table.items():
    lut[raw_id] = train_id
  for value, count in zip(values, counts):
    if int(value) not in known_ids:
      report.out_of_table[int(value)] += int(count)
  return lut[raw]


def label_id_png_to_train_ids(data: bytes, report: BuildReport) -> np.ndarray:
  """A single-channel PNG of Cityscapes label ids -> trainIds (Cityscapes,
  Synscapes)."""
  raw = np.asarray(Image.open(io.BytesIO(data)))
  if raw.ndim != 2:
    raise ValueError(f'expected a single-channel label-id PNG, found shape '
                     f'{raw.shape}')
  return lookup(raw, label_table.CITYSCAPES_ID_TO_TRAINID,
                label_table.CITYSCAPES_IDS, report)


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """A dataset of (image, label) pairs read from a manual download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  HOMEPAGE = ''
  # Relative paths that must exist (checked in order) in the manual dir.
  REQUIRED_PATHS: tuple = ()

  def __init__(self, *, skip_corrupt: bool = False, **kwargs):
    self.skip_corrupt = skip_corrupt
    self._reports: dict[str, BuildReport] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=records.record_features(),
        homepage=self.HOMEPAGE,
        metadata=tfds.core.MetadataDict(),
    )

  # ----------------------------------------------------- dataset-specific --

  @abc.abstractmethod
  def _pairs(self, files: ManualFiles, split: str) -> list[Pair]:
    """Every (image_id, image, label) of a split, sorted by image_id."""

  @abc.abstractmethod
  def _train_ids(self, data: bytes, report: BuildReport) -> np.ndarray:
    """Label file bytes -> uint8 [H, W] trainIds."""

  @abc.abstractmethod
  def _split_names(self, files: ManualFiles) -> tuple:
    """The splits this builder produces from these files."""

  # ------------------------------------------------------------- common --

  def _open_manual_dir(self, dl_manager) -> ManualFiles:
    instructions = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:  # TFDS's word for "missing or empty"
      raise LayoutError(f'{self.name}: no usable --manual_dir ({e})') from e
    files = ManualFiles(os.fspath(manual_dir))
    for path in self.REQUIRED_PATHS:
      if not (files.exists(path) or files.has_dir(path)):
        raise LayoutError(f'{self.name}: expected {os.path.join(files.root, path)}'
                          f' (or it inside a .zip in {files.root}), not '
                          f'found.\n{instructions}')
    return files

  def _split_generators(self, dl_manager):
    files = self._open_manual_dir(dl_manager)
    return {split: self._generate_examples(files, split)
            for split in self._split_names(files)}

  def _generate_examples(self, files: ManualFiles, split: str
                         ) -> Iterator[tuple[str, dict]]:
    report = BuildReport()
    self._reports[split] = report
    for pair in self._pairs(files, split):
      if pair.image is None or (pair.label is None and self._has_labels(split)):
        report.missing.append(self._describe_missing(pair))
        continue
      try:
        image_png, size = read_rgb(files.read(pair.image))
      except Exception as e:  # pylint: disable=broad-except
        report.unreadable.append(f'{files.describe(pair.image)} ({e})')
        continue
      if pair.label is None:
        label = np.full(size, IGNORE, np.uint8)
      else:
        try:
          label = self._train_ids(files.read(pair.label), report)
        except LabelFormatError as e:
          raise LabelFormatError(f'{self.name}/{split}: '
                                 f'{files.describe(pair.label)}: {e}') from e
        except Exception as e:  # pylint: disable=broad-except
          report.unreadable.append(f'{files.describe(pair.label)} ({e})')
          continue
        if label.shape != size:
          report.size_mismatch.append(
              f'{pair.image_id} (image {size[0]}x{size[1]}, label '
              f'{label.shape[0]}x{label.shape[1]})')
          label = resize_label(label, size)
      yield pair.image_id, {'image': image_png, 'label': encode_png(label),
                            'image_id': pair.image_id}
    report.log(self.name, split)
    if report.unreadable and not self.skip_corrupt:
      raise OSError(f'{self.name}/{split}: {len(report.unreadable)} unreadable '
                    'files (rebuild with --skip_corrupt to skip them):\n  '
                    + '\n  '.join(report.unreadable))
    self.info.metadata[split] = {**report.as_metadata(),
                                 'has_labels': self._has_labels(split)}

  def _has_labels(self, split: str) -> bool:
    del split
    return True

  def _describe_missing(self, pair: Pair) -> str:
    """How a missing pair is listed in the log and the metadata."""
    return pair.image_id


def pairs_by_stem(images: list[str], labels: list[str], image_suffix: str,
                  label_suffix: str) -> list[Pair]:
  """Pairs image and label files whose names, less the suffixes, agree."""
  def stem(path, suffix):
    return os.path.basename(path)[:-len(suffix)]
  by_image = unique_keys({stem(p, image_suffix): p for p in images}, images,
                         lambda p: stem(p, image_suffix), 'image')
  by_label = unique_keys({stem(p, label_suffix): p for p in labels}, labels,
                         lambda p: stem(p, label_suffix), 'label')
  return [Pair(i, by_image.get(i), by_label.get(i))
          for i in sorted(set(by_image) | set(by_label),
                          key=lambda s: (len(s), s))]


def unique_keys(by_key: dict, paths: list[str], key, kind: str) -> dict:
  """`by_key` ({key(path): path}) if no two `paths` share a key; otherwise a
  LayoutError naming the files that do (one would silently replace the
  other)."""
  if len(by_key) == len(paths):
    return by_key
  groups = collections.defaultdict(list)
  for path in paths:
    groups[key(path)].append(path)
  clashes = [f'{k}: {", ".join(v)}' for k, v in sorted(groups.items())
             if len(v) > 1]
  raise LayoutError(f'{len(clashes)} {kind} names are not unique (each '
                    f'{kind} must have its own name):\n  '
                    + '\n  '.join(clashes))
