"""The four real datasets' builders on tiny fakes written in each dataset's
exact layout and encoding."""

import io
import json
import os
import zipfile

import cv2
import numpy as np
import pytest
from PIL import Image

from data_prep import builders
from data_prep import segmentation_builder
from spcl_jax.core import labels as label_table
from spcl_jax.data import sources

RNG = np.random.RandomState(0)


def _save_rgb(path, height, width, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.random.RandomState(seed).randint(0, 256, (height, width, 3),
                                              dtype=np.uint8)
  Image.fromarray(image).save(path)
  return image


def _save_palette_label(path, ids):
  """GTA5 style: palette PNG whose indices are the label ids; the palette's
  colours differ from the indices, so decoding colours would be caught."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(ids.astype(np.uint8), mode='P')
  palette = [((i * 37 + 11) % 256, (i * 91 + 3) % 256, (i * 53 + 7) % 256)
             for i in range(256)]
  image.putpalette([c for rgb in palette for c in rgb])
  image.save(path)


def _save_gray(path, ids):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(ids.astype(np.uint8)).save(path)


def _cityscapes_ids(shape, seed):
  ids = np.random.RandomState(seed).randint(0, 34, shape)
  ids[0, :3] = [7, 26, 33]  # road, car, bicycle are always there
  return ids


def _read_split(data_dir, dataset, split):
  source = sources.open_source(dataset, split, data_dir)
  return {r['image_id'].decode(): (r['image'], r['label'][..., 0])
          for r in source}


def _metadata(data_dir, dataset):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder_from_directory(
      sources.dataset_directory(dataset, data_dir)).info.metadata


# ------------------------------------------------------------------- GTA5 --

def write_gta5(root):
  """4 pairs (one with a smaller label), one image without its label, one
  label id outside the table (40)."""
  expected = {}
  for i in range(1, 6):
    stem = f'{i:05d}'
    image = _save_rgb(f'{root}/images/{stem}.png', 24, 32, i)
    if i == 5:
      continue  # missing pair
    shape = (20, 30) if i == 3 else (24, 32)
    ids = _cityscapes_ids(shape, i)
    if i == 2:
      ids[5, 5:9] = 40
    _save_palette_label(f'{root}/labels/{stem}.png', ids)
    train = label_table.ID_TO_TRAINID[ids]
    if i == 3:  # documented rule: nearest-neighbour resize to the image size
      train = np.asarray(Image.fromarray(train).resize((32, 24),
                                                       Image.NEAREST))
    expected[stem] = (image, train)
  return expected


@pytest.fixture(scope='module')
def gta5_build(tmp_path_factory):
  root = tmp_path_factory.mktemp('gta5_manual')
  expected = write_gta5(str(root))
  data_dir = tmp_path_factory.mktemp('gta5_tfds')
  builders.build('gta5', str(data_dir), manual_dir=str(root))
  return root, data_dir, expected


def test_gta5_labels_are_palette_indices_mapped_to_train_ids(gta5_build):
  _, data_dir, expected = gta5_build
  records = _read_split(str(data_dir), 'gta5', 'train')
  assert sorted(records) == sorted(expected) == ['00001', '00002', '00003',
                                                 '00004']
  for stem, (image, train) in expected.items():
    np.testing.assert_array_equal(records[stem][0], image)
    np.testing.assert_array_equal(records[stem][1], train)
  meta = _metadata(str(data_dir), 'gta5')['train']
  assert meta['missing_pairs'] == ['00005']
  assert meta['resized_labels'] == ['00003 (image 24x32, label 20x30)']
  assert meta['label_ids_outside_table'] == {'40': 4}


def test_gta5_from_the_official_zip_archives_is_identical(gta5_build,
                                                          tmp_path):
  root, data_dir, _ = gta5_build
  archive_dir = tmp_path / 'zips'
  archive_dir.mkdir()
  for kind in ('images', 'labels'):
    with zipfile.ZipFile(archive_dir / f'01_{kind}.zip', 'w') as z:
      for name in sorted(os.listdir(root / kind)):
        z.write(root / kind / name, f'{kind}/{name}')
  builders.build('gta5', str(tmp_path / 'out'), manual_dir=str(archive_dir))
  ours = _record_bytes(tmp_path / 'out')
  assert ours == _record_bytes(data_dir) and ours


def _record_bytes(root):
  found = {}
  for directory, _, files in os.walk(root):
    for f in files:
      if '.array_record' in f:
        found[f] = (open(os.path.join(directory, f), 'rb').read())
  return found


def test_building_twice_gives_identical_records(gta5_build, tmp_path):
  root, data_dir, _ = gta5_build
  builders.build('gta5', str(tmp_path), manual_dir=str(root))
  assert _record_bytes(tmp_path) == _record_bytes(data_dir)


def test_unreadable_files_fail_naming_each_and_leave_no_dataset(tmp_path):
  root = tmp_path / 'manual'
  write_gta5(str(root))
  (root / 'images' / '00002.png').write_bytes(b'not a png')
  (root / 'labels' / '00004.png').write_bytes(b'\x89PNG broken')
  with pytest.raises(OSError) as e:
    builders.build('gta5', str(tmp_path / 'out'), manual_dir=str(root))
  assert 'images/00002.png' in str(e.value)
  assert 'labels/00004.png' in str(e.value)
  assert '--skip_corrupt' in str(e.value)
  with pytest.raises(sources.DatasetNotBuiltError):  # nothing a reader accepts
    sources.open_source('gta5', 'train', str(tmp_path / 'out'))
  builders.build('gta5', str(tmp_path / 'skip'), manual_dir=str(root),
                 skip_corrupt=True)
  records = _read_split(str(tmp_path / 'skip'), 'gta5', 'train')
  assert sorted(records) == ['00001', '00003']
  skipped = _metadata(str(tmp_path / 'skip'), 'gta5')['train'][
      'skipped_unreadable']
  assert len(skipped) == 2


def test_missing_manual_dir_or_layout_names_the_path(tmp_path):
  with pytest.raises(segmentation_builder.LayoutError, match='manual_dir'):
    builders.build('gta5', str(tmp_path / 'out'),
                   manual_dir=str(tmp_path / 'nowhere'))
  (tmp_path / 'manual' / 'images').mkdir(parents=True)
  (tmp_path / 'manual' / 'images' / '00001.png').write_bytes(b'')
  with pytest.raises(segmentation_builder.LayoutError) as e:
    builders.build('gta5', str(tmp_path / 'out'),
                   manual_dir=str(tmp_path / 'manual'))
  assert str(tmp_path / 'manual' / 'labels') in str(e.value)
  assert 'download.visinf.tu-darmstadt.de' in str(e.value)  # instructions


# ---------------------------------------------------------------- SYNTHIA --

def test_synthia_reads_the_16_bit_red_channel(tmp_path):
  root = tmp_path / 'manual'
  expected = {}
  raw_ids = np.array(sorted(label_table.SYNTHIA_IDS | {25}))
  for i in range(3):
    stem = f'{i:07d}'
    image = _save_rgb(f'{root}/RGB/{stem}.png', 19, 27, i)
    class_ids = np.random.RandomState(i).choice(raw_ids, (19, 27))
    bgr = np.zeros((19, 27, 3), np.uint16)
    bgr[..., 2] = class_ids                                   # R: class id
    bgr[..., 1] = np.random.RandomState(10 + i).randint(0, 60000, (19, 27))
    bgr[..., 0] = np.random.RandomState(20 + i).randint(0, 60000, (19, 27))
    os.makedirs(root / 'GT' / 'LABELS', exist_ok=True)
    assert cv2.imwrite(str(root / 'GT' / 'LABELS' / f'{stem}.png'), bgr)
    table = np.full(256, 255, np.uint8)
    for raw, train in label_table.SYNTHIA_ID_TO_TRAINID.items():
      table[raw] = train
    expected[stem] = (image, table[class_ids], int((class_ids == 25).sum()))
  # PIL would have read something else: the test data can tell them apart
  pil = np.asarray(Image.open(root / 'GT' / 'LABELS' / '0000000.png'))
  assert not np.array_equal(pil[..., 0], expected['0000000'][1])
  builders.build('synthia', str(tmp_path / 'out'), manual_dir=str(root))
  records = _read_split(str(tmp_path / 'out'), 'synthia', 'train')
  assert sorted(records) == sorted(expected)
  for stem, (image, train, _) in expected.items():
    np.testing.assert_array_equal(records[stem][0], image)
    np.testing.assert_array_equal(records[stem][1], train)
  outside = _metadata(str(tmp_path / 'out'), 'synthia')['train'][
      'label_ids_outside_table']
  assert outside == {'25': sum(e[2] for e in expected.values())}
  assert set(np.unique(np.concatenate([r[1].ravel() for r in
                                       records.values()]))) <= set(
                                           label_table.CLASS_SETS[16]) | {255}


# -------------------------------------------------------------- Synscapes --

def test_synscapes_without_zero_padding(tmp_path):
  root = tmp_path / 'manual'
  expected = {}
  for stem in ('1', '2', '10'):
    image = _save_rgb(f'{root}/img/rgb/{stem}.png', 18, 36, int(stem))
    ids = _cityscapes_ids((18, 36), int(stem))
    _save_gray(f'{root}/img/class/{stem}.png', ids)
    os.makedirs(root / 'meta', exist_ok=True)
    (root / 'meta' / f'{stem}.json').write_text(json.dumps({'scene': {}}))
    expected[stem] = (image, label_table.ID_TO_TRAINID[ids])
  builders.build('synscapes', str(tmp_path / 'out'), manual_dir=str(root))
  records = _read_split(str(tmp_path / 'out'), 'synscapes', 'train')
  assert sorted(records) == sorted(expected)
  for stem, (image, train) in expected.items():
    np.testing.assert_array_equal(records[stem][0], image)
    np.testing.assert_array_equal(records[stem][1], train)


# ------------------------------------------------------------- Cityscapes --

def test_cityscapes_splits_with_city_folders(tmp_path):
  root = tmp_path / 'manual'
  expected = {}
  layout = {'train': ('train', ['aachen', 'bochum']), 'validation':
            ('val', ['frankfurt']), 'test': ('test', ['berlin'])}
  seed = 0
  for split, (folder, cities) in layout.items():
    for city in cities:
      for frame in (19, 20):
        seed += 1
        stem = f'{city}_000000_{frame:06d}'
        image = _save_rgb(f'{root}/leftImg8bit/{folder}/{city}/{stem}'
                          '_leftImg8bit.png', 16, 32, seed)
        if split == 'test':
          expected[(split, stem)] = (image, np.full((16, 32), 255, np.uint8))
          continue
        ids = _cityscapes_ids((16, 32), seed)
        _save_gray(f'{root}/gtFine/{folder}/{city}/{stem}_gtFine_labelIds.png',
                   ids)
        expected[(split, stem)] = (image, label_table.ID_TO_TRAINID[ids])
  builders.build('spcl_cityscapes', str(tmp_path / 'out'), manual_dir=str(root))
  for split in layout:
    records = _read_split(str(tmp_path / 'out'), 'spcl_cityscapes',
                          split)
    wanted = {stem: v for (s, stem), v in expected.items() if s == split}
    assert sorted(records) == sorted(wanted)
    for stem, (image, train) in wanted.items():
      np.testing.assert_array_equal(records[stem][0], image)
      np.testing.assert_array_equal(records[stem][1], train)


def test_manual_files_reads_extracted_and_zipped_alike(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'a' / 'x.txt').write_bytes(b'extracted')
  with zipfile.ZipFile(tmp_path / 'b.zip', 'w') as z:
    z.writestr('b/y.txt', b'zipped')
  files = segmentation_builder.ManualFiles(str(tmp_path))
  assert files.read('a/x.txt') == b'extracted'
  assert files.read('b/y.txt') == b'zipped'
  assert files.list('b', '.txt') == ['b/y.txt'] and files.has_dir('a')
  assert io.BytesIO(files.read('b/y.txt')).read() == b'zipped'


def test_no_builder_name_collides_with_a_tfds_builder():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  registered = set(tfds.list_builders(with_community_datasets=False))
  for key, builder in builders.DATASETS.items():
    assert builder.name == key
    # a registered name must be our own builder (sim2real_demo registers)
    if key in registered:
      assert tfds.builder_cls(key) is builder, key
  assert default.get_config().data.target == 'spcl_cityscapes'
