"""The storage format of pseudo labels: one ArrayRecord shard per process
(msgpack records `{"image_id", "png"}`) and a JSON index of its image ids,
written atomically (`PseudoLabelWriter`) and read back by image id
(`PseudoLabelStore`, `AttachPseudoLabels`)."""

import dataclasses
import io
import json
import os
import shutil
import tempfile

import grain
import msgpack
import numpy as np
from PIL import Image

from spcl_jax.data import codecs
from spcl_jax.infra import storage


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
                                      'png': codecs.encode_png(label)}))
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
