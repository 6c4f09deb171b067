"""grain input pipelines over TFDS ArrayRecord data sources.

A pipeline reads records `{"image": uint8 [H, W, 3], "label": uint8 [H, W]
or [H, W, 1], "image_id": str}` from `tfds.data_source`, optionally swaps the
label for a stored pseudo-label map (joined by `image_id`), applies the
recipe's transforms, batches per process, and hands out global `jax.Array`s
sharded over the mesh. Elements leave the transforms as
`{"image": float32 [h, w, 3] (ImageNet-normalised), "label": int32 [h, w],
"image_id": str, "valid": bool}`; `valid` is False only for padding in
evaluation batches.

Randomness comes from grain's per-record generators, seeded by the sampler's
seed and the record's position in the stream. The same seed gives the same
global batches whatever the number of processes (each reads its slice of
one stream: `ProcessSliceSampler`), and a restored iterator state continues
exactly where it stopped. The number of grain worker processes
(`data.worker_count`) changes which records of the stream share a batch
(each worker batches its own records): keep it to reproduce a run.
"""

import dataclasses
import io
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence

from absl import flags
from etils import epath
import grain
import jax
import msgpack
import numpy as np
from PIL import Image

from spcl_jax import console
from spcl_jax import labels as label_table
from spcl_jax import sharding as sharding_lib
from spcl_jax import storage
from spcl_jax import workdir as workdir_lib

IGNORE_LABEL = 255


# ----------------------------------------------------------- data sources --

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
  from data_prep import builders  # pylint: disable=g-import-not-at-top
  if name not in builders.DATASETS:   # a folder of the user's images
    command = (f'python -m data_prep.build --dataset folder --name {name} '
               f'--manual_dir FOLDER --data_dir {output}')
  else:
    config_flag = f' --config {config}' if config else ''
    manual = ('' if name in builders.BUILT_BY_RUNS   # nothing to download
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


def open_source(dataset: str, split: str, data_dir: str):
  """The ArrayRecord data source of one split of a built dataset.

  Reads the build's own files (`tfds.builder_from_directory`), so it needs
  no registered builder class — and is not confused by TFDS's own, different
  `cityscapes` builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(dataset_directory(dataset, data_dir))
  if split not in builder.info.splits:
    raise ValueError(f'dataset {dataset!r} in {builder.data_dir} has no split '
                     f'{split!r}; it has {sorted(builder.info.splits)}')
  return builder.as_data_source(split=split)


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


# -------------------------------------------------------- pseudo labels ----

class PseudoLabelWriter:
  """Writes one process's pseudo-label maps into `directory` as the shard
  `pseudo_labels-{index:05d}-of-{count:05d}.array_record` (msgpack records
  `{"image_id", "png"}`), plus `.json` with the image ids in record order.
  Both files are written under temporary names and renamed by `close()`, so a
  reader never sees a half-written shard. Into a `gs://` directory (the
  ArrayRecord writer writes local files) they are written in a local
  temporary folder and uploaded by `close()`, the index last: a shard
  counts only once its index exists."""

  def __init__(self, directory: str, shard_index: int = 0,
               shard_count: int = 1, metadata: dict | None = None):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    directory = storage.resolve(directory)
    storage.makedirs(directory)
    stem = f'pseudo_labels-{shard_index:05d}-of-{shard_count:05d}'
    self._final = os.path.join(directory, stem)
    self._tmp = tempfile.mkdtemp(prefix=f'.{stem}.tmp-', dir=(
        None if storage.is_remote(directory) else directory))
    self._writer = array_record_module.ArrayRecordWriter(
        os.path.join(self._tmp, 'records'), 'group_size:1')
    self._ids: list[str] = []
    self._metadata = dict(metadata or {}, shard_index=shard_index,
                          shard_count=shard_count)

  def add(self, image_id: str, label: np.ndarray) -> None:
    label = np.asarray(label)
    if label.dtype != np.uint8 or label.ndim != 2:
      raise ValueError(f'pseudo label of {image_id!r} must be uint8 [H, W], '
                       f'got {label.dtype} {label.shape}')
    self._writer.write(msgpack.packb({'image_id': image_id,
                                      'png': encode_png(label)}))
    self._ids.append(image_id)

  def close(self) -> None:
    self._writer.close()
    with open(os.path.join(self._tmp, 'index.json'), 'w') as f:
      json.dump({'image_ids': self._ids, **self._metadata}, f)
    # the index is renamed last: a shard counts only once its index exists
    for name, suffix in (('records', '.array_record'), ('index.json', '.json')):
      if storage.is_remote(self._final):
        storage.copy_file(os.path.join(self._tmp, name), self._final + suffix)
      else:
        os.replace(os.path.join(self._tmp, name), self._final + suffix)
    shutil.rmtree(self._tmp, ignore_errors=True)

  def abort(self) -> None:
    self._writer.close()
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    else:
      self.abort()


class CorruptPseudoLabelsError(ValueError):
  """A pseudo-label shard (or its index) that cannot be read."""


class PseudoLabelStore:
  """Read side of the pseudo-label shards of a directory: `store[image_id]`
  is the uint8 [H, W] map. Opens files lazily, so it pickles into grain
  worker processes. A shard that cannot be read (a truncated or damaged
  file: its record count differs from its index's, or a record fails to
  decode) is a `CorruptPseudoLabelsError` naming the file and how to make
  the labels again."""

  def __init__(self, directory: str):
    self.directory = storage.resolve(directory)
    self._index = self._read_index()
    self._readers = None

  def _corrupt(self, name: str, reason) -> CorruptPseudoLabelsError:
    """The error of the unreadable file `name` of the store: the labels of
    a stage's `labels` folder are made again by redoing that stage."""
    stage_dir = os.path.dirname(self.directory)
    redo = (f'delete {os.path.join(stage_dir, "done.json")} and rerun with '
            f'stage {os.path.basename(stage_dir)!r} among the stages to run '
            '(it writes them again)'
            if os.path.basename(self.directory) == 'labels'
            else 'write them again')
    return CorruptPseudoLabelsError(
        f'pseudo-label shard {os.path.join(self.directory, name)} cannot be '
        f'read ({reason}); to make the pseudo labels again, {redo}')

  def _check_shard(self, shard: str, count: int) -> None:
    """A truncated or damaged shard reads as fewer records than its index
    lists (0 when its footer is damaged; closing the reader then raises
    Riegeli's error)."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    try:
      reader = array_record_module.ArrayRecordReader(
          os.path.join(self.directory, shard))
      found = reader.num_records()
      reader.close()
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(shard, str(e) or type(e).__name__) from e
    if found != count:
      raise self._corrupt(shard, f'{found} records, its index lists {count}')

  def _read_index(self) -> dict:
    if not storage.isdir(self.directory):
      raise FileNotFoundError(f'no pseudo labels at {self.directory}')
    shards = sorted(f for f in storage.listdir(self.directory)
                    if f.startswith('pseudo_labels-') and f.endswith('.json'))
    if not shards:
      raise FileNotFoundError(f'no complete pseudo-label shard in '
                              f'{self.directory}')
    index, counts = {}, set()
    for shard in shards:
      try:
        meta = json.loads(storage.read_bytes(
            os.path.join(self.directory, shard)))
        counts.add(meta['shard_count'])
        image_ids = list(meta['image_ids'])
      except (ValueError, KeyError, TypeError) as e:  # not JSON, not ours
        raise self._corrupt(shard, f'not a shard index: {e!r}') from e
      records = shard[:-len('.json')] + '.array_record'
      self._check_shard(records, len(image_ids))
      for position, image_id in enumerate(image_ids):
        index[image_id] = (records, position)
    if len(counts) != 1 or len(shards) != counts.pop():
      raise FileNotFoundError(
          f'{self.directory}: found shards {shards}; a shard is missing or '
          'from another run')
    return index

  def __getstate__(self):
    return {'directory': self.directory, '_index': self._index,
            '_readers': None}

  def __len__(self) -> int:
    return len(self._index)

  def __contains__(self, image_id: str) -> bool:
    return image_id in self._index

  def image_ids(self) -> list[str]:
    return sorted(self._index)

  def __getitem__(self, image_id: str) -> np.ndarray:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if image_id not in self._index:
      raise KeyError(f'no pseudo label for image_id {image_id!r} in '
                     f'{self.directory}')
    if self._readers is None:
      self._readers = {}
    shard, position = self._index[image_id]
    try:
      if shard not in self._readers:
        self._readers[shard] = array_record_module.ArrayRecordReader(
            os.path.join(self.directory, shard))
      record = msgpack.unpackb(self._readers[shard].read([position])[0])
      return np.asarray(Image.open(io.BytesIO(record['png'])))
    except Exception as e:  # Riegeli, msgpack, PNG: the file is damaged
      raise self._corrupt(shard, f'record {position} ({image_id}): '
                          f'{e}') from e


def encode_png(array: np.ndarray) -> bytes:
  """Deterministic PNG bytes of a uint8 [H, W] or [H, W, 3] array."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=6)
  return buffer.getvalue()


# ------------------------------------------------------------- transforms --

def _as_str(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return _as_str(value.item())
  return str(value)


@dataclasses.dataclass(frozen=True)
class CheckRecord(grain.transforms.Map):
  """Validates a record: label [H, W] (or [H, W, 1]) matching the image's
  size, else an error naming the `image_id`. Label values outside
  [0, num_classes) other than 255 become 255 and are counted in
  `invalid_label_pixels` for the training loop to report. Stored trainIds
  are first mapped to the classes of `label_space` (labels.trainid_lut)."""
  num_classes: int
  label_space: str = 'cityscapes19'

  def map(self, record):
    image_id = _as_str(record['image_id'])
    image, label = np.asarray(record['image']), np.asarray(record['label'])
    if label.ndim == 3 and label.shape[-1] == 1:
      label = label[..., 0]
    if image.ndim != 3 or image.shape[-1] != 3 or label.ndim != 2:
      raise ValueError(f'record {image_id!r}: expected image [H, W, 3] and '
                       f'label [H, W], got {image.shape} and {label.shape}')
    if image.shape[:2] != label.shape:
      raise ValueError(f'record {image_id!r}: image size {image.shape[:2]} '
                       f'and label size {label.shape} differ')
    label = label_table.trainid_lut(self.label_space)[label]
    invalid = (label >= self.num_classes) & (label != IGNORE_LABEL)
    return {'image': image, 'label': np.where(invalid, IGNORE_LABEL,
                                              label).astype(np.uint8),
            'image_id': image_id, 'valid': True,
            'invalid_label_pixels': np.int32(invalid.sum())}


@dataclasses.dataclass(frozen=True)
class AttachPseudoLabels(grain.transforms.Map):
  """Replaces the label by the stored pseudo-label map of the same image."""
  store: PseudoLabelStore

  def map(self, element):
    label = self.store[element['image_id']]
    if label.shape != element['image'].shape[:2]:
      raise ValueError(
          f'pseudo label of {element["image_id"]!r} in '
          f'{self.store.directory} is {label.shape}, image is '
          f'{element["image"].shape[:2]}')
    return {**element, 'label': label}


def _resize(array: np.ndarray, size, resample) -> np.ndarray:
  height, width = size
  if array.shape[:2] == (height, width):
    return array
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


def resize_label(label: np.ndarray, size) -> np.ndarray:
  """Nearest-neighbour resize of a label map to size = (height, width):
  never creates a value absent from the input."""
  return _resize(label, size, Image.NEAREST)


def resize_image(image: np.ndarray, size) -> np.ndarray:
  """Bilinear resize of an image to size = (height, width)."""
  return _resize(image, size, Image.BILINEAR)


def resize_pair(image: np.ndarray, label: np.ndarray, size):
  """(image bilinear, label nearest) resized to size = (height, width)."""
  return resize_image(image, size), resize_label(label, size)


# `data.image_interpolation`: PIL filters of the image resize (labels are
# always resized with nearest neighbour).
INTERPOLATIONS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
  """Resizes the image (`interpolation`: a key of INTERPOLATIONS) and, unless
  told otherwise, the label (nearest) to `size`."""
  size: tuple  # (height, width)
  resize_label: bool = True
  interpolation: str = 'bilinear'

  def map(self, element):
    label = element['label']
    return {**element, 'image': _resize(element['image'], self.size,
                                        INTERPOLATIONS[self.interpolation]),
            'label': resize_label(label, self.size) if self.resize_label
                     else label}


def _rgb_to_hsv(rgb):
  """Vectorised `colorsys.rgb_to_hsv` for float arrays in [0, 1]."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc, minc = rgb.max(-1), rgb.min(-1)
  v = maxc
  delta = maxc - minc
  s = np.where(maxc > 0, delta / np.maximum(maxc, 1e-12), 0)
  safe = np.maximum(delta, 1e-12)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc,
                                             4.0 + gc - rc))
  h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv):
  """Vectorised `colorsys.hsv_to_rgb`."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(np.int32) % 6
  choices = [np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t),
                                       (p, q, v), (t, p, v), (v, p, q))]
  return np.choose(i[..., None], choices)


def color_jitter(image: np.ndarray, rng: np.random.Generator,
                 brightness: float, contrast: float, saturation: float,
                 hue: float) -> np.ndarray:
  """torchvision's ColorJitter on a uint8 RGB image: factors drawn uniformly
  from [max(0, 1 - x), 1 + x] (hue shift from [-hue, hue]), the four
  operations applied in random order, clipped to [0, 1] after each."""
  x = image.astype(np.float32) / 255.0
  gray = lambda x: x @ np.array([0.299, 0.587, 0.114], np.float32)
  for op in rng.permutation(4):
    if op == 0 and brightness:
      x = np.clip(x * rng.uniform(max(0, 1 - brightness), 1 + brightness),
                  0, 1)
    elif op == 1 and contrast:
      f = rng.uniform(max(0, 1 - contrast), 1 + contrast)
      x = np.clip(f * x + (1 - f) * gray(x).mean(), 0, 1)
    elif op == 2 and saturation:
      f = rng.uniform(max(0, 1 - saturation), 1 + saturation)
      x = np.clip(f * x + (1 - f) * gray(x)[..., None], 0, 1)
    elif op == 3 and hue:
      hsv = _rgb_to_hsv(x)
      hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 1.0
      x = np.clip(_hsv_to_rgb(hsv), 0, 1)
  return np.round(x * 255.0).astype(np.uint8)


def jitter_params(rng: np.random.Generator, brightness: float,
                  contrast: float, saturation: float, hue: float):
  """torchvision's `ColorJitter.get_params` drawn from `rng`: (the order of
  the operations 0-3 = brightness, contrast, saturation, hue, [factor or
  None for each]). Factors are uniform in [max(0, 1 - x), 1 + x], the hue
  shift in [-hue, hue]; an operation whose parameter is 0 gets None (it is
  skipped, as in torchvision)."""
  order = rng.permutation(4)
  factors = [rng.uniform(max(0.0, 1 - x), 1 + x) if x else None
             for x in (brightness, contrast, saturation)]
  factors.append(rng.uniform(-hue, hue) if hue else None)
  return order, factors


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """torchvision's PIL `adjust_hue`: the uint8 hue of PIL's HSV image
  shifted by int(hue_factor * 255), wrapping around (a PIL point table on
  the H band instead of a NumPy round trip: the same bytes)."""
  if not -0.5 <= hue_factor <= 0.5:
    raise ValueError(f'hue factor {hue_factor} is not in [-0.5, 0.5]')
  shift = int(hue_factor * 255)   # truncated toward 0, as np.int32() does
  table = [(v + shift) % 256 for v in range(256)] + list(range(256)) * 2
  return image.convert('HSV').point(table).convert('RGB')


def adjust_color(image: Image.Image, op: int, factor: float) -> Image.Image:
  """Operation `op` of torchvision's PIL colour functions: 0 brightness,
  1 contrast, 2 saturation (PIL `ImageEnhance`), 3 hue (`adjust_hue`);
  uint8 after each."""
  from PIL import ImageEnhance  # pylint: disable=g-import-not-at-top
  if op == 3:
    return adjust_hue(image, factor)
  if factor < 0:
    raise ValueError(f'colour factor {factor} of operation {op} is negative')
  enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast,
             ImageEnhance.Color)[op]
  return enhance(image).enhance(factor)


def released_color_jitter(image: np.ndarray, rng: np.random.Generator,
                          brightness: float, contrast: float,
                          saturation: float, hue: float) -> np.ndarray:
  """The released transform, torchvision's `ColorJitter(brightness,
  contrast, saturation, hue)` on a PIL image, on a uint8 RGB image: the
  factors and random order of `jitter_params`, each operation rounded to
  uint8 as PIL does (`adjust_color`). The same bytes as torchvision for the
  same factors and order; ~5x faster than `color_jitter`."""
  order, factors = jitter_params(rng, brightness, contrast, saturation, hue)
  pil = Image.fromarray(np.ascontiguousarray(image))
  for op in order:
    if factors[op] is not None:
      pil = adjust_color(pil, int(op), factors[op])
  return np.asarray(pil)


# `ColorJitter.implementation`: 'float' is the float HSV jitter the demo's
# recorded results were made with, 'released' the PIL (torchvision) one.
COLOR_JITTERS = {'float': color_jitter, 'released': released_color_jitter}


@dataclasses.dataclass(frozen=True)
class ColorJitter(grain.transforms.RandomMap):
  """Colour jitter of the image with grain's per-record generator (so
  deterministic per record); `implementation` is a key of COLOR_JITTERS."""
  brightness: float
  contrast: float
  saturation: float
  hue: float
  implementation: str = 'float'

  def __post_init__(self):
    if self.implementation not in COLOR_JITTERS:
      raise ValueError(f'colour jitter implementation '
                       f'{self.implementation!r} is not one of '
                       f'{sorted(COLOR_JITTERS)}')
    if min(self.brightness, self.contrast, self.saturation) < 0 or not (
        0 <= self.hue <= 0.5):
      raise ValueError(
          f'colour jitter (brightness, contrast, saturation, hue) = '
          f'{(self.brightness, self.contrast, self.saturation, self.hue)}: '
          'the first three must be >= 0 and hue in [0, 0.5]')

  def random_map(self, element, rng: np.random.Generator):
    image = COLOR_JITTERS[self.implementation](
        element['image'], rng, self.brightness, self.contrast,
        self.saturation, self.hue)
    return {**element, 'image': image}


def scale_crop_flip(image, label, rng, scale_range, crop, flip, fill,
                    interpolation: str = 'bilinear'):
  """Random scale (the image with `interpolation`, a key of INTERPOLATIONS;
  the label nearest), pad to the crop size (image with `fill`, label with
  255), random crop, random horizontal flip."""
  if scale_range is not None:
    s = rng.uniform(*scale_range)
    size = (max(1, int(round(image.shape[0] * s))),
            max(1, int(round(image.shape[1] * s))))
    image = _resize(image, size, INTERPOLATIONS[interpolation])
    label = resize_label(label, size)
  if crop is not None:
    ch, cw = crop
    h, w = label.shape
    if h < ch or w < cw:
      ph, pw = max(ch - h, 0), max(cw - w, 0)
      image = np.concatenate([image, np.broadcast_to(
          np.asarray(fill, np.uint8), (ph, image.shape[1], 3))], 0) if ph else image
      label = np.pad(label, ((0, ph), (0, 0)), constant_values=IGNORE_LABEL)
      image = np.concatenate([image, np.broadcast_to(
          np.asarray(fill, np.uint8), (image.shape[0], pw, 3))], 1) if pw else image
      label = np.pad(label, ((0, 0), (0, pw)), constant_values=IGNORE_LABEL)
      h, w = label.shape
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = image[top:top + ch, left:left + cw]
    label = label[top:top + ch, left:left + cw]
  if flip and rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


@dataclasses.dataclass(frozen=True)
class RandomScaleCropFlip(grain.transforms.RandomMap):
  scale_range: tuple | None
  crop: tuple | None
  flip: bool
  fill: tuple  # uint8 RGB used to pad images (the mean colour)
  interpolation: str = 'bilinear'   # of the image's scaling (INTERPOLATIONS)

  def random_map(self, element, rng: np.random.Generator):
    image, label = scale_crop_flip(element['image'], element['label'], rng,
                                   self.scale_range, self.crop, self.flip,
                                   self.fill, self.interpolation)
    return {**element, 'image': image, 'label': label}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  mean: tuple
  std: tuple

  def map(self, element):
    image = (element['image'].astype(np.float32) / 255.0
             - np.asarray(self.mean, np.float32)) / np.asarray(self.std,
                                                               np.float32)
    return {**element, 'image': image,
            'label': element['label'].astype(np.int32)}


# --------------------------------------------------------------- pipelines --

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
  interpolation: str = 'bilinear'    # of every image resize (INTERPOLATIONS)
  resize_label: bool = True          # False: keep labels at full resolution
  color_jitter: tuple | None = None  # (brightness, contrast, saturation, hue)
  color_jitter_implementation: str = 'float'   # a key of COLOR_JITTERS
  scale_range: tuple | None = None   # random scale (low, high)
  crop: tuple | None = None          # random crop (height, width)
  flip: bool = False
  mean: tuple = (0.485, 0.456, 0.406)
  std: tuple = (0.229, 0.224, 0.225)
  pseudo_labels: str | None = None   # PseudoLabelStore directory
  shuffle: bool = True
  seed: int = 0
  worker_count: int = 0


def transforms_of(spec: PipelineSpec) -> list:
  ops: list[Any] = [CheckRecord(spec.num_classes, spec.label_space)]
  if spec.pseudo_labels:
    ops.append(AttachPseudoLabels(PseudoLabelStore(spec.pseudo_labels)))
  if spec.size:
    ops.append(Resize(tuple(spec.size), spec.resize_label,
                      spec.interpolation))
  if spec.color_jitter:
    ops.append(ColorJitter(*spec.color_jitter,
                           implementation=spec.color_jitter_implementation))
  if spec.scale_range or spec.crop or spec.flip:
    fill = tuple(int(round(255 * m)) for m in spec.mean)
    ops.append(RandomScaleCropFlip(
        spec.scale_range and tuple(spec.scale_range),
        spec.crop and tuple(spec.crop), spec.flip, fill,
        spec.interpolation))
  ops.append(Normalize(tuple(spec.mean), tuple(spec.std)))
  return ops


def _resolve(spec, source, process_index, process_count):
  """Defaults: the spec's data source, this process among all processes."""
  if source is None:
    source = open_source(spec.dataset, spec.split, spec.data_dir)
  return (source,
          jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def train_loader(spec: PipelineSpec, source=None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.DataLoader:
  """An endless, shuffled loader of this process's slices of the global
  batches (`ProcessSliceSampler`)."""
  source, process_index, process_count = _resolve(
      spec, source, process_index, process_count)
  local = spec.global_batch_size // process_count
  if local * process_count != spec.global_batch_size:
    raise ValueError(f'global batch size {spec.global_batch_size} is not '
                     f'divisible by the {process_count} processes')
  one_stream = grain.sharding.ShardOptions(0, 1, drop_remainder=True)
  sampler = ProcessSliceSampler(
      grain.samplers.IndexSampler(
          len(source), shard_options=one_stream, shuffle=spec.shuffle,
          num_epochs=None, seed=spec.seed),
      local_batch_size=local, process_index=process_index,
      process_count=process_count, worker_count=spec.worker_count)
  if spec.worker_count and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside `app.run` (tests,
    # notebooks) the defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(
      data_source=source, sampler=sampler, shard_options=one_stream,
      operations=transforms_of(spec) + [grain.transforms.Batch(
          local, drop_remainder=True)],
      worker_count=spec.worker_count)


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
    fill = {'label': IGNORE_LABEL, 'valid': False, 'image_id': ''}.get(key, 0)
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


def to_global(batch: dict, mesh: jax.sharding.Mesh,
              keys: Sequence[str] = ('image', 'label')) -> dict:
  """Local numpy batch -> global jax.Arrays (batch axis sharded over the
  mesh) for `keys`; other entries (image ids) stay host-local numpy."""
  target = sharding_lib.batch_sharding(mesh)
  out = {}
  for key, value in batch.items():
    if key in keys:
      out[key] = jax.make_array_from_process_local_data(target,
                                                        np.asarray(value))
    else:
      out[key] = np.asarray(value)
  return out


def copy_out_of_shared_memory(batch: dict) -> dict:
  """`batch` with its arrays in ordinary memory.

  grain's worker processes hand batches over in shared memory blocks, each
  unlinked when its array is garbage collected. `jax.device_put` of a host
  array on the CPU backend keeps the array alive in a reference cycle (it
  aliases the memory), so the blocks of the last batches waited for the
  cyclic garbage collector, and those still waiting at exit were never
  unlinked (`resource_tracker: There appear to be N leaked shared_memory
  objects` after every run with `data.worker_count` > 0). A copy drops the
  block at once; it costs one memcpy of a batch."""
  return {k: np.array(v) if isinstance(v, np.ndarray) else v
          for k, v in batch.items()}


class GlobalBatchIterator:
  """Endless iterator of global batches over a `train_loader`, with grain's
  checkpointable state (`get_state()` / `set_state(state)`;
  `local_iterator` is what grain's orbax handler saves). `close()` stops
  the loader's worker processes and unlinks the batches they had ready."""

  def __init__(self, loader: grain.DataLoader, mesh: jax.sharding.Mesh,
               keys: Sequence[str] = ('image', 'label')):
    self._iterator = iter(loader)
    self._mesh, self._keys = mesh, tuple(keys)

  @property
  def local_iterator(self):
    return self._iterator

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return to_global(copy_out_of_shared_memory(next(self._iterator)),
                     self._mesh, self._keys)

  def close(self) -> None:
    # grain's DataLoaderIterator has no close(); its dataset iterator does
    # (idempotent), and is what stops the workers.
    close = getattr(self._iterator, 'close', None) or getattr(
        getattr(self._iterator, '_iterator', None), 'close', None)
    if close is not None:
      close()

  def get_state(self) -> bytes:
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(state)
