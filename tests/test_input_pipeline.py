"""grain pipelines: determinism, process sharding, resumable state,
geometric alignment, pseudo-label join, global arrays, errors."""

import colorsys
import hashlib
import os
import subprocess
import sys

import jax
import grain
import numpy as np
import pytest
from PIL import Image

from spcl_jax import input_pipeline as ip
from spcl_jax import labels as label_table
from spcl_jax import sharding

ROOT = os.path.dirname(os.path.dirname(__file__))


def _spec(data_dir, **kw):
  base = dict(dataset='sim2real_demo/tiny', split='source_train',
              data_dir=data_dir, global_batch_size=4,
              color_jitter=(0.5, 0.5, 0.5, 0.2), scale_range=(0.5, 1.5),
              crop=(48, 96), flip=True, seed=7)
  base.update(kw)
  return ip.PipelineSpec(**base)


def _take(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def _digest(batches):
  h = hashlib.sha256()
  for b in batches:
    h.update(b['image'].tobytes())
    h.update(b['label'].tobytes())
  return h.hexdigest()


def test_same_seed_same_batches_other_seed_other_batches(tiny_demo):
  a = _take(ip.train_loader(_spec(tiny_demo)), 3)
  b = _take(ip.train_loader(_spec(tiny_demo)), 3)
  c = _take(ip.train_loader(_spec(tiny_demo, seed=8)), 3)
  assert _digest(a) == _digest(b) != _digest(c)
  assert a[0]['image'].shape == (4, 48, 96, 3)
  assert a[0]['image'].dtype == np.float32 and a[0]['label'].dtype == np.int32


@pytest.mark.parametrize('workers', [0, 2])
def test_processes_read_slices_of_the_one_process_batches(tiny_demo,
                                                          workers):
  """Two or four processes' local batches, side by side, are the global
  batches of one process: the same records with the same random
  transforms, whatever the number of processes (and, for a given worker
  count, exactly the one-process stream)."""
  spec = _spec(tiny_demo, global_batch_size=4, worker_count=workers)
  one = _take(ip.train_loader(spec, process_index=0, process_count=1), 6)
  for count in (2, 4):
    parts = [_take(ip.train_loader(spec, process_index=p,
                                   process_count=count), 6)
             for p in range(count)]
    for n, batch in enumerate(one):
      for key in ('image_id', 'image', 'label'):
        side_by_side = np.concatenate([part[n][key] for part in parts])
        assert np.array_equal(side_by_side, batch[key]), (count, n, key)


def test_one_process_reads_grain_stream_positions_in_order():
  inner = grain.samplers.IndexSampler(
      10, shard_options=grain.sharding.ShardOptions(0, 1, True),
      shuffle=True, num_epochs=None, seed=3)
  for workers in (0, 3):
    one = ip.ProcessSliceSampler(inner, local_batch_size=4, process_index=0,
                                 process_count=1, worker_count=workers)
    assert [one[j].index for j in range(40)] == list(range(40))
  # two processes, two workers, local batch 2: worker w's k-th batch of
  # process p holds positions w + 2 (4 k + 2 p + i)
  second = ip.ProcessSliceSampler(inner, local_batch_size=2, process_index=1,
                                  process_count=2, worker_count=2)
  assert [second[j].index for j in range(8)] == [4, 5, 6, 7, 12, 13, 14, 15]
  assert 'process_index=1' in repr(second) and '0x' not in repr(second)


def test_eval_batches_cover_the_split_once_over_processes(tiny_demo):
  """Every record exactly once over the processes, in padded batches."""
  eval_spec = _spec(tiny_demo, split='target_val', global_batch_size=6,
                    shuffle=False)
  ids, lengths = [], set()
  for process in range(2):
    batches = list(ip.eval_batches(eval_spec, process_index=process,
                                   process_count=2))
    lengths.add(len(batches))
    for b in batches:
      assert (b['label'][~b['valid']] == 255).all()
      ids += [str(i) for i, v in zip(b['image_id'], b['valid']) if v]
  assert lengths == {3}
  assert sorted(ids) == [f'target_val_{i:06d}' for i in range(16)]


_RESUME = '''
import sys, hashlib, numpy as np
from spcl_jax import input_pipeline as ip
spec = ip.PipelineSpec(dataset='sim2real_demo/tiny', split='source_train',
    data_dir=sys.argv[1], global_batch_size=4,
    color_jitter=(0.5, 0.5, 0.5, 0.2), scale_range=(0.5, 1.5), crop=(48, 96),
    flip=True, seed=7, worker_count=int(sys.argv[3]))
it = iter(ip.train_loader(spec))
it.set_state(open(sys.argv[2], 'rb').read())
h = hashlib.sha256()
for _ in range(3):
  b = next(it)
  h.update(b['image'].tobytes()); h.update(b['label'].tobytes())
print('DIGEST', h.hexdigest())
del it
'''


@pytest.mark.parametrize('workers', [0, 2])
def test_iterator_state_restores_in_a_fresh_process(tiny_demo, tmp_path,
                                                    workers):
  # grain ties a state to the worker count: save and restore with the same
  it = iter(ip.train_loader(_spec(tiny_demo, worker_count=workers)))
  for _ in range(13):  # past the first epoch of 12 batches
    next(it)
  (tmp_path / 'state').write_bytes(it.get_state())
  expected = _digest([next(it) for _ in range(3)])
  del it
  result = subprocess.run([sys.executable, '-c', _RESUME, tiny_demo,
                           str(tmp_path / 'state'), str(workers)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
  assert f'DIGEST {expected}' in result.stdout


_WORKER_BATCHES = '''
import sys
from spcl_jax import input_pipeline as ip
from spcl_jax import sharding
if sys.argv[2] == 'uncopied':   # what the iterator did before
  ip.copy_out_of_shared_memory = lambda batch: batch
spec = ip.PipelineSpec(dataset='sim2real_demo/tiny', split='source_train',
    data_dir=sys.argv[1], global_batch_size=4, seed=7, worker_count=2)
iterator = ip.GlobalBatchIterator(ip.train_loader(spec),
                                  sharding.make_mesh())
for _ in range(3):
  batch = next(iterator)
iterator.close()
print('LABEL SUM', int(batch['label'].sum()))
'''


def test_worker_batches_leave_no_shared_memory_behind(tiny_demo):
  """Batches from grain's worker processes arrive in shared memory; a run
  that used them (and closed its iterator) leaves no block behind at exit.
  Without the copy, the last global batch kept its blocks alive past the
  end of the interpreter and Python's resource tracker reported them."""
  def run(mode):
    return subprocess.run([sys.executable, '-c', _WORKER_BATCHES, tiny_demo,
                           mode], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, 'XLA_FLAGS': ''})
  fixed = run('copied')
  assert 'LABEL SUM' in fixed.stdout
  assert 'leaked shared_memory' not in fixed.stderr, fixed.stderr[-3000:]
  # the check sees the failure it is there for
  assert 'leaked shared_memory' in run('uncopied').stderr


def _palette_record(seed, height=40, width=60):
  """An image whose label is recoverable from its pixel colours."""
  rng = np.random.RandomState(seed)
  label = np.kron(rng.randint(0, 19, (4, 6)), np.ones((10, 10), int))
  label[rng.rand(height, width) < 0.002] = 255
  colours = np.vstack([label_table.PALETTE, [[0, 0, 0]]]).astype(np.uint8)
  image = colours[np.where(label == 255, 19, label)]
  return {'image': image, 'label': label.astype(np.uint8)[..., None],
          'image_id': f'r{seed}'.encode()}


def test_geometric_transforms_keep_image_and_label_aligned():
  source = [_palette_record(s) for s in range(6)]
  spec = ip.PipelineSpec('unused', 'unused', '.', global_batch_size=2,
                         scale_range=(0.5, 1.5), crop=(50, 70), flip=True,
                         mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, seed=3)
  colours = np.vstack([label_table.PALETTE, [[0, 0, 0]]]).astype(np.float32)
  for batch in _take(ip.train_loader(spec, source=source), 12):
    for image, label, image_id in zip(batch['image'], batch['label'],
                                      batch['image_id']):
      original = np.asarray(_palette_record(int(str(image_id)[1:]))['label'])
      assert set(np.unique(label)) <= set(np.unique(original)) | {255}
      # interior pixels (uniform 3x3 label neighbourhood, not padding)
      interior = np.ones_like(label, bool)
      for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
          interior[1:-1, 1:-1] &= (np.roll(np.roll(label, dy, 0), dx, 1)
                                   == label)[1:-1, 1:-1]
      interior[[0, -1]] = interior[:, [0, -1]] = False
      interior &= label != 255
      distance = np.linalg.norm(image[..., None, :] - colours, axis=-1)
      recovered = np.argmin(distance, -1)
      assert interior.sum() > 100
      assert (recovered[interior] == label[interior]).mean() > 0.99


def test_flip_and_crop_move_image_and_label_together():
  record = _palette_record(5)
  image, label = record['image'], record['label'][..., 0]
  rng = np.random.default_rng(0)
  outcomes = set()
  for _ in range(20):
    out_image, out_label = ip.scale_crop_flip(image, label, rng, None, None,
                                              True, (0, 0, 0))
    flipped = np.array_equal(out_label, label[:, ::-1])
    assert flipped or np.array_equal(out_label, label)
    np.testing.assert_array_equal(out_image,
                                  image[:, ::-1] if flipped else image)
    outcomes.add(flipped)
  assert outcomes == {True, False}
  # a crop larger than the image pads: image with the fill, label with 255
  out_image, out_label = ip.scale_crop_flip(image, label, rng, None, (60, 70),
                                            False, (1, 2, 3))
  assert out_label.shape == (60, 70) and out_image.shape == (60, 70, 3)
  np.testing.assert_array_equal(out_label[:40, :60], label)  # nothing to crop
  np.testing.assert_array_equal(out_image[:40, :60], image)
  assert (out_label[40:] == 255).all() and (out_label[:, 60:] == 255).all()
  assert (out_image[40:] == (1, 2, 3)).all()
  assert (out_image[:, 60:] == (1, 2, 3)).all()


@pytest.mark.parametrize('interpolation,resample', [
    ('bilinear', Image.BILINEAR), ('bicubic', Image.BICUBIC)])
def test_random_scale_resizes_the_image_with_the_configured_filter(
    interpolation, resample):
  """`data.image_interpolation` reaches the random-scale resize too (the
  released transforms scale with bicubic), not only the fixed-size one."""
  rng_image = np.random.default_rng(3)
  image = rng_image.integers(0, 256, (40, 60, 3), np.uint8)
  label = rng_image.integers(0, 19, (40, 60), np.uint8)
  out_image, out_label = ip.scale_crop_flip(
      image, label, np.random.default_rng(0), (0.5, 1.5), None, False,
      (0, 0, 0), interpolation)
  scale = np.random.default_rng(0).uniform(0.5, 1.5)   # the same draw
  height, width = int(round(40 * scale)), int(round(60 * scale))
  assert out_label.shape == (height, width)
  np.testing.assert_array_equal(out_image, np.asarray(
      Image.fromarray(image).resize((width, height), resample)))
  np.testing.assert_array_equal(out_label, np.asarray(
      Image.fromarray(label).resize((width, height), Image.NEAREST)))
  spec = ip.PipelineSpec('sim2real_demo/tiny', 'target_train', '/nowhere', 8,
                         interpolation=interpolation, scale_range=(0.5, 1.5),
                         crop=(32, 64))
  (scaler,) = [op for op in ip.transforms_of(spec)
               if isinstance(op, ip.RandomScaleCropFlip)]
  assert scaler.interpolation == interpolation


def test_nearest_resize_never_creates_label_values():
  rng = np.random.RandomState(0)
  label = rng.choice([0, 5, 13, 255], (37, 53)).astype(np.uint8)
  image = np.zeros((37, 53, 3), np.uint8)
  for size in ((11, 17), (80, 120), (37, 100)):
    _, resized = ip.resize_pair(image, label, size)
    assert resized.shape == size
    assert set(np.unique(resized)) <= {0, 5, 13, 255}


def test_color_jitter_matches_colorsys_and_identity():
  rgb = np.random.RandomState(0).rand(50, 3).astype(np.float32)
  hsv = ip._rgb_to_hsv(rgb)  # pylint: disable=protected-access
  expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
  np.testing.assert_allclose(hsv, expected, atol=1e-5)
  np.testing.assert_allclose(ip._hsv_to_rgb(hsv), rgb, atol=1e-5)  # pylint: disable=protected-access
  image = np.random.RandomState(1).randint(0, 256, (8, 9, 3)).astype(np.uint8)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(ip.color_jitter(image, rng, 0, 0, 0, 0),
                                image)
  jittered = ip.color_jitter(image, np.random.default_rng(0), 0.5, 0, 0, 0)
  factor = jittered.astype(float).sum() / image.astype(float).sum()
  assert 0.5 <= factor <= 1.5 and factor != 1.0


def test_pseudo_labels_join_by_image_id(tiny_demo, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source('sim2real_demo/tiny', split='target_val',
                            data_dir=tiny_demo)
  ids = sorted(r['image_id'].decode() for r in source)
  fake = {i: np.full((64, 128), n % 19, np.uint8) for n, i in enumerate(ids)}
  for shard in range(2):
    with ip.PseudoLabelWriter(str(tmp_path / 'pl'), shard, 2) as writer:
      for image_id in ids[shard::2]:
        writer.add(image_id, fake[image_id])
  store = ip.PseudoLabelStore(str(tmp_path / 'pl'))
  assert len(store) == 16 and store.image_ids() == ids
  spec = _spec(tiny_demo, split='target_val', pseudo_labels=str(tmp_path / 'pl'),
               color_jitter=None, scale_range=None, crop=None, flip=False,
               shuffle=False, global_batch_size=16)
  batch = next(iter(ip.train_loader(spec)))
  for image_id, label in zip(batch['image_id'], batch['label']):
    np.testing.assert_array_equal(label, fake[str(image_id)])
  # a shard without its index (interrupted write) is not accepted
  os.remove(tmp_path / 'pl' / 'pseudo_labels-00001-of-00002.json')
  with pytest.raises(FileNotFoundError, match='missing'):
    ip.PseudoLabelStore(str(tmp_path / 'pl'))
  assert not [f for f in os.listdir(tmp_path / 'pl') if 'tmp' in f]


def test_an_eval_pass_names_its_purpose(caplog):
  """A stage that reads a split twice (pseudo labels: the confidences, then
  the labels) says which pass a progress line is about."""
  from spcl_jax import console  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  records = [_palette_record(i) for i in range(3)]
  spec = ip.PipelineSpec(dataset='x', split='target_train', data_dir='',
                         global_batch_size=2, shuffle=False)
  console.set_stage('pseudo_labels')
  try:
    with caplog.at_level(logging.INFO):
      for purpose in ('confidences', 'labels', ''):
        list(ip.eval_batches(spec, source=records, process_index=0,
                             process_count=1, purpose=purpose))
  finally:
    console.set_stage('')
  lines = [r.getMessage() for r in caplog.records]
  assert [line.split(' in ')[0] for line in lines] == [
      'pseudo_labels: target_train confidences 3 images',
      'pseudo_labels: target_train labels 3 images',
      'pseudo_labels: target_train 3 images']


def test_global_batches_are_sharded_over_the_mesh(tiny_demo):
  mesh = sharding.make_mesh()
  loader = ip.train_loader(_spec(tiny_demo, global_batch_size=8))
  iterator = ip.GlobalBatchIterator(loader, mesh)
  local = next(iter(ip.train_loader(_spec(tiny_demo, global_batch_size=8))))
  batch = next(iterator)
  assert isinstance(batch['image'], jax.Array)
  assert batch['image'].sharding.spec == jax.sharding.PartitionSpec('data')
  assert len(batch['image'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch['label']), local['label'])
  assert isinstance(batch['image_id'], np.ndarray)


def test_missing_dataset_names_dataset_directory_and_command(tmp_path):
  with pytest.raises(ip.DatasetNotBuiltError) as e:
    ip.open_source('sim2real_demo/tiny', 'source_train', str(tmp_path))
  message = str(e.value)
  assert "'sim2real_demo/tiny'" in message
  assert str(tmp_path / 'sim2real_demo' / 'tiny') in message
  assert (f'python -m data_prep.build --dataset sim2real_demo --config tiny '
          f'--data_dir {tmp_path}') in message


def test_size_mismatch_names_the_image_id():
  record = _palette_record(0)
  record['label'] = record['label'][:-1]
  spec = ip.PipelineSpec('unused', 'unused', '.', global_batch_size=1)
  with pytest.raises(ValueError, match="'r0'.*differ"):
    next(iter(ip.train_loader(spec, source=[record])))


def test_out_of_range_label_values_are_ignored_and_counted():
  record = _palette_record(1)
  record['label'] = record['label'].copy()
  record['label'][0, :7] = 40
  spec = ip.PipelineSpec('unused', 'unused', '.', global_batch_size=1)
  batch = next(iter(ip.train_loader(spec, source=[record])))
  assert (batch['label'][0, 0, :7] == 255).all()
  assert batch['invalid_label_pixels'][0] == 7


def test_check_record_maps_stored_trainids_to_the_label_space():
  record = {'image': np.zeros((1, 5, 3), np.uint8), 'image_id': b'r0',
            'label': np.array([[10, 9, 18, 40, 255]], np.uint8)}
  out = ip.CheckRecord(16, 'synthia16').map(record)
  # sky -> 9, terrain -> ignored, bicycle -> 15, 40 invalid (counted)
  np.testing.assert_array_equal(out['label'], [[9, 255, 15, 255, 255]])
  assert out['invalid_label_pixels'] == 1


def test_resize_interpolation_bicubic_for_images_nearest_for_labels():
  rng = np.random.RandomState(0)
  image = rng.randint(0, 256, (12, 20, 3)).astype(np.uint8)
  label = rng.randint(0, 19, (12, 20)).astype(np.uint8)
  element = {'image': image, 'label': label}
  bicubic = ip.Resize((7, 9), True, 'bicubic').map(element)
  bilinear = ip.Resize((7, 9)).map(element)
  expected = np.asarray(Image.fromarray(image).resize((9, 7), Image.BICUBIC))
  np.testing.assert_array_equal(bicubic['image'], expected)
  assert not np.array_equal(bicubic['image'], bilinear['image'])
  np.testing.assert_array_equal(bicubic['label'], ip.resize_label(label,
                                                                  (7, 9)))
  np.testing.assert_array_equal(bicubic['label'], bilinear['label'])


def _jitter_images():
  """A random image, a smooth one with greys (PIL's HSV s = 0 branch) and
  saturated primaries, uint8 [H, W, 3]."""
  noise = np.random.RandomState(2).randint(0, 256, (23, 31, 3)).astype(
      np.uint8)
  y, x = np.mgrid[0:23, 0:31]
  smooth = np.stack([x * 8, y * 11, (x + y) * 4], -1).clip(0, 255)
  smooth[:5, :5] = 128                                 # grey
  smooth[-3:, -3:] = [255, 0, 0]                       # saturated
  smooth[:3, -3:] = 0                                  # black
  return noise, smooth.astype(np.uint8)


@pytest.mark.parametrize('order', [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)])
@pytest.mark.parametrize('factors', [
    (1.37, 0.62, 1.41, 0.13), (0.5, 1.5, 0.5, -0.2), (0.0, 1.0, 0.0, 0.5),
    (1.5, 0.0, 1.5, -0.5), (0.93, 1.21, 1.07, -0.0042)])
def test_released_color_jitter_is_torchvisions_pil_path(order, factors):
  """For fixed factors and order: the bytes of torchvision's PIL
  adjust_brightness / contrast / saturation / hue."""
  import torchvision.transforms.functional as F  # pylint: disable=g-import-not-at-top
  reference = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation,
               F.adjust_hue)
  for image in _jitter_images():
    ours, theirs = Image.fromarray(image), Image.fromarray(image)
    for op in order:
      ours = ip.adjust_color(ours, op, factors[op])
      theirs = reference[op](theirs, factors[op])
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_released_color_jitter_draws_like_torchvision_and_applies_them():
  """`released_color_jitter` applies `jitter_params`' order and factors
  (torchvision's ranges) with torchvision's functions."""
  import torchvision.transforms.functional as F  # pylint: disable=g-import-not-at-top
  reference = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation,
               F.adjust_hue)
  for seed in range(6):
    order, factors = ip.jitter_params(np.random.default_rng(seed),
                                      0.5, 0.5, 0.5, 0.2)
    assert sorted(order) == [0, 1, 2, 3]
    assert all(0.5 <= f <= 1.5 for f in factors[:3])
    assert -0.2 <= factors[3] <= 0.2
    for image in _jitter_images():
      expected = Image.fromarray(image)
      for op in order:
        expected = reference[op](expected, factors[op])
      ours = ip.released_color_jitter(image, np.random.default_rng(seed),
                                      0.5, 0.5, 0.5, 0.2)
      assert ours.dtype == np.uint8 and ours.shape == image.shape
      np.testing.assert_array_equal(ours, np.asarray(expected))
  # a zero parameter skips its operation (torchvision: factor None)
  _, factors = ip.jitter_params(np.random.default_rng(0), 0, 0.5, 0, 0)
  assert factors[0] is None and factors[2] is None and factors[3] is None
  image = _jitter_images()[0]
  np.testing.assert_array_equal(
      ip.released_color_jitter(image, np.random.default_rng(0), 0, 0, 0, 0),
      image)


def test_released_color_jitter_is_deterministic_per_record():
  """Through grain's per-record generators: the same seed gives the same
  images, another seed others; the 'float' default is unchanged."""
  records = [{'image': image} for image in _jitter_images() * 2]
  jitter = ip.ColorJitter(0.5, 0.5, 0.5, 0.2, implementation='released')

  def run(op, seed):
    dataset = grain.MapDataset.source(records).random_map(op, seed=seed)
    return [element['image'] for element in dataset]

  first, again, other = run(jitter, 5), run(jitter, 5), run(jitter, 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  # the records at positions 0 and 2 are the same image, jittered apart
  assert not np.array_equal(first[0], first[2])
  floats = run(ip.ColorJitter(0.5, 0.5, 0.5, 0.2), 5)
  assert not all(np.array_equal(a, b) for a, b in zip(first, floats))


def test_color_jitter_rejects_bad_parameters():
  with pytest.raises(ValueError, match="'pil' is not one of"):
    ip.ColorJitter(0.5, 0.5, 0.5, 0.2, implementation='pil')
  with pytest.raises(ValueError, match=r'hue in \[0, 0.5\]'):
    ip.ColorJitter(0.5, 0.5, 0.5, 0.6)
  with pytest.raises(ValueError, match='>= 0'):
    ip.ColorJitter(-0.1, 0.5, 0.5, 0.2)
  with pytest.raises(ValueError, match=r'not in \[-0.5, 0.5\]'):
    ip.adjust_hue(Image.new('RGB', (2, 2)), 0.7)


@pytest.mark.parametrize('process_count,batch', [(1, 4), (2, 4), (3, 6)])
def test_threaded_eval_batches_equal_single_threaded(process_count, batch):
  """Decoding in threads changes nothing: the same records, order, padding
  and per-process slices as reading in one thread."""
  records = [_palette_record(s) for s in range(11)]
  spec = ip.PipelineSpec('unused', 'val', '.', global_batch_size=batch,
                         size=(20, 30), shuffle=False)

  def read(process, threads):
    return list(ip.eval_batches(spec, source=records, process_index=process,
                                process_count=process_count, threads=threads))

  per_process = -(-11 // process_count)
  for process in range(process_count):
    one, threaded = read(process, 0), read(process, 3)
    assert len(one) == len(threaded) == -(-per_process //
                                          (batch // process_count))
    for a, b in zip(one, threaded):
      assert a.keys() == b.keys()
      for key in a:
        assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype
        np.testing.assert_array_equal(a[key], b[key])
  # one process: exactly grain's plain batching of the transformed records
  dataset = grain.MapDataset.source(records)
  for op in ip.transforms_of(spec):
    dataset = dataset.map(op)
  plain = [dataset[i:i + batch] for i in range(0, 11, batch)]
  got = list(ip.eval_batches(spec, source=records, process_index=0,
                             process_count=1, threads=2))
  for elements, b in zip(plain, got):
    np.testing.assert_array_equal(b['image'][:len(elements)],
                                  np.stack([e['image'] for e in elements]))
    assert [str(i) for i in b['image_id'][:len(elements)]] == [
        e['image_id'] for e in elements]
  assert sum(int(b['valid'].sum()) for b in got) == 11
  assert not got[-1]['valid'][-1] and (got[-1]['label'][-1] == 255).all()
  with pytest.raises(ValueError, match='threads must be >= 0'):
    ip.eval_batches(spec, source=records, threads=-1)
  with pytest.raises(ValueError, match='fewer than one image per process'):
    ip.eval_batches(spec, source=records, process_index=0, process_count=7)
