"""Your own data (data_prep/folder.py), ACDC and Dark Zurich, on tiny fakes
written in each layout: every stored label pixel against the expected
trainId, the pairing rule, the defect report, label maps and their errors,
and the refusal to evaluate on a split built without labels."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_prep import builders
from data_prep import folder
from data_prep import segmentation_builder as sb
from spcl_jax.core import labels as label_table
from spcl_jax.data import sources
from spcl_jax.run import config_checks


def _rgb(seed, height=12, width=16):
  return np.random.RandomState(seed).randint(0, 256, (height, width, 3),
                                             dtype=np.uint8)


def _save(path, array, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, **kw).save(path)


def _save_image(path, image):
  """Saves `image`; returns what a reader decodes (JPEG is lossy)."""
  _save(path, image)
  return np.asarray(Image.open(path).convert('RGB'))


def _ids(seed, shape=(12, 16)):
  ids = np.random.RandomState(seed).randint(0, 34, shape).astype(np.uint8)
  ids[0, :3] = [7, 26, 33]   # road, car, bicycle are always there
  return ids


def _read_split(data_dir, dataset, split):
  return {r['image_id'].decode(): (r['image'], r['label'][..., 0])
          for r in sources.open_source(dataset, split, str(data_dir))}


def _metadata(data_dir, dataset):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder_from_directory(
      sources.dataset_directory(dataset, str(data_dir))).info.metadata


def _assert_records(records, expected):
  assert sorted(records) == sorted(expected)
  for key, (image, train) in expected.items():
    np.testing.assert_array_equal(records[key][0], image, err_msg=key)
    np.testing.assert_array_equal(records[key][1], train, err_msg=key)


# ------------------------------------------------- folder, label ids --

def write_id_folder(root):
  """`val`: nested folders, PNG and JPEG images, labels with and without
  the `_labelIds` suffix, one smaller label, one id outside the Cityscapes
  table (40), one image without its label, one label without its image.
  `train`: images only. Returns {split: {image_id: (image, trainIds)}}."""
  expected = {'val': {}, 'train': {}}
  layout = [('seq_a/0001', '.png', '_labelIds'), ('seq_a/0002', '.jpg', ''),
            ('seq_b/deep/0003', '.jpeg', '_labelIds'), ('0004', '.png', ''),
            ('0005', '.png', None)]                     # no label
  for i, (key, ext, suffix) in enumerate(layout):
    image = _save_image(f'{root}/val/images/{key}{ext}', _rgb(i))
    if suffix is None:
      continue
    ids = _ids(i, (9, 16) if key == '0004' else (12, 16))
    if key == 'seq_a/0002':
      ids[4, 2:7] = 40
    _save(f'{root}/val/labels/{key}{suffix}.png', ids)
    train = label_table.ID_TO_TRAINID[ids]
    if key == '0004':   # documented rule: nearest-neighbour to image size
      train = np.asarray(Image.fromarray(train).resize((16, 12),
                                                       Image.NEAREST))
    expected['val'][key] = (image, train)
  _save(f'{root}/val/labels/orphan_labelIds.png', _ids(9))  # no image
  for i in range(3):
    image = _save_image(f'{root}/train/images/clip{i % 2}/f{i}.jpg',
                        _rgb(10 + i, 10, 14))
    expected['train'][f'clip{i % 2}/f{i}'] = (
        image, np.full((10, 14), 255, np.uint8))
  return expected


@pytest.fixture(scope='module')
def id_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder_manual')
  expected = write_id_folder(str(root))
  data_dir = tmp_path_factory.mktemp('folder_tfds')
  builders.build('folder', str(data_dir), manual_dir=str(root),
                 name='my_city')
  return root, data_dir, expected


def test_folder_label_ids_are_mapped_and_paired_by_relative_path(id_folder):
  _, data_dir, expected = id_folder
  for split in ('val', 'train'):
    _assert_records(_read_split(data_dir, 'my_city', split), expected[split])
  meta = _metadata(data_dir, 'my_city')
  assert meta['val']['missing_pairs'] == [
      'val/images/0005.png: no label 0005_labelIds.png or 0005.png in '
      'labels/',
      'val/labels/orphan_labelIds.png: no image orphan.{png,jpg,jpeg} in '
      'images/']
  assert meta['val']['resized_labels'] == ['0004 (image 12x16, label 9x16)']
  assert meta['val']['label_ids_outside_table'] == {'40': 5}
  assert meta['val']['has_labels'] is True
  assert meta['train']['has_labels'] is False
  assert meta['build']['label_map']['source'] == 'cityscapes'


def test_evaluating_on_the_label_less_split_is_refused(id_folder):
  _, data_dir, _ = id_folder
  sources.check_labelled('my_city', 'val', str(data_dir))   # labelled: fine
  with pytest.raises(sources.UnlabelledSplitError) as e:
    sources.check_labelled('my_city', 'train', str(data_dir))
  assert "split 'train'" in str(e.value) and "'my_city'" in str(e.value)
  assert "['val']" in str(e.value)   # the labelled splits are named


def test_rebuilding_a_name_with_another_label_map_is_refused(id_folder,
                                                             tmp_path):
  root, data_dir, _ = id_folder
  builders.build('folder', str(data_dir), manual_dir=str(root),
                 name='my_city')   # same settings: the build is kept
  (tmp_path / 'map.json').write_text(json.dumps({'ids': {'7': 0}}))
  with pytest.raises(ValueError, match='already built'):
    builders.build('folder', str(data_dir), manual_dir=str(root),
                   name='my_city', label_map=str(tmp_path / 'map.json'))


# ------------------------------------------ folder, colours and maps --

PALETTE = {'128,64,128': 0, '#f423e8': 1, '0,0,142': 13, '10,20,30': 255}


def test_folder_colour_labels_with_a_map(tmp_path):
  root = tmp_path / 'manual'
  colours = np.array([[128, 64, 128], [244, 35, 232], [0, 0, 142],
                      [10, 20, 30], [1, 2, 3]], np.uint8)   # last: unknown
  train_ids = np.array([0, 1, 13, 255, 255], np.uint8)
  expected = {}
  for i in range(3):
    index = np.random.RandomState(i).randint(0, 5, (12, 16))
    index[0, 0] = 4
    image = _save_image(f'{root}/val/images/{i:03d}.png', _rgb(i))
    if i == 2:   # a palette PNG: read as colours
      label = Image.fromarray(index.astype(np.uint8), mode='P')
      label.putpalette(colours.ravel().tolist())
      label.save(root / 'val' / 'labels' / f'{i:03d}.png')
    else:
      _save(f'{root}/val/labels/{i:03d}.png', colours[index])
    expected[f'{i:03d}'] = (image, train_ids[index],
                            int((index == 4).sum()))
  label_map = tmp_path / 'colours.json'
  label_map.write_text(json.dumps({'colors': PALETTE}))
  builders.build('folder', str(tmp_path / 'out'), manual_dir=str(root),
                 name='painted', label_map=str(label_map))
  records = _read_split(tmp_path / 'out', 'painted', 'val')
  _assert_records(records, {k: v[:2] for k, v in expected.items()})
  meta = _metadata(tmp_path / 'out', 'painted')
  assert meta['val']['label_colors_outside_map'] == {
      '1,2,3': sum(v[2] for v in expected.values())}
  assert meta['build']['label_map']['colors']['244,35,232'] == 1


def test_folder_with_its_own_id_map(tmp_path):
  root = tmp_path / 'manual'
  ids = np.random.RandomState(0).randint(0, 6, (12, 16)).astype(np.uint16)
  ids[0, 0] = 700                                # a 16-bit id off the map
  _save(f'{root}/val/labels/a.png', ids)         # 16-bit single channel
  image = _save_image(f'{root}/val/images/a.png', _rgb(0))
  label_map = tmp_path / 'ids.json'
  label_map.write_text(json.dumps({'ids': {'0': 255, '1': 0, '2': 10,
                                           '3': 18, '4': 11}}))
  builders.build('folder', str(tmp_path / 'out'), manual_dir=str(root),
                 name='own_ids', label_map=str(label_map))
  lut = {0: 255, 1: 0, 2: 10, 3: 18, 4: 11}
  train = np.vectorize(lambda v: lut.get(int(v), 255))(ids).astype(np.uint8)
  _assert_records(_read_split(tmp_path / 'out', 'own_ids', 'val'),
                  {'a': (image, train)})
  outside = _metadata(tmp_path / 'out', 'own_ids')['val'][
      'label_ids_outside_table']
  assert outside == {'5': int((ids == 5).sum()), '700': 1}


@pytest.mark.parametrize('spec,message', [
    ({'ids': {'300': 1}}, 'entry "300": 1: label id 300 is outside 0..255'),
    ({'ids': {'-1': 1}}, 'entry "-1": 1: label id -1 is outside 0..255'),
    ({'ids': {'road': 0}}, "entry \"road\": 0: 'road' is not an integer"),
    ({'ids': {'7': 19}}, 'entry "7": 19: trainId 19 is not one of 0..18 or'),
    ({'ids': {'7': -1}}, 'entry "7": -1: trainId -1 is not one of'),
    ({'ids': {'7': '0'}}, "entry \"7\": '0': trainId '0' is not one of"),
    ({'colors': {'1,2': 0}}, "entry \"1,2\": 0: '1,2' is not a colour"),
    ({'colors': {'1,2,256': 0}}, "'1,2,256' is not a colour"),
    ({'colors': {'#12345': 0}}, "'#12345' is not a colour"),
    ({'colors': {'1,2,3': 0, '#010203': 1}}, 'color (1, 2, 3) is listed '
     'twice'),
    ({'colors': {'1,2,3': 40}}, 'trainId 40 is not one of'),
    ({'ids': {'7': 0}, 'colors': {'1,2,3': 0}}, 'exactly one key'),
    ({'labels': {}}, 'exactly one key, "ids" or "colors"'),
    ({'ids': {}}, '"ids" must be a non-empty object'),
    ([1, 2], 'exactly one key'),
])
def test_bad_label_maps_name_the_entry(tmp_path, spec, message):
  path = tmp_path / 'map.json'
  path.write_text(json.dumps(spec))
  with pytest.raises(folder.LabelMapError) as e:
    folder.read_label_map(str(path))
  assert str(path) in str(e.value) and message in str(e.value)


def test_unreadable_label_map_names_the_file(tmp_path):
  (tmp_path / 'map.json').write_text('{"ids": {7: 0}}')
  with pytest.raises(folder.LabelMapError, match='not valid JSON'):
    folder.read_label_map(str(tmp_path / 'map.json'))
  with pytest.raises(folder.LabelMapError, match='cannot be read'):
    folder.read_label_map(str(tmp_path / 'absent.json'))


# --------------------------------------------------- folder, bad input --

def _build(tmp_path, **kw):
  return builders.build('folder', str(tmp_path / 'out'),
                        manual_dir=str(tmp_path / 'manual'), **{
                            'name': 'mine', **kw})


def test_empty_split_folders_are_named(tmp_path):
  root = tmp_path / 'manual'
  _save(f'{root}/train/images/a.png', _rgb(0))
  (root / 'val' / 'images').mkdir(parents=True)       # empty split
  with pytest.raises(sb.LayoutError) as e:
    _build(tmp_path)
  assert f'{root / "val"} has no images/ folder (or it is empty)' in str(
      e.value)
  (root / 'val' / 'images' / 'notes.txt').write_text('no images here')
  with pytest.raises(sb.LayoutError) as e:
    _build(tmp_path)
  assert f'{root / "val" / "images"} holds no png/jpg/jpeg files' in str(
      e.value) and 'notes.txt' in str(e.value)


def test_labels_that_pair_with_no_image_are_refused(tmp_path):
  root = tmp_path / 'manual'
  for i in range(2):
    _save(f'{root}/val/images/img{i}.png', _rgb(i))
    _save(f'{root}/val/labels/img{i}_gtFine.png', _ids(i))
  with pytest.raises(sb.LayoutError) as e:
    _build(tmp_path)
  assert 'none of the 2 images has a label among the 2 labels' in str(e.value)
  assert "--label_suffix '_labelIds'" in str(e.value)
  assert 'labels/img0_gtFine.png' in str(e.value)
  _build(tmp_path, label_suffix='_gtFine')   # the suffix that pairs them
  assert sorted(_read_split(tmp_path / 'out', 'mine', 'val')) == ['img0',
                                                                  'img1']


def test_two_files_with_one_name_are_named(tmp_path):
  root = tmp_path / 'manual'
  _save(f'{root}/val/images/a.png', _rgb(0))
  _save(f'{root}/val/images/a.jpg', _rgb(0))
  with pytest.raises(sb.LayoutError) as e:
    _build(tmp_path)
  assert 'a: a.jpg, a.png' in str(e.value)
  os.remove(root / 'val' / 'images' / 'a.jpg')
  _save(f'{root}/val/labels/a.png', _ids(0))
  _save(f'{root}/val/labels/a_labelIds.png', _ids(0))
  with pytest.raises(sb.LayoutError) as e:
    _build(tmp_path)
  assert 'a: a.png, a_labelIds.png' in str(e.value)


def test_colour_labels_without_a_colour_map_fail_naming_the_file(tmp_path):
  root = tmp_path / 'manual'
  _save(f'{root}/val/images/a.png', _rgb(0))
  _save(f'{root}/val/labels/a.png', _rgb(1))
  with pytest.raises(sb.LabelFormatError) as e:
    _build(tmp_path)
  assert str(root / 'val' / 'labels' / 'a.png') in str(e.value)
  assert '"colors"' in str(e.value)


def test_unreadable_files_fail_unless_skipped(tmp_path):
  root = tmp_path / 'manual'
  for i in range(3):
    _save(f'{root}/val/images/{i}.png', _rgb(i))
    _save(f'{root}/val/labels/{i}.png', _ids(i))
  (root / 'val' / 'images' / '1.png').write_bytes(b'not a png')
  with pytest.raises(OSError) as e:
    _build(tmp_path)
  assert str(root / 'val' / 'images' / '1.png') in str(e.value)
  assert '--skip_corrupt' in str(e.value)
  _build(tmp_path, skip_corrupt=True)
  assert sorted(_read_split(tmp_path / 'out', 'mine', 'val')) == ['0', '2']


@pytest.mark.parametrize('name,message', [
    ('gta5', 'built-in dataset'), ('acdc', 'built-in dataset'),
    ('folder', 'built-in dataset'), ('My-Data', 'lower-case letters'),
    ('', 'lower-case letters'), (None, 'lower-case letters')])
def test_folder_names_are_checked(name, message):
  with pytest.raises(ValueError, match=message):
    builders.make_builder('folder', '/nowhere', name=name)


def test_name_and_label_map_are_only_for_folders():
  with pytest.raises(ValueError, match='--name and --label_map'):
    builders.make_builder('gta5', '/nowhere', name='mine')
  with pytest.raises(ValueError, match="no config 'haze'"):
    builders.make_builder('acdc/haze', '/nowhere')


# ------------------------------------------------------------------ ACDC --

def write_acdc(root):
  """Every condition: 2 train, 1 val frames (labelled; `_gt_labelTrainIds`
  and `_gt_labelColor` distractors beside the label ids); fog: a test
  frame and a `train_ref` frame (not read). Returns {(condition, split):
  {image_id: (image, trainIds)}}."""
  expected = {}
  seed = 0
  for c_index, condition in enumerate(('fog', 'night', 'rain', 'snow')):
    seq = f'GOPR04{c_index}0'
    for split, folder_name, count in (('train', 'train', 2),
                                      ('validation', 'val', 1),
                                      ('test', 'test', 1 if c_index == 0
                                       else 0)):
      for frame in range(count):
        seed += 1
        stem = f'{seq}_frame_{seed:06d}'
        image = _save_image(f'{root}/rgb_anon/{condition}/{folder_name}/{seq}/'
                            f'{stem}_rgb_anon.png', _rgb(seed))
        if split == 'test':
          expected.setdefault((condition, split), {})[stem] = (
              image, np.full((12, 16), 255, np.uint8))
          continue
        ids = _ids(seed)
        gt = f'{root}/gt/{condition}/{folder_name}/{seq}/{stem}'
        _save(f'{gt}_gt_labelIds.png', ids)
        _save(f'{gt}_gt_labelTrainIds.png', label_table.ID_TO_TRAINID[
            np.roll(ids, 1)])
        _save(f'{gt}_gt_labelColor.png', _rgb(100 + seed))
        expected.setdefault((condition, split), {})[stem] = (
            image, label_table.ID_TO_TRAINID[ids])
  _save_image(f'{root}/rgb_anon/fog/train_ref/GOPR0400/ref_rgb_anon.png',
              _rgb(99))
  return expected


def test_acdc_one_condition_and_all_conditions(tmp_path):
  root = tmp_path / 'manual'
  expected = write_acdc(str(root))
  out = tmp_path / 'out'
  builders.build('acdc/fog', str(out), manual_dir=str(root))
  builders.build('acdc', str(out), 'all', manual_dir=str(root))
  for split in ('train', 'validation', 'test'):
    _assert_records(_read_split(out, 'acdc/fog', split),
                    expected[('fog', split)])
  for split in ('train', 'validation'):
    wanted = {k: v for (c, s), records in expected.items() if s == split
              for k, v in records.items()}
    assert len(wanted) == {'train': 8, 'validation': 4}[split]
    _assert_records(_read_split(out, 'acdc/all', split), wanted)
  # rain, night, snow have no test folder: no test split for all four
  meta = _metadata(out, 'acdc/all')
  assert sorted(k for k in meta) == ['train', 'validation']
  assert _metadata(out, 'acdc/fog')['test']['has_labels'] is False
  with pytest.raises(sources.UnlabelledSplitError, match="split 'test'"):
    sources.check_labelled('acdc/fog', 'test', str(out))


def test_acdc_names_a_missing_condition(tmp_path):
  root = tmp_path / 'manual'
  write_acdc(str(root))
  for name in os.listdir(root / 'gt' / 'snow' / 'val' / 'GOPR0430'):
    os.remove(root / 'gt' / 'snow' / 'val' / 'GOPR0430' / name)
  with pytest.raises(sb.LayoutError) as e:
    builders.build('acdc/all', str(tmp_path / 'out'), manual_dir=str(root))
  assert str(root / 'gt' / 'snow' / 'val') in str(e.value)
  assert 'acdc.vision.ee.ethz.ch' in str(e.value)
  builders.build('acdc/fog', str(tmp_path / 'out'), manual_dir=str(root))


# ----------------------------------------------------------- Dark Zurich --

def test_dark_zurich_night_validation_and_unlabelled_training(tmp_path):
  root = tmp_path / 'manual'
  expected = {}
  seed = 0
  for time_of_day, count in (('night', 3), ('twilight', 2), ('day', 1)):
    for frame in range(count):
      seed += 1
      stem = f'GOPR0{seed}_frame_{frame:06d}'
      image = _save_image(f'{root}/rgb_anon/train/{time_of_day}/GOPR0{seed}/'
                          f'{stem}_rgb_anon.png', _rgb(seed))
      expected.setdefault(f'train_{time_of_day}', {})[stem] = (
          image, np.full((12, 16), 255, np.uint8))
  for frame in range(2):
    seed += 1
    stem = f'GOPR0356_frame_{frame:06d}'
    image = _save_image(f'{root}/rgb_anon/val/night/GOPR0356/{stem}'
                        '_rgb_anon.png', _rgb(seed))
    ids = _ids(seed)
    _save(f'{root}/gt/val/night/GOPR0356/{stem}_gt_labelIds.png', ids)
    _save(f'{root}/gt/val/night/GOPR0356/{stem}_gt_labelTrainIds.png',
          label_table.ID_TO_TRAINID[np.roll(ids, 1)])
    _save(f'{root}/gt/val/night/GOPR0356/{stem}_gt_invIds.png',
          np.roll(ids, 2))
    expected.setdefault('validation', {})[stem] = (
        image, label_table.ID_TO_TRAINID[ids])
  out = tmp_path / 'out'
  builders.build('dark_zurich', str(out), manual_dir=str(root))
  meta = _metadata(out, 'dark_zurich')
  assert sorted(meta) == sorted(expected)   # no test folder: no test split
  for split, wanted in expected.items():
    _assert_records(_read_split(out, 'dark_zurich', split), wanted)
    assert meta[split]['has_labels'] is (split == 'validation')
  from configs import cityscapes_to_darkzurich  # pylint: disable=g-import-not-at-top
  data = cityscapes_to_darkzurich.get_config().data
  sources.check_labelled(data.target, data.val_split, str(out))
  with pytest.raises(sources.UnlabelledSplitError, match="split 'train_night'"):
    sources.check_labelled(data.target, data.target_split, str(out))


# ---------------------------------------------------------------- configs --

@pytest.mark.parametrize('name,args,target', [
    ('cityscapes_to_acdc', '', 'acdc/all'),
    ('cityscapes_to_acdc', 'night', 'acdc/night'),
    ('cityscapes_to_acdc', 'fog,vgg16', 'acdc/fog'),
    ('cityscapes_to_acdc', 'snow,class_balanced', 'acdc/snow'),
    ('cityscapes_to_darkzurich', '', 'dark_zurich'),
    ('cityscapes_to_darkzurich', 'source_only,released', 'dark_zurich')])
def test_adaptation_configs_validate_with_the_spcl_recipe(name, args,
                                                          target):
  import importlib  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config(args)
  config_checks.validate(config, num_devices=4)
  data = config.data
  assert (data.source, data.source_split) == ('spcl_cityscapes', 'train')
  assert data.target == target and data.val_split == 'validation'
  assert data.target_split == ('train_night' if 'dark' in name else 'train')
  recipe = default.get_config()
  if not args:   # the SPCL recipe: only the data differ
    assert config.stages.to_dict() == recipe.stages.to_dict()
    assert config.model.to_dict() == recipe.model.to_dict()


def test_label_file_decoding_helpers_read_indices_not_colours():
  """Id maps read palette PNGs by index (GTA5-style), colour maps by
  colour: the same file gives different trainIds under the two."""
  index = np.array([[1, 2]], np.uint8)
  image = Image.fromarray(index, mode='P')
  image.putpalette([0, 0, 0, 7, 7, 7, 9, 9, 9] + [0] * 759)
  data = io.BytesIO()
  image.save(data, format='PNG')
  report = sb.BuildReport()
  by_id = folder.parse_label_map({'ids': {'1': 3, '2': 4}}, 'ids.json')
  by_colour = folder.parse_label_map({'colors': {'7,7,7': 5, '9,9,9': 6}},
                                     'colors.json')
  np.testing.assert_array_equal(by_id.train_ids(data.getvalue(), report),
                                [[3, 4]])
  np.testing.assert_array_equal(by_colour.train_ids(data.getvalue(), report),
                                [[5, 6]])


def test_an_unbuilt_dataset_names_its_build_command(tmp_path):
  with pytest.raises(sources.DatasetNotBuiltError) as e:
    sources.open_source('my_city', 'val', str(tmp_path))
  assert ('python -m data_prep.build --dataset folder --name my_city '
          '--manual_dir FOLDER') in str(e.value)
  with pytest.raises(sources.DatasetNotBuiltError) as e:
    sources.open_source('acdc/fog', 'train', str(tmp_path))
  assert '--dataset acdc --config fog' in str(e.value)
