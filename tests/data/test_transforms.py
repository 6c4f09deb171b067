"""The per-record transforms: geometric alignment of image and label, resize
filters, colour jitter (ours and the release's PIL path), record checks."""

import colorsys

import grain
import numpy as np
import pytest
from PIL import Image

from spcl_jax.core import labels as label_table
from spcl_jax.data import loaders
from spcl_jax.data import resize
from spcl_jax.data import transforms as transforms_lib
from tests.data import fake_records


def _take(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_geometric_transforms_keep_image_and_label_aligned():
  source = [fake_records.palette_record(s) for s in range(6)]
  spec = loaders.PipelineSpec('unused', 'unused', '.', global_batch_size=2,
                              scale_range=(0.5, 1.5), crop=(50, 70), flip=True,
                              mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, seed=3)
  colours = np.vstack([label_table.PALETTE, [[0, 0, 0]]]).astype(np.float32)
  for batch in _take(loaders.train_loader(spec, source=source), 12):
    for image, label, image_id in zip(batch['image'], batch['label'],
                                      batch['image_id']):
      original = np.asarray(fake_records.palette_record(int(str(image_id)[1:]))['label'])
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
  record = fake_records.palette_record(5)
  image, label = record['image'], record['label'][..., 0]
  rng = np.random.default_rng(0)
  outcomes = set()
  for _ in range(20):
    out_image, out_label = transforms_lib.scale_crop_flip(image, label, rng, None, None,
                                                          True, (0, 0, 0))
    flipped = np.array_equal(out_label, label[:, ::-1])
    assert flipped or np.array_equal(out_label, label)
    np.testing.assert_array_equal(out_image,
                                  image[:, ::-1] if flipped else image)
    outcomes.add(flipped)
  assert outcomes == {True, False}
  # a crop larger than the image pads: image with the fill, label with 255
  out_image, out_label = transforms_lib.scale_crop_flip(image, label, rng, None, (60, 70),
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
  out_image, out_label = transforms_lib.scale_crop_flip(
      image, label, np.random.default_rng(0), (0.5, 1.5), None, False,
      (0, 0, 0), interpolation)
  scale = np.random.default_rng(0).uniform(0.5, 1.5)   # the same draw
  height, width = int(round(40 * scale)), int(round(60 * scale))
  assert out_label.shape == (height, width)
  np.testing.assert_array_equal(out_image, np.asarray(
      Image.fromarray(image).resize((width, height), resample)))
  np.testing.assert_array_equal(out_label, np.asarray(
      Image.fromarray(label).resize((width, height), Image.NEAREST)))
  spec = loaders.PipelineSpec('sim2real_demo/tiny', 'target_train', '/nowhere', 8,
                              interpolation=interpolation, scale_range=(0.5, 1.5),
                              crop=(32, 64))
  (scaler,) = [op for op in loaders.transforms_of(spec)
               if isinstance(op, transforms_lib.RandomScaleCropFlip)]
  assert scaler.interpolation == interpolation


def test_nearest_resize_never_creates_label_values():
  rng = np.random.RandomState(0)
  label = rng.choice([0, 5, 13, 255], (37, 53)).astype(np.uint8)
  image = np.zeros((37, 53, 3), np.uint8)
  for size in ((11, 17), (80, 120), (37, 100)):
    _, resized = resize.resize_pair(image, label, size)
    assert resized.shape == size
    assert set(np.unique(resized)) <= {0, 5, 13, 255}


def test_color_jitter_matches_colorsys_and_identity():
  rgb = np.random.RandomState(0).rand(50, 3).astype(np.float32)
  hsv = transforms_lib._rgb_to_hsv(rgb)  # pylint: disable=protected-access
  expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
  np.testing.assert_allclose(hsv, expected, atol=1e-5)
  np.testing.assert_allclose(transforms_lib._hsv_to_rgb(hsv), rgb, atol=1e-5)  # pylint: disable=protected-access
  image = np.random.RandomState(1).randint(0, 256, (8, 9, 3)).astype(np.uint8)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(transforms_lib.color_jitter(image, rng, 0, 0, 0, 0),
                                image)
  jittered = transforms_lib.color_jitter(image, np.random.default_rng(0), 0.5, 0, 0, 0)
  factor = jittered.astype(float).sum() / image.astype(float).sum()
  assert 0.5 <= factor <= 1.5 and factor != 1.0


def test_size_mismatch_names_the_image_id():
  record = fake_records.palette_record(0)
  record['label'] = record['label'][:-1]
  spec = loaders.PipelineSpec('unused', 'unused', '.', global_batch_size=1)
  with pytest.raises(ValueError, match="'r0'.*differ"):
    next(iter(loaders.train_loader(spec, source=[record])))


def test_out_of_range_label_values_are_ignored_and_counted():
  record = fake_records.palette_record(1)
  record['label'] = record['label'].copy()
  record['label'][0, :7] = 40
  spec = loaders.PipelineSpec('unused', 'unused', '.', global_batch_size=1)
  batch = next(iter(loaders.train_loader(spec, source=[record])))
  assert (batch['label'][0, 0, :7] == 255).all()
  assert batch['invalid_label_pixels'][0] == 7


def test_check_record_maps_stored_trainids_to_the_label_space():
  record = {'image': np.zeros((1, 5, 3), np.uint8), 'image_id': b'r0',
            'label': np.array([[10, 9, 18, 40, 255]], np.uint8)}
  out = transforms_lib.CheckRecord(16, 'synthia16').map(record)
  # sky -> 9, terrain -> ignored, bicycle -> 15, 40 invalid (counted)
  np.testing.assert_array_equal(out['label'], [[9, 255, 15, 255, 255]])
  assert out['invalid_label_pixels'] == 1


def test_resize_interpolation_bicubic_for_images_nearest_for_labels():
  rng = np.random.RandomState(0)
  image = rng.randint(0, 256, (12, 20, 3)).astype(np.uint8)
  label = rng.randint(0, 19, (12, 20)).astype(np.uint8)
  element = {'image': image, 'label': label}
  bicubic = transforms_lib.Resize((7, 9), True, 'bicubic').map(element)
  bilinear = transforms_lib.Resize((7, 9)).map(element)
  expected = np.asarray(Image.fromarray(image).resize((9, 7), Image.BICUBIC))
  np.testing.assert_array_equal(bicubic['image'], expected)
  assert not np.array_equal(bicubic['image'], bilinear['image'])
  np.testing.assert_array_equal(bicubic['label'], resize.resize_label(label,
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
      ours = transforms_lib.adjust_color(ours, op, factors[op])
      theirs = reference[op](theirs, factors[op])
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_released_color_jitter_draws_like_torchvision_and_applies_them():
  """`released_color_jitter` applies `jitter_params`' order and factors
  (torchvision's ranges) with torchvision's functions."""
  import torchvision.transforms.functional as F  # pylint: disable=g-import-not-at-top
  reference = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation,
               F.adjust_hue)
  for seed in range(6):
    order, factors = transforms_lib.jitter_params(np.random.default_rng(seed),
                                                  0.5, 0.5, 0.5, 0.2)
    assert sorted(order) == [0, 1, 2, 3]
    assert all(0.5 <= f <= 1.5 for f in factors[:3])
    assert -0.2 <= factors[3] <= 0.2
    for image in _jitter_images():
      expected = Image.fromarray(image)
      for op in order:
        expected = reference[op](expected, factors[op])
      ours = transforms_lib.released_color_jitter(image, np.random.default_rng(seed),
                                                  0.5, 0.5, 0.5, 0.2)
      assert ours.dtype == np.uint8 and ours.shape == image.shape
      np.testing.assert_array_equal(ours, np.asarray(expected))
  # a zero parameter skips its operation (torchvision: factor None)
  _, factors = transforms_lib.jitter_params(np.random.default_rng(0), 0, 0.5, 0, 0)
  assert factors[0] is None and factors[2] is None and factors[3] is None
  image = _jitter_images()[0]
  np.testing.assert_array_equal(
      transforms_lib.released_color_jitter(image, np.random.default_rng(0), 0, 0, 0, 0),
      image)


def test_released_color_jitter_is_deterministic_per_record():
  """Through grain's per-record generators: the same seed gives the same
  images, another seed others; the 'float' default is unchanged."""
  records = [{'image': image} for image in _jitter_images() * 2]
  jitter = transforms_lib.ColorJitter(0.5, 0.5, 0.5, 0.2, implementation='released')

  def run(op, seed):
    dataset = grain.MapDataset.source(records).random_map(op, seed=seed)
    return [element['image'] for element in dataset]

  first, again, other = run(jitter, 5), run(jitter, 5), run(jitter, 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))
  # the records at positions 0 and 2 are the same image, jittered apart
  assert not np.array_equal(first[0], first[2])
  floats = run(transforms_lib.ColorJitter(0.5, 0.5, 0.5, 0.2), 5)
  assert not all(np.array_equal(a, b) for a, b in zip(first, floats))


def test_color_jitter_rejects_bad_parameters():
  with pytest.raises(ValueError, match="'pil' is not one of"):
    transforms_lib.ColorJitter(0.5, 0.5, 0.5, 0.2, implementation='pil')
  with pytest.raises(ValueError, match=r'hue in \[0, 0.5\]'):
    transforms_lib.ColorJitter(0.5, 0.5, 0.5, 0.6)
  with pytest.raises(ValueError, match='>= 0'):
    transforms_lib.ColorJitter(-0.1, 0.5, 0.5, 0.2)
  with pytest.raises(ValueError, match=r'not in \[-0.5, 0.5\]'):
    transforms_lib.adjust_hue(Image.new('RGB', (2, 2)), 0.7)


def test_floor_rounding_truncates_the_scaled_size_as_the_release():
  """`data.scaled_size_rounding='floor'`: int(side * scale), the released
  RandomScale; 'round' rounds to the nearest. A scale of 0.5 + 0.7 / 40
  makes 40 rows 20.7: 20 floored, 21 rounded."""
  image = np.zeros((40, 60, 3), np.uint8)
  label = np.zeros((40, 60), np.uint8)

  class FixedScale:   # the rng's uniform draw is the scale
    def uniform(self, low, high):
      del low, high
      return 0.5 + 0.7 / 40

  sizes = {rounding: transforms_lib.scale_crop_flip(
      image, label, FixedScale(), (0.5, 1.5), None, False, (0, 0, 0),
      rounding=rounding)[1].shape for rounding in ('round', 'floor')}
  assert sizes == {'round': (21, 31), 'floor': (20, 31)}   # 60 -> 31.05
  spec = loaders.PipelineSpec('sim2real_demo/tiny', 'target_train', '/nowhere',
                              8, scale_range=(0.5, 1.5), crop=(32, 64),
                              scaled_size_rounding='floor')
  (scaler,) = [op for op in loaders.transforms_of(spec)
               if isinstance(op, transforms_lib.RandomScaleCropFlip)]
  assert scaler.rounding == 'floor'


def test_before_resize_jitters_the_stored_image_then_resizes_it():
  """`data.color_jitter_order='before_resize'` (the released order): the
  jitter, then the resize; 'after_resize' (ours) the other way round."""
  def kinds(order):
    spec = loaders.PipelineSpec('sim2real_demo/tiny', 'source_train',
                                '/nowhere', 8, size=(32, 64),
                                color_jitter=(0.5, 0.5, 0.5, 0.2),
                                color_jitter_order=order)
    return [type(op).__name__ for op in loaders.transforms_of(spec)
            if isinstance(op, (transforms_lib.Resize,
                               transforms_lib.ColorJitter))]
  assert kinds('after_resize') == ['Resize', 'ColorJitter']
  assert kinds('before_resize') == ['ColorJitter', 'Resize']
  with pytest.raises(ValueError, match="colour jitter order 'first'"):
    kinds('first')


def test_the_released_order_reaches_the_source_stream():
  from configs import demo  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import context  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import stage_graph  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.data.color_jitter_order = 'before_resize'
  config.data.scaled_size_rounding = 'floor'
  ctx = context.Context(config, '/nonexistent', None, None)
  source = context.train_specs(ctx, stage_graph.STAGE_BY_NAME['warmup'])[
      'source_iterator']
  assert source.color_jitter_order == 'before_resize'
  target = context.train_specs(ctx, stage_graph.STAGE_BY_NAME[
      'self_training'])['target_iterator']
  assert target.scaled_size_rounding == 'floor'
