r"""Your own images (and labels) as a dataset: one builder for any folder.

  python -m data_prep.build --dataset folder --name NAME --manual_dir DIR \
      --data_dir OUT [--label_map MAP.json] [--label_suffix _labelIds] \
      [--image_suffix '']

builds `DIR` into OUT/NAME/1.0.0 in the layout of every other builder
(`image`, `label`, `image_id`), so that a config reads it with
`data.source` / `data.target` = NAME.

Layout: one split per sub-folder of DIR (its name is the split's name),
    DIR/<split>/images/**/<stem>.{png,jpg,jpeg}      (any depth)
    DIR/<split>/labels/**/<stem><label_suffix>.png   (optional)
A split without a `labels/` folder is an images-only split (a target
training split): its labels are stored as all 255 and its metadata says
`has_labels: False`, so that evaluating on it is refused.

Pairing rule: an image and a label pair when their paths relative to
`images/` and `labels/` agree once the extension and the suffixes are
dropped: the image's stem less `--image_suffix` (default: none) must equal
the label's stem less `--label_suffix` (default `_labelIds`; a label stem
without that suffix is used as it is). So `images/seq1/0001.jpg` pairs with
`labels/seq1/0001_labelIds.png` or `labels/seq1/0001.png` (both present:
an error). Labels are PNG (lossless). The key (`seq1/0001`) is the record's
`image_id`: the file's stem for files directly in `images/`.

Labels: by default single-channel Cityscapes label ids (gtFine
`*_labelIds.png`), mapped to the 19 trainIds. `--label_map MAP.json`
replaces the table, with either ids or colours (JSON object, one key):
    {"ids": {"0": 255, "1": 0, "2": 1, ...}}
    {"colors": {"128,64,128": 0, "#f423e8": 1, ...}}
Values are trainIds 0..18 or 255 (ignore). Id labels are single-channel
PNGs, 8 or 16 bit (palette PNGs are read by index, as GTA5's); colour
labels are RGB(A) or palette PNGs read as colours. Ids or colours that are
not in the map are counted per value in the report and stored as 255.

Defects as in the other builders (data_prep/segmentation_builder.py):
images without a label or labels without an image are skipped and listed
by file; a label of another size than its image is resized to it with
nearest neighbour; unreadable files fail the build unless --skip_corrupt.
"""

import io
import json
import os
import re

import numpy as np
from PIL import Image

from data_prep import segmentation_builder as sb
from spcl_jax.core import labels as label_table

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
LABEL_EXTENSION = '.png'
DEFAULT_LABEL_SUFFIX = '_labelIds'
_NAME = re.compile(r'^[a-z][a-z0-9_]*$')
_SPLIT = re.compile(r'^[A-Za-z0-9_]+$')
_TRAIN_IDS = frozenset(range(label_table.NUM_CLASSES)) | {sb.IGNORE}


class LabelMapError(ValueError):
  """A label map that cannot be used (names the file and the entry)."""


class LabelMap:
  """Label file -> uint8 trainIds: by id (`kind == 'ids'`) or by RGB colour
  (`kind == 'colors'`). `table` maps each known id / colour to a trainId."""

  def __init__(self, kind: str, table: dict, source: str, known=None):
    self.kind, self.table, self.source = kind, table, source
    # ids / colours that are not counted as unknown (default: the table's)
    self.known = frozenset(table) if known is None else known

  def as_metadata(self) -> dict:
    if self.kind == 'ids':
      return {'source': self.source,
              'ids': {str(k): v for k, v in sorted(self.table.items())}}
    return {'source': self.source,
            'colors': {','.join(map(str, k)): v
                       for k, v in sorted(self.table.items())}}

  def train_ids(self, data: bytes, report: sb.BuildReport) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    if self.kind == 'ids':
      if image.mode not in ('L', 'P', 'I', 'I;16', 'I;16B', 'I;16L'):
        raise sb.LabelFormatError(
            f'a {image.mode} image, but the label map ({self.source}) maps '
            'single-channel label ids; colour-coded labels need a label '
            'map with "colors" (--label_map)')
      return sb.lookup(np.asarray(image), self.table, self.known, report)
    if image.mode not in ('RGB', 'RGBA', 'P'):
      raise sb.LabelFormatError(
          f'a {image.mode} image, but the label map ({self.source}) maps '
          'RGB colours; single-channel label ids need a label map with '
          '"ids" (or none: Cityscapes label ids)')
    rgb = np.asarray(image.convert('RGB')).astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    values, inverse, counts = np.unique(codes, return_inverse=True,
                                        return_counts=True)
    mapped = np.full(len(values), sb.IGNORE, np.uint8)
    for i, (code, count) in enumerate(zip(values, counts)):
      color = (int(code) >> 16, (int(code) >> 8) & 255, int(code) & 255)
      if color in self.known:
        mapped[i] = self.table[color]
      else:
        report.colors_outside_map[','.join(map(str, color))] += int(count)
    return mapped[inverse.reshape(codes.shape)]


def cityscapes_label_map() -> LabelMap:
  """The default: Cityscapes label ids (ids outside its table counted)."""
  return LabelMap('ids', dict(label_table.CITYSCAPES_ID_TO_TRAINID),
                  'cityscapes', known=label_table.CITYSCAPES_IDS)


def _train_id(value, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or (
      value not in _TRAIN_IDS):
    raise LabelMapError(f'{where}: trainId {value!r} is not one of 0..'
                        f'{label_table.NUM_CLASSES - 1} or 255 (ignore)')
  return value


def _color(key: str, where: str) -> tuple:
  text = key.strip()
  if text.startswith('#'):
    parts = ([text[i:i + 2] for i in (1, 3, 5)] if len(text) == 7 else [])
    try:
      color = tuple(int(p, 16) for p in parts)
    except ValueError:
      color = ()
  else:
    try:
      color = tuple(int(p) for p in text.split(','))
    except ValueError:
      color = ()
  if len(color) != 3 or not all(0 <= c <= 255 for c in color):
    raise LabelMapError(f'{where}: {key!r} is not a colour; write "R,G,B" '
                        'with each of R, G, B in 0..255, or "#rrggbb"')
  return color


def parse_label_map(spec: dict, source: str) -> LabelMap:
  """A LabelMap from the JSON object `spec` (read from `source`); every
  problem is a LabelMapError naming `source` and the entry."""
  if not isinstance(spec, dict) or len(spec) != 1 or not set(spec) <= {
      'ids', 'colors'}:
    keys = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
    raise LabelMapError(f'label map {source}: expected a JSON object with '
                        f'exactly one key, "ids" or "colors"; found {keys}')
  kind, entries = next(iter(spec.items()))
  if not isinstance(entries, dict) or not entries:
    raise LabelMapError(f'label map {source}: "{kind}" must be a non-empty '
                        'object {id or colour: trainId}')
  table = {}
  for key, value in entries.items():
    where = f'label map {source}, entry "{key}": {value!r}'
    if kind == 'ids':
      try:
        raw = int(key)
      except ValueError:
        raise LabelMapError(f'{where}: {key!r} is not an integer label id'
                            ) from None
      if not 0 <= raw <= 255:
        raise LabelMapError(f'{where}: label id {raw} is outside 0..255')
    else:
      raw = _color(key, where)
    if raw in table:
      raise LabelMapError(f'{where}: {kind[:-1]} {raw} is listed twice')
    table[raw] = _train_id(value, where)
  return LabelMap(kind, table, source)


def read_label_map(path: str | None) -> LabelMap:
  """The label map of `--label_map` (None: Cityscapes label ids)."""
  if not path:
    return cityscapes_label_map()
  try:
    with open(path) as f:
      spec = json.load(f)
  except OSError as e:
    raise LabelMapError(f'label map {path}: cannot be read ({e})') from e
  except json.JSONDecodeError as e:
    raise LabelMapError(f'label map {path}: not valid JSON ({e})') from e
  return parse_label_map(spec, path)


def _split_key(path: str, suffix: str) -> str:
  """`seq/0001_labelIds.png` -> `seq/0001` (the extension, then `suffix`
  when the stem ends with it)."""
  stem = os.path.splitext(path)[0]
  return stem[:-len(suffix)] if suffix and stem.endswith(suffix) else stem


class FolderDataset(sb.SegmentationBuilder, skip_registration=True):
  """A folder of images (and optionally labels) -> 19 Cityscapes trainIds;
  one split per sub-folder. Subclassed per dataset name (`builder_class`)."""

  name = 'folder'
  REQUIRED_PATHS = ()
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the folder as --manual_dir; one split per sub-folder:
    DIR/<split>/images/**/<stem>.{png,jpg,jpeg}
    DIR/<split>/labels/**/<stem>_labelIds.png   (or <stem>.png; optional:
                                                 without it, images only)
  """

  def __init__(self, *, label_map: LabelMap | None = None,
               image_suffix: str = '',
               label_suffix: str = DEFAULT_LABEL_SUFFIX, **kwargs):
    self.label_map = label_map or cityscapes_label_map()
    self.image_suffix, self.label_suffix = image_suffix, label_suffix
    self._labelled: dict[str, bool] = {}
    super().__init__(**kwargs)

  def build_settings(self) -> dict:
    """What the build reads its files with (stored in the metadata)."""
    return {'label_map': self.label_map.as_metadata(),
            'image_suffix': self.image_suffix,
            'label_suffix': self.label_suffix}

  def _split_generators(self, dl_manager):
    self.info.metadata['build'] = self.build_settings()
    return super()._split_generators(dl_manager)

  def _split_names(self, files):
    found = {p.split('/', 1)[0] for p in files.list('', '') if '/' in p}
    found |= {d for d in os.listdir(files.root)   # empty split folders too
              if os.path.isdir(os.path.join(files.root, d))}
    splits = sorted(s for s in found if not s.startswith(('.', '__MACOSX')))
    if not splits:
      raise sb.LayoutError(f'{self.name}: {files.root} holds no split '
                           f'folders.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    for split in splits:
      where = os.path.join(files.root, split)
      if not _SPLIT.match(split):
        raise sb.LayoutError(f'{self.name}: split folder {where}: a split '
                             'name has only letters, digits and _')
      if not files.has_dir(f'{split}/images'):
        raise sb.LayoutError(f'{self.name}: split folder {where} has no '
                             f'images/ folder (or it is empty).'
                             f'\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
      extra = sorted({p.split('/')[1] for p in files.list(split, '')}
                     - {'images', 'labels'})
      if extra:
        raise sb.LayoutError(f'{self.name}: split folder {where} holds '
                             f'{extra}; expected only images/ and labels/')
      self._labelled[split] = files.has_dir(f'{split}/labels')
    return tuple(splits)

  def _has_labels(self, split):
    return self._labelled[split]

  def _files(self, files, split, kind, extensions):
    prefix = f'{split}/{kind}/'
    found = files.list(prefix, '')
    wanted = [p for p in found if p.lower().endswith(extensions)]
    if not wanted:
      raise sb.LayoutError(
          f'{self.name}: {os.path.join(files.root, split, kind)} holds no '
          f'{"/".join(e[1:] for e in extensions)} files'
          + (f' (found {", ".join(found[:5])})' if found else '')
          + ('; remove the empty labels/ folder for an images-only split'
             if kind == 'labels' else ''))
    return [p[len(prefix):] for p in wanted]

  def _pairs(self, files, split):
    images = self._files(files, split, 'images', IMAGE_EXTENSIONS)
    by_image = sb.unique_keys(
        {_split_key(p, self.image_suffix): p for p in images}, images,
        lambda p: _split_key(p, self.image_suffix), f'{split} image')
    by_label = {}
    if self._labelled[split]:
      labels = self._files(files, split, 'labels', (LABEL_EXTENSION,))
      by_label = sb.unique_keys(
          {_split_key(p, self.label_suffix): p for p in labels}, labels,
          lambda p: _split_key(p, self.label_suffix), f'{split} label')
      if not set(by_image) & set(by_label):
        raise sb.LayoutError(
            f'{self.name}/{split}: none of the {len(by_image)} images has a '
            f'label among the {len(by_label)} labels (pairing rule: the '
            f'image stem less --image_suffix {self.image_suffix!r} equals '
            f'the label stem less --label_suffix {self.label_suffix!r}, in '
            f'the same sub-folder), e.g. images/{images[0]} and '
            f'labels/{labels[0]}')
    def path(kind, by_key, key):
      return f'{split}/{kind}/{by_key[key]}' if key in by_key else None
    return [sb.Pair(key, path('images', by_image, key),
                    path('labels', by_label, key))
            for key in sorted(set(by_image) | set(by_label))]

  def _describe_missing(self, pair):
    if pair.image is None:
      return (f'{pair.label}: no image {pair.image_id}{self.image_suffix}'
              '.{png,jpg,jpeg} in images/')
    return (f'{pair.image}: no label {pair.image_id}{self.label_suffix}'
            f'{LABEL_EXTENSION} or {pair.image_id}{LABEL_EXTENSION} in '
            'labels/')

  def _train_ids(self, data, report):
    return self.label_map.train_ids(data, report)


def builder_class(name: str, reserved=()) -> type:
  """A FolderDataset subclass named `name` (a build lands in
  DATA_DIR/`name`/VERSION, where `data.source` / `data.target` = `name`
  finds it). `reserved`: the names of the built-in datasets."""
  if not name or not _NAME.match(name):
    raise ValueError(f'--name {name!r}: a folder dataset needs a name of '
                     'lower-case letters, digits and _, starting with a '
                     'letter (it is the name configs use: data.target)')
  if name in reserved or name == FolderDataset.name:
    raise ValueError(f'--name {name!r} is a built-in dataset; choose another '
                     'name for the folder dataset')
  return type(f'FolderDataset_{name}', (FolderDataset,), {
      'name': name, '__doc__': FolderDataset.__doc__},
              skip_registration=True)
