"""SPCL core against straightforward numpy references and hand values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import spcl

RNG = np.random.RandomState(0)


def np_contrastive(features, prototypes, mask, tau):
  f = features.reshape(-1, features.shape[-1]).astype(np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  y = mask.reshape(-1)
  losses = []
  for fi, yi in zip(f, y):
    if 0 <= yi < prototypes.shape[0]:
      logits = prototypes @ fi / tau
      losses.append(np.log(np.exp(logits).sum()) - logits[yi])
  return np.mean(losses) if losses else 0.0


def _random_problem(b=2, h=5, w=7, n=6, c=4, ignore_fraction=0.3, seed=0):
  rng = np.random.RandomState(seed)
  features = rng.randn(b, h, w, n).astype(np.float32)
  prototypes = rng.randn(c, n).astype(np.float32)
  mask = rng.randint(0, c, (b, h, w))
  mask[rng.rand(b, h, w) < ignore_fraction] = 255
  return features, prototypes, mask


@pytest.mark.parametrize('tau', [100.0, 1.0, 0.07])
def test_contrastive_loss_matches_numpy(tau):
  features, prototypes, mask = _random_problem()
  ours = spcl.contrastive_loss(features, prototypes, mask, tau)
  np.testing.assert_allclose(ours, np_contrastive(features, prototypes, mask,
                                                  tau), rtol=1e-5)


def test_contrastive_loss_hand_computed():
  # f = (3, 4) -> (0.6, 0.8); μ = I; τ = 0.5: logits (1.2, 1.6), label 0.
  loss = spcl.contrastive_loss(jnp.array([[3.0, 4.0]]),
                               jnp.eye(2), jnp.array([0]), 0.5)
  np.testing.assert_allclose(loss, math.log(1 + math.exp(0.4)), rtol=1e-6)


def test_contrastive_gradients_prototypes_zero_masked_pixels_inert():
  features, prototypes, mask = _random_problem()
  grad_f, grad_mu = jax.grad(spcl.contrastive_loss, argnums=(0, 1))(
      features, prototypes, mask, 1.0)
  assert np.all(np.asarray(grad_mu) == 0)
  ignored = mask == 255
  assert np.all(np.asarray(grad_f)[ignored] == 0)
  assert np.abs(np.asarray(grad_f)[~ignored]).sum() > 0
  # changing ignored pixels changes neither the loss nor the gradients
  changed = features.copy()
  changed[ignored] = RNG.randn(ignored.sum(), features.shape[-1]) * 50
  np.testing.assert_allclose(spcl.contrastive_loss(changed, prototypes, mask, 1.0),
                             spcl.contrastive_loss(features, prototypes, mask, 1.0),
                             rtol=1e-6)
  grad_changed = jax.grad(spcl.contrastive_loss)(changed, prototypes, mask, 1.0)
  np.testing.assert_allclose(grad_changed, grad_f, rtol=1e-6, atol=1e-9)


def test_contrastive_loss_is_zero_without_valid_pixels():
  features, prototypes, mask = _random_problem()
  none_valid = np.full_like(mask, 255)
  loss, grad = jax.value_and_grad(spcl.contrastive_loss)(
      features, prototypes, none_valid, 100.0)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0)
  # zero feature vectors are not a NaN source either
  grad0 = jax.grad(spcl.contrastive_loss)(np.zeros_like(features), prototypes,
                                          mask, 1.0)
  assert np.all(np.isfinite(grad0))


def test_contrastive_loss_names_bad_shapes():
  features, prototypes, mask = _random_problem()
  with pytest.raises(ValueError, match=r'\(4, 5\)'):
    spcl.contrastive_loss(features, prototypes[:, :5], mask, 1.0)
  with pytest.raises(ValueError, match=r'\(2, 5, 6\)'):
    spcl.contrastive_loss(features, prototypes, mask[..., :6], 1.0)
  with pytest.raises(ValueError, match='float32'):
    spcl.contrastive_loss(features, prototypes, mask.astype(np.float32), 1.0)
  # ... and at trace time under jit
  with pytest.raises(ValueError, match='feature dimension'):
    jax.jit(spcl.contrastive_loss, static_argnums=3)(
        features, prototypes[:, :5], mask, 1.0)


def test_out_of_range_ids_are_ignored_not_wrapped():
  features, prototypes, mask = _random_problem(ignore_fraction=0.0)
  odd = mask.copy()
  odd[0, 0, :3] = [4, 17, -1]  # C = 4
  reference = mask.copy()
  reference[0, 0, :3] = 255
  np.testing.assert_allclose(spcl.contrastive_loss(features, prototypes, odd, 1.0),
                             spcl.contrastive_loss(features, prototypes,
                                                   reference, 1.0), rtol=1e-6)


def test_segmentation_loss_matches_torch_with_temperature():
  logits = RNG.randn(2, 9, 11, 5).astype(np.float32)
  labels = RNG.randint(0, 5, (2, 9, 11))
  labels[RNG.rand(2, 9, 11) < 0.2] = 255
  expected = torch.nn.functional.cross_entropy(
      torch.from_numpy(logits / 1.8).permute(0, 3, 1, 2),
      torch.from_numpy(labels), ignore_index=255)
  np.testing.assert_allclose(spcl.segmentation_loss(logits, labels, 1.8),
                             expected.item(), rtol=1e-5)


def _two_images_of_unequal_coverage():
  """Logits [2, 2, 2, 2] and labels [2, 2, 2]: image 0 has one valid pixel
  (CE ln 2), image 1 three (CE ln(4/3) each)."""
  logits = np.zeros((2, 2, 2, 2), np.float32)
  logits[1, ..., 0] = math.log(3.0)   # p(class 0) = 3/4 on image 1
  labels = np.zeros((2, 2, 2), np.int32)
  labels[0] = [[0, 255], [255, 255]]
  labels[1] = [[0, 0], [0, 255]]
  return jnp.asarray(logits), jnp.asarray(labels)


def test_per_image_loss_weights_average_each_images_own_mean():
  """Hand-computed: per image, (ln 2 + ln(4/3)) / 2; per pixel of the
  batch, (ln 2 + 3 ln(4/3)) / 4; one run of both images: the pixel mean."""
  logits, labels = _two_images_of_unequal_coverage()
  weights = spcl.image_loss_weights(labels, 2, images_per_mean=1)
  np.testing.assert_allclose(weights, [1 / 2, 1 / 6], rtol=1e-6)
  per_image = spcl.segmentation_loss(logits, labels, image_weights=weights)
  np.testing.assert_allclose(
      per_image, (math.log(2) + math.log(4 / 3)) / 2, rtol=1e-6)
  np.testing.assert_allclose(
      spcl.segmentation_loss(logits, labels),
      (math.log(2) + 3 * math.log(4 / 3)) / 4, rtol=1e-6)
  one_run = spcl.image_loss_weights(labels, 2, images_per_mean=2)
  np.testing.assert_allclose(one_run, [1 / 4, 1 / 4], rtol=1e-6)
  np.testing.assert_allclose(
      spcl.segmentation_loss(logits, labels, image_weights=one_run),
      spcl.segmentation_loss(logits, labels), rtol=1e-6)


def test_an_image_without_valid_pixels_weighs_zero_but_counts():
  """As a GPU whose loss has no valid pixel in the release (its gradient
  is 0 there, not NaN): the other image's mean is halved."""
  logits, labels = _two_images_of_unequal_coverage()
  labels = labels.at[0].set(255)
  loss = spcl.segmentation_loss(
      logits, labels, image_weights=spcl.image_loss_weights(labels, 2, 1))
  np.testing.assert_allclose(loss, math.log(4 / 3) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match='3 images per loss mean'):
    spcl.image_loss_weights(labels, 2, 3)


def test_per_image_contrastive_loss_is_the_mean_of_image_losses():
  rng = np.random.RandomState(0)
  features = jnp.asarray(rng.randn(3, 4, 5, 8), jnp.float32)
  prototypes = spcl.l2_normalize(jnp.asarray(rng.randn(6, 8), jnp.float32))
  mask = rng.randint(0, 6, (3, 4, 5)).astype(np.int32)
  mask[0, 1:] = 255   # 5, 20 and 16 valid pixels
  mask[2, 0] = 255
  mask = jnp.asarray(mask)
  weighted = spcl.contrastive_loss(
      features, prototypes, mask, 0.5,
      image_weights=spcl.image_loss_weights(mask, 6, 1))
  means = [spcl.contrastive_loss(features[i:i + 1], prototypes,
                                 mask[i:i + 1], 0.5) for i in range(3)]
  np.testing.assert_allclose(weighted, np.mean(means), rtol=1e-5)
  assert abs(float(weighted) - float(spcl.contrastive_loss(
      features, prototypes, mask, 0.5))) > 1e-4


def test_adversarial_losses_match_torch_bce():
  src, tgt = RNG.randn(2, 3, 4, 1), RNG.randn(2, 3, 4, 1)
  bce = torch.nn.functional.binary_cross_entropy_with_logits
  t = lambda x, v: bce(torch.tensor(x), torch.full(x.shape, v,
                                                   dtype=torch.float64)).item()
  np.testing.assert_allclose(spcl.generator_adversarial_loss(tgt),
                             t(tgt, 0.0), rtol=1e-5)
  np.testing.assert_allclose(spcl.discriminator_loss(src, tgt),
                             0.5 * (t(src, 0.0) + t(tgt, 1.0)), rtol=1e-5)


def test_resizing_matches_torch_interpolate():
  labels = RNG.randint(0, 19, (2, 37, 53))
  small = spcl.nearest_resize(jnp.asarray(labels), (5, 7))
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(labels[:, None].astype(np.float32)), size=(5, 7),
      mode='nearest')[:, 0].numpy()
  np.testing.assert_array_equal(small, expected)
  assert set(np.unique(small)) <= set(np.unique(labels))
  x = RNG.randn(2, 5, 7, 3).astype(np.float32)
  up = spcl.upsample_bilinear(jnp.asarray(x), (37, 53))
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=(37, 53),
      mode='bilinear', align_corners=True).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(up, expected, rtol=1e-5, atol=1e-5)


def test_source_mask_keeps_agreeing_pixels_only():
  labels = np.array([[[0, 0, 1, 1],
                      [2, 2, 255, 255],
                      [0, 0, 1, 1],
                      [2, 2, 1, 1]]])
  logits = np.zeros((1, 2, 2, 3), np.float32)
  logits[0, 0, 0, 0] = 1   # predicts 0, label 0 -> kept
  logits[0, 0, 1, 2] = 1   # predicts 2, label 1 -> ignored
  logits[0, 1, 0, 0] = 1   # predicts 0, label 0 -> kept
  logits[0, 1, 1, 1] = 1   # predicts 1, label 1 -> kept
  mask = spcl.source_mask(jnp.asarray(labels), jnp.asarray(logits))
  np.testing.assert_array_equal(mask, [[[0, 255], [0, 1]]])


def test_pseudo_labels_and_target_masks():
  probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7],
                    [0.5, 0.45, 0.05]], np.float32)
  thresholds = np.array([0.6, 0.9, 0.0], np.float32)
  np.testing.assert_array_equal(spcl.pseudo_labels(probs, thresholds),
                                [0, 255, 2, 255])
  logits = np.log(probs).reshape(1, 2, 2, 3)
  np.testing.assert_array_equal(
      spcl.target_mask('online', logits, class_thresholds=thresholds),
      [[[0, 255], [2, 255]]])
  stored = np.array([[[1, 1, 0, 0], [1, 1, 0, 0],
                      [255, 255, 2, 2], [255, 255, 2, 2]]])
  np.testing.assert_array_equal(
      spcl.target_mask('offline', logits, offline_labels=stored),
      [[[1, 0], [255, 2]]])
  with pytest.raises(ValueError, match="'offline' or 'online'"):
    spcl.target_mask('both', logits)


def test_a_confidence_equal_to_its_class_threshold_is_kept():
  # the release (`pseudo_label.py`): 255 where confidence < thres[class]
  probs = np.array([[0.5, 0.25, 0.25]], np.float32)
  at, above = np.float32(0.5), np.nextafter(np.float32(0.5), np.float32(1))
  below = np.nextafter(np.float32(0.5), np.float32(0))
  labels = [spcl.pseudo_labels(probs, np.array([t, 1, 1], np.float32))
            for t in (below, at, above)]
  np.testing.assert_array_equal(np.concatenate(labels), [0, 0, 255])


def np_prototype_init(features, mask, c):
  sums, nums = np.zeros((c, features.shape[-1])), np.zeros(c)
  for fi, mi in zip(features, mask):
    f = fi / np.linalg.norm(fi, axis=-1, keepdims=True)
    for k in range(c):
      if (mi == k).any():
        sums[k] += f[mi == k].mean(0)
        nums[k] += 1
  return np.where(nums[:, None] > 0, sums / np.maximum(nums, 1)[:, None], 0)


def test_prototype_initialisation_streams_and_merges():
  features, _, mask = _random_problem(b=6, c=5, seed=1)
  mask[:, :, :, ] = np.where(mask == 4, 255, mask)  # class 4 never seen
  total = spcl.PrototypeInitSums.zeros(5, features.shape[-1])
  for start in range(0, 6, 2):  # three batches of two images
    total = total.merge(spcl.prototype_init_sums(
        features[start:start + 2], mask[start:start + 2], 5))
  bank = spcl.prototype_bank_from_sums(total)
  np.testing.assert_allclose(bank.prototypes,
                             np_prototype_init(features, mask, 5), rtol=1e-5,
                             atol=1e-6)
  assert np.all(np.asarray(bank.prototypes[4]) == 0)


def test_prototype_update_eq3_and_absent_classes():
  bank = spcl.PrototypeBank(jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]),
                            jnp.zeros(3, jnp.int32))
  sums = jnp.array([[0.0, 2.0], [0.0, 0.0], [3.0, 3.0]])
  counts = jnp.array([2.0, 0.0, 3.0])
  new = spcl.update_prototypes(bank, sums, counts, alpha=0.1)
  np.testing.assert_allclose(new.prototypes, [[0.1, 0.9], [0.0, 1.0],
                                              [0.95, 0.95]], rtol=1e-6)
  np.testing.assert_array_equal(new.num_updates, [1, 0, 1])
  released = spcl.update_prototypes(bank, sums, counts, alpha=0.1,
                                    decay_absent_classes=True)
  np.testing.assert_allclose(released.prototypes[1], [0.0, 0.1], rtol=1e-6)
  frozen = spcl.update_prototypes(bank, sums, counts, alpha=1.0)
  np.testing.assert_allclose(frozen.prototypes, bank.prototypes)


def test_class_feature_sums_match_numpy():
  features, _, mask = _random_problem(c=4, seed=2)
  sums, counts = spcl.class_feature_sums(features, mask, 4)
  f = features / np.linalg.norm(features, axis=-1, keepdims=True)
  for k in range(4):
    np.testing.assert_allclose(sums[k], f[mask == k].sum(0), rtol=1e-5,
                               atol=1e-5)
    assert counts[k] == (mask == k).sum()


def _mesh_put(x):
  return jax.device_put(x, mesh_lib.batch_sharding(mesh_lib.make_mesh()))


def test_prototype_update_sharded_over_8_devices_equals_single():
  features, prototypes, mask = _random_problem(b=8, h=6, w=5, c=5, seed=3)
  mask[:4] = np.where(mask[:4] == 2, 255, mask[:4])  # class 2 only in half
  bank = spcl.PrototypeBank(jnp.asarray(prototypes), jnp.zeros(5, jnp.int32))

  @jax.jit
  def step(bank, features, mask):
    sums, counts = spcl.class_feature_sums(features, mask, 5)
    return spcl.update_prototypes(bank, sums, counts, 0.1)

  single = step(bank, features, mask)
  sharded = step(bank, _mesh_put(features), _mesh_put(mask))
  np.testing.assert_allclose(sharded.prototypes, single.prototypes, rtol=1e-6,
                             atol=1e-7)
  init_single = jax.jit(spcl.prototype_init_sums, static_argnums=2)(
      features, mask, 5)
  init_sharded = jax.jit(spcl.prototype_init_sums, static_argnums=2)(
      _mesh_put(features), _mesh_put(mask), 5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               init_sharded, init_single)


@pytest.mark.parametrize('num_bins', [100, 1000])
def test_thresholds_within_documented_error_of_numpy_median(num_bins):
  rng = np.random.RandomState(4)
  c, n = 5, 20001
  logits = rng.randn(n, c) * np.array([3.0, 1.0, 0.5, 2.0, 1.0])
  logits[:, 4] -= 100  # class 4 is never predicted
  logits[:, 0] += 4    # class 0 is confident: its median exceeds the cap
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)
  histogram = np.zeros((c, num_bins), np.int64)
  for chunk in np.array_split(np.arange(n), 7):  # streamed, merged by +
    histogram += np.asarray(spcl.confidence_histogram(probs[chunk], num_bins))
  thresholds = spcl.class_thresholds_from_histogram(histogram, cap=0.9)
  uncapped = spcl.class_thresholds_from_histogram(histogram, cap=1.0)
  predicted = np.argmax(probs, -1)
  confidence = np.max(probs, -1)
  for k in range(4):
    exact = np.median(confidence[predicted == k])
    assert abs(uncapped[k] - exact) <= 1 / (2 * num_bins) + 1e-7
    assert thresholds[k] == pytest.approx(min(exact, 0.9),
                                          abs=1 / (2 * num_bins) + 1e-7)
  assert np.median(confidence[predicted == 0]) > 0.9 and thresholds[0] == (
      pytest.approx(0.9))
  assert thresholds[4] == 0.0


@pytest.mark.parametrize('quantile', [0.2, 0.65, 0.8])
def test_quantile_thresholds_between_numpy_neighbour_ranks(quantile):
  rng = np.random.RandomState(5)
  num_bins, n = 1000, 30001
  probs = jax.nn.softmax(jnp.asarray(rng.randn(n, 3) * 2.0, jnp.float32), -1)
  histogram = np.asarray(spcl.confidence_histogram(probs, num_bins), np.int64)
  thresholds = spcl.class_thresholds_from_histogram(histogram, cap=1.0,
                                                    quantile=quantile)
  predicted, confidence = np.argmax(probs, -1), np.max(probs, -1)
  half_bin = 1 / (2 * num_bins) + 1e-7
  for k in range(3):
    values = confidence[predicted == k]
    low = np.quantile(values, quantile, method='lower')
    high = np.quantile(values, quantile, method='higher')
    assert low - half_bin <= thresholds[k] <= high + half_bin
  # a larger quantile keeps fewer pixels of every class
  assert np.all(spcl.class_thresholds_from_histogram(
      histogram, cap=1.0, quantile=0.9) > thresholds)


def test_quantile_hand_computed_and_checked():
  histogram = np.zeros((1, 10), np.int64)
  histogram[0, [1, 3, 5, 8]] = 1  # centres 0.15, 0.35, 0.55, 0.85
  # q = 0.8 of 4 values: rank 2.4 -> ranks 2 and 3, centres 0.55 and 0.85
  assert spcl.class_thresholds_from_histogram(
      histogram, cap=1.0, quantile=0.8)[0] == pytest.approx(0.7)
  assert spcl.class_thresholds_from_histogram(
      histogram, cap=0.6, quantile=0.8)[0] == pytest.approx(0.6)
  # q = 2/3: rank exactly 2 -> the third value's centre
  assert spcl.class_thresholds_from_histogram(
      histogram, cap=1.0, quantile=2 / 3)[0] == pytest.approx(0.55)
  with pytest.raises(ValueError, match='quantile must be in'):
    spcl.class_thresholds_from_histogram(histogram, quantile=1.0)


def test_median_even_count_hand_computed():
  histogram = np.zeros((1, 10), np.int64)
  histogram[0, [2, 7]] = 1  # values in [0.2, 0.3) and [0.7, 0.8)
  # numpy.median of the bin centres 0.25 and 0.75 is 0.5
  assert spcl.class_thresholds_from_histogram(histogram)[0] == pytest.approx(
      0.5)
