"""Per-class file statistics of a built split (spcl_jax/data/
class_statistics.py): what they hold, where they are kept, that a run reads
them instead of the labels, and the splits they refuse."""

import io
import os

import numpy as np
import pytest

from spcl_jax.data import class_statistics
from spcl_jax.data import sources
from tests.data import fake_records


@pytest.fixture(scope='module')
def rare_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('rare_manual')
  data_dir = str(tmp_path_factory.mktemp('rare_tfds'))
  return data_dir, fake_records.build_rare_class_folder(str(root), data_dir)


def _expected_presence(data_dir, name):
  """bool [records, 19] from the records' own labels, in record order."""
  source = sources.open_source(name, 'train', data_dir)
  expected = np.zeros((len(source), 19), bool)
  for key in range(len(source)):
    index = int(source[key]['image_id'].decode())
    expected[key, fake_records.rare_class_trainids(index)] = True
  return expected


def test_statistics_are_computed_once_and_kept_with_the_build(
    rare_folder, monkeypatch, caplog):
  data_dir, name = rare_folder
  path = class_statistics.statistics_path(
      sources.dataset_directory(name, data_dir), 'train')
  if os.path.exists(path):
    os.remove(path)
  with caplog.at_level('INFO'):
    statistics = class_statistics.load_or_compute(name, 'train', data_dir,
                                                  threads=2)
  assert np.array_equal(statistics.present, _expected_presence(data_dir,
                                                               name))
  assert os.path.isfile(path)
  assert not [f for f in os.listdir(os.path.dirname(path)) if '.tmp' in f]
  assert f'class statistics of {name}:train' in caplog.text   # progress
  # the next use reads the file: no label is read again
  monkeypatch.setattr(class_statistics, 'compute', lambda *a, **k: 1 / 0)
  again = class_statistics.load_or_compute(name, 'train', data_dir)
  assert np.array_equal(again.present, statistics.present)
  # the dataset still opens with the file beside its shards
  assert len(sources.open_source(name, 'train', data_dir)) == (
      fake_records.RARE_FOLDER_RECORDS)


def test_a_label_space_picks_its_classes_columns():
  present = np.zeros((2, 19), bool)
  present[0, [9, 16, 18]] = True   # terrain, train, bicycle
  statistics = class_statistics.ClassStatistics(present)
  assert statistics.for_label_space('cityscapes19').shape == (2, 19)
  synthia = statistics.for_label_space('synthia16')   # no terrain, train
  assert synthia.shape == (2, 16) and synthia[0].sum() == 1 and synthia[0, 15]


def test_label_presence_ignores_255_and_invalid_values():
  label = np.array([[0, 255], [18, 40]], np.uint8)
  assert list(np.flatnonzero(class_statistics.label_presence(label))) == [
      0, 18]


def test_an_images_only_split_is_refused_naming_the_dataset(rare_folder):
  data_dir, name = rare_folder
  with pytest.raises(class_statistics.StatisticsError,
                     match=f'no label of {name}:bare holds any class'):
    class_statistics.load_or_compute(name, 'bare', data_dir, threads=0)
  assert not os.path.exists(class_statistics.statistics_path(
      sources.dataset_directory(name, data_dir), 'bare'))


@pytest.mark.parametrize('damage,message', [
    (b'not an npz', 'is not a class-statistics file'),
    ('format', 'has format 99, expected 1'),
    ('rows', r'holds bool \(3, 19\), expected bool \(20, 19\)'),
])
def test_a_damaged_statistics_file_is_named(rare_folder, damage, message):
  data_dir, name = rare_folder
  path = class_statistics.statistics_path(
      sources.dataset_directory(name, data_dir), 'train')
  good = class_statistics.load_or_compute(name, 'train', data_dir)
  try:
    if damage == 'format':
      buffer = io.BytesIO()
      np.savez(buffer, format=np.int64(99), present=good.present)
      data = buffer.getvalue()
    elif damage == 'rows':
      data = class_statistics.to_bytes(
          class_statistics.ClassStatistics(good.present[:3]))
    else:
      data = damage
    with open(path, 'wb') as f:
      f.write(data)
    with pytest.raises(class_statistics.StatisticsError) as e:
      class_statistics.load_or_compute(name, 'train', data_dir)
    assert str(e.value).startswith(path) and 'delete it' in str(e.value)
    assert e.match(message)
  finally:
    os.remove(path)


def test_statistics_are_kept_in_a_gs_data_dir(fake_gcs_server, tiny_demo,
                                              monkeypatch):
  """In a `gs://` data directory the file is one object beside the
  shards, read back by the next use."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with fake_gcs_server.environment_with_bucket('spcl-statistics'):
    url = 'gs://spcl-statistics/tfds'
    for folder, _, files in os.walk(tiny_demo):
      for file in files:
        local = os.path.join(folder, file)
        tf.io.gfile.copy(local, f'{url}/{os.path.relpath(local, tiny_demo)}',
                         overwrite=True)
    dataset = 'sim2real_demo/tiny'
    computed = class_statistics.load_or_compute(dataset, 'source_train', url,
                                                threads=2)
    path = class_statistics.statistics_path(
        sources.dataset_directory(dataset, url), 'source_train')
    assert path.startswith('gs://') and tf.io.gfile.exists(path)
    monkeypatch.setattr(class_statistics, 'compute', lambda *a, **k: 1 / 0)
    again = class_statistics.load_or_compute(dataset, 'source_train', url)
    assert np.array_equal(again.present, computed.present)
    assert computed.present[:, 0].all()   # road in every demo scene


def test_sampled_shares_count_every_draw():
  presence = np.array([[1, 0], [1, 1]], bool)
  assert list(class_statistics.sampled_shares(presence, [1, 1, 0, 1])) == [
      1.0, 0.75]
  assert list(class_statistics.sampled_shares(presence, [])) == [0.0, 0.0]
