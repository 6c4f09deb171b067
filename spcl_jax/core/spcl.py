"""The SPCL method as pure, jit-able functions (SPEC §2).

Everything here is a function of arrays and of explicit state dataclasses
(`PrototypeBank`, `PrototypeInitSums`); nothing reads globals. Under `jax.jit`
with batches sharded over a mesh, every reduction over the batch (class sums,
counts, histograms) is a reduction over the *global* batch: XLA inserts the
cross-device (and cross-host) collectives.

Conventions: class ids are ints in [0, C); `ignore_index` (255) and any value
outside [0, C) count as ignored (the data layer reports such values).
Nearest resizing follows PyTorch's 'nearest' rule, bilinear upsampling aligns
corners, as in the released code.
"""

from typing import Literal

import flax
import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255
_EPS = 1e-12  # as torch.nn.functional.normalize


# ----------------------------------------------------------------- helpers --

def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _check_labels(name: str, labels, expected_shape=None) -> None:
  _check(jnp.issubdtype(labels.dtype, jnp.integer),
         f'{name} must hold integer class ids, got dtype {labels.dtype}')
  if expected_shape is not None:
    _check(tuple(labels.shape) == tuple(expected_shape),
           f'{name} has shape {tuple(labels.shape)}, expected '
           f'{tuple(expected_shape)}')


def valid_mask(labels: jax.Array, num_classes: int) -> jax.Array:
  """True where `labels` is a class id in [0, num_classes)."""
  return (labels >= 0) & (labels < num_classes)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12), with a finite gradient at x = 0."""
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, _EPS * _EPS))


def nearest_resize(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of [B, H, W] label maps to [B, h, w], with
  PyTorch's `interpolate(mode='nearest')` rule: output index i reads input
  index floor(i * H / h). Never creates a value absent from the input."""
  _check(labels.ndim == 3, f'labels must be [B, H, W], got {labels.shape}')
  height, width = labels.shape[1:]
  rows = (np.arange(size[0]) * height) // size[0]
  cols = (np.arange(size[1]) * width) // size[1]
  return labels[:, rows][:, :, cols]


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] bilinear weights with corners aligned."""
  if n_out == 1 or n_in == 1:
    position = np.zeros(n_out)
  else:
    position = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  low = np.clip(np.floor(position).astype(int), 0, n_in - 1)
  high = np.minimum(low + 1, n_in - 1)
  frac = position - low
  matrix = np.zeros((n_out, n_in), np.float32)
  matrix[np.arange(n_out), low] += 1 - frac
  matrix[np.arange(n_out), high] += frac
  return matrix


def upsample_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, h, w, C] -> [B, H, W, C], bilinear with corners aligned
  (`interpolate(mode='bilinear', align_corners=True)`), as two matmuls."""
  _check(x.ndim == 4, f'expected [B, h, w, C], got {x.shape}')
  rows = jnp.asarray(_interpolation_matrix(size[0], x.shape[1]), x.dtype)
  cols = jnp.asarray(_interpolation_matrix(size[1], x.shape[2]), x.dtype)
  return jnp.einsum('Hh,bhwc,Ww->bHWc', rows, x, cols)


# ------------------------------------------------------------------ losses --

def contrastive_loss(features: jax.Array, prototypes: jax.Array,
                     mask: jax.Array, temperature: float,
                     ignore_index: int = IGNORE_INDEX,
                     image_weights: jax.Array | None = None) -> jax.Array:
  """Eq. 1/4/6: mean over valid pixels of CE(f·μ / τ, mask).

  features [..., N] (unnormalised; L2-normalised here), prototypes [C, N]
  (receive no gradient), mask int [...] with class ids or `ignore_index`.
  Returns a float32 scalar, 0 (not NaN, zero gradient) if no pixel is valid.
  With `image_weights` [B] (features [B, ..., N]): Σ_b w_b Σ_pixels of b
  CE instead of the mean (`image_loss_weights`).
  """
  _check(prototypes.ndim == 2, f'prototypes must be [C, N], got '
         f'{prototypes.shape}')
  _check(features.shape[-1] == prototypes.shape[-1],
         f'features {features.shape} and prototypes {prototypes.shape} '
         'differ in the feature dimension N')
  _check_labels('mask', mask, features.shape[:-1])
  num_classes = prototypes.shape[0]
  f = l2_normalize(features.astype(jnp.float32))
  mu = jax.lax.stop_gradient(prototypes.astype(jnp.float32))
  logits = jnp.einsum('...n,cn->...c', f, mu) / temperature
  return _masked_cross_entropy(logits, mask, num_classes, ignore_index,
                               image_weights)


def _valid_pixels(labels, num_classes, ignore_index):
  """True where a masked cross-entropy counts the pixel."""
  return valid_mask(labels, num_classes) & (labels != ignore_index)


def _masked_cross_entropy(logits, labels, num_classes, ignore_index,
                          image_weights=None):
  """Mean CE over pixels whose label is in [0, C) and not `ignore_index`;
  with `image_weights` [B], Σ_b w_b (sum of image b's pixel CEs)."""
  valid = _valid_pixels(labels, num_classes, ignore_index)
  safe = jnp.where(valid, labels, 0)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, safe[..., None].astype(jnp.int32),
                               axis=-1)[..., 0]
  per_pixel = jnp.where(valid, log_z - picked, 0.0)
  if image_weights is not None:
    _check(image_weights.shape == labels.shape[:1],
           f'image_weights {image_weights.shape} do not match the '
           f'{labels.shape[0]} images of labels {labels.shape}')
    per_image = jnp.sum(per_pixel.reshape(labels.shape[0], -1), axis=1)
    return jnp.sum(image_weights * per_image)
  return jnp.sum(per_pixel) / jnp.maximum(jnp.sum(valid), 1)


def segmentation_loss(logits: jax.Array, labels: jax.Array,
                      temperature: float = 1.0,
                      ignore_index: int = IGNORE_INDEX,
                      image_weights: jax.Array | None = None) -> jax.Array:
  """Pixel cross-entropy of logits [..., C] / temperature against labels
  [...] (the released code uses temperature 1.8 on upsampled source logits),
  averaged over valid pixels; 0 when none is valid. With `image_weights`
  [B] (labels [B, ...]): Σ_b w_b Σ_pixels of b CE (`image_loss_weights`)."""
  _check_labels('labels', labels, logits.shape[:-1])
  logits = logits.astype(jnp.float32) / temperature
  return _masked_cross_entropy(logits, labels, logits.shape[-1], ignore_index,
                               image_weights)


def image_loss_weights(labels: jax.Array, num_classes: int,
                       images_per_mean: int,
                       ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """float32 [B] weights w of labels [B, ...]'s images for which
  Σ_b w_b (sum of image b's pixel losses) is the mean, over the runs of
  `images_per_mean` consecutive images, of each run's mean over its valid
  pixels: every run weighs the same whatever its number of valid pixels (a
  run without any weighs 0 but still counts in the mean). The released
  code's per-GPU losses with `images_per_mean` images per GPU, the
  gradients averaged over the GPUs."""
  _check(images_per_mean >= 1 and labels.shape[0] % images_per_mean == 0,
         f'{images_per_mean} images per loss mean do not divide the batch '
         f'of {labels.shape[0]} images')
  valid = _valid_pixels(labels, num_classes, ignore_index)
  counts = jnp.sum(valid.reshape(labels.shape[0], -1), axis=1)
  runs = counts.reshape(-1, images_per_mean).sum(axis=1).astype(jnp.float32)
  run_weights = 1.0 / (runs.shape[0] * jnp.maximum(runs, 1.0))
  return jnp.repeat(run_weights, images_per_mean)


def bce_with_logits(logits: jax.Array, target: float) -> jax.Array:
  """Mean binary cross-entropy of logits against a constant target."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(jnp.maximum(logits, 0) - logits * target
                  + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def generator_adversarial_loss(d_target_logits: jax.Array,
                               source_label: float = 0.0) -> jax.Array:
  """AdaptSegNet: the segmenter wants D to take target outputs for source."""
  return bce_with_logits(d_target_logits, source_label)


def discriminator_loss(d_source_logits: jax.Array, d_target_logits: jax.Array,
                       source_label: float = 0.0,
                       target_label: float = 1.0) -> jax.Array:
  """AdaptSegNet: half BCE on source outputs (label 0) plus half on target
  outputs (label 1); the caller stops gradients into the segmenter."""
  return 0.5 * (bce_with_logits(d_source_logits, source_label)
                + bce_with_logits(d_target_logits, target_label))


# ------------------------------------------------------------------- masks --

def source_mask(labels: jax.Array, logits: jax.Array,
                ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """M_s: labels [B, H, W] nearest-downsampled to the logits' resolution
  [B, h, w, C], kept only where argmax(logits) equals them, else ignore."""
  _check(logits.ndim == 4, f'logits must be [B, h, w, C], got {logits.shape}')
  _check_labels('labels', labels)
  _check(labels.ndim == 3 and labels.shape[0] == logits.shape[0],
         f'labels {labels.shape} do not match logits {logits.shape}')
  small = nearest_resize(labels, logits.shape[1:3]).astype(jnp.int32)
  agree = jnp.argmax(logits, axis=-1) == small
  return jnp.where(agree & valid_mask(small, logits.shape[-1]), small,
                   ignore_index)


def pseudo_labels(probabilities: jax.Array, class_thresholds: jax.Array,
                  ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """argmax class of probabilities [..., C], or `ignore_index` where its
  probability is below that class's threshold (a class of threshold 0 is
  always kept). This is the released rule; Eq. 5 read literally could pick a
  non-argmax class above its own lower threshold."""
  _check(class_thresholds.shape == probabilities.shape[-1:],
         f'class_thresholds {class_thresholds.shape} do not match '
         f'probabilities {probabilities.shape}')
  predicted = jnp.argmax(probabilities, axis=-1)
  confidence = jnp.max(probabilities, axis=-1)
  keep = confidence >= class_thresholds[predicted]
  return jnp.where(keep, predicted, ignore_index).astype(jnp.int32)


TargetMaskMode = Literal['offline', 'online']


def target_mask(mode: TargetMaskMode, logits: jax.Array,
                offline_labels: jax.Array | None = None,
                class_thresholds: jax.Array | None = None,
                ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """M_t at the logits' resolution [B, h, w].

  'offline' (released code): the stored pseudo-label map [B, H, W] of the
    warm-up model, nearest-downsampled.
  'online' (paper Eq. 5): pseudo labels of the current predictions with the
    per-class thresholds.
  """
  if mode == 'offline':
    _check(offline_labels is not None, "target_mask('offline') needs "
           'offline_labels (the stored pseudo-label maps)')
    _check_labels('offline_labels', offline_labels)
    small = nearest_resize(offline_labels, logits.shape[1:3]).astype(jnp.int32)
    return jnp.where(valid_mask(small, logits.shape[-1]), small, ignore_index)
  if mode == 'online':
    _check(class_thresholds is not None, "target_mask('online') needs "
           'class_thresholds')
    return pseudo_labels(jax.nn.softmax(logits.astype(jnp.float32), -1),
                         class_thresholds, ignore_index)
  raise ValueError(f"target mask mode must be 'offline' or 'online', got "
                   f'{mode!r}')


# ---------------------------------------------------------- prototype bank --

@flax.struct.dataclass
class PrototypeBank:
  """prototypes [C, N]: the class centres (means of L2-normalised features);
  num_updates [C]: how many Eq. 3 updates each class received."""
  prototypes: jax.Array
  num_updates: jax.Array


@flax.struct.dataclass
class PrototypeInitSums:
  """Mergeable partial sums of Eq. 2: per class, the sum over images of the
  image's mean normalised feature, and the number of such images."""
  sum_of_image_means: jax.Array  # [C, N] float32
  num_images: jax.Array          # [C] float32

  @classmethod
  def zeros(cls, num_classes: int, num_features: int) -> 'PrototypeInitSums':
    return cls(jnp.zeros((num_classes, num_features), jnp.float32),
               jnp.zeros((num_classes,), jnp.float32))

  def merge(self, other: 'PrototypeInitSums') -> 'PrototypeInitSums':
    return PrototypeInitSums(self.sum_of_image_means + other.sum_of_image_means,
                             self.num_images + other.num_images)


def _one_hot_mask(mask: jax.Array, num_classes: int) -> jax.Array:
  return jax.nn.one_hot(jnp.where(valid_mask(mask, num_classes), mask, -1),
                        num_classes, dtype=jnp.float32)


def _check_features_mask(features, mask):
  _check(features.ndim == 4, f'features must be [B, h, w, N], got '
         f'{features.shape}')
  _check_labels('mask', mask, features.shape[:-1])


def prototype_init_sums(features: jax.Array, mask: jax.Array,
                        num_classes: int) -> PrototypeInitSums:
  """Eq. 2 partial sums of one batch: features [B, h, w, N], mask [B, h, w]
  (M_s). An image contributes to class c only if c occurs in its mask."""
  _check_features_mask(features, mask)
  f = l2_normalize(features.astype(jnp.float32))
  one_hot = _one_hot_mask(mask, num_classes)              # [B, h, w, C]
  sums = jnp.einsum('bhwc,bhwn->bcn', one_hot, f)
  counts = jnp.sum(one_hot, axis=(1, 2))                   # [B, C]
  means = sums / jnp.maximum(counts, 1)[..., None]
  return PrototypeInitSums(jnp.sum(means, axis=0),
                           jnp.sum(counts > 0, axis=0).astype(jnp.float32))


def prototype_bank_from_sums(sums: PrototypeInitSums) -> PrototypeBank:
  """μ_c = mean over the images containing c of their class-c mean feature;
  a class seen in no image gets a zero prototype."""
  prototypes = sums.sum_of_image_means / jnp.maximum(sums.num_images,
                                                     1)[:, None]
  return PrototypeBank(prototypes,
                       jnp.zeros(prototypes.shape[:1], jnp.int32))


def class_feature_sums(features: jax.Array, mask: jax.Array,
                       num_classes: int):
  """Per-class sums [C, N] of normalised features and pixel counts [C] over
  the whole (global) batch."""
  _check_features_mask(features, mask)
  f = l2_normalize(features.astype(jnp.float32))
  one_hot = _one_hot_mask(mask, num_classes)
  return (jnp.einsum('bhwc,bhwn->cn', one_hot, f),
          jnp.sum(one_hot, axis=(0, 1, 2)))


def update_prototypes(bank: PrototypeBank, sums: jax.Array, counts: jax.Array,
                      alpha: float,
                      decay_absent_classes: bool = False) -> PrototypeBank:
  """Eq. 3: μ_c ← α μ_c + (1 − α) m_c with m_c = sums_c / counts_c.

  A class absent from the batch (count 0) keeps its prototype; with
  `decay_absent_classes=True` it is multiplied by α instead (the released
  code's behaviour, m_c = 0). The result is never differentiated through."""
  _check(sums.shape == bank.prototypes.shape,
         f'sums {sums.shape} do not match prototypes {bank.prototypes.shape}')
  _check(counts.shape == bank.prototypes.shape[:1],
         f'counts {counts.shape} do not match prototypes '
         f'{bank.prototypes.shape}')
  sums, counts = jax.lax.stop_gradient((sums, counts))
  present = counts > 0
  batch_mean = sums / jnp.maximum(counts, 1)[:, None]
  updated = alpha * bank.prototypes + (1.0 - alpha) * batch_mean
  if decay_absent_classes:
    new = updated  # batch_mean is 0 for absent classes
  else:
    new = jnp.where(present[:, None], updated, bank.prototypes)
  return PrototypeBank(new, bank.num_updates + present.astype(jnp.int32))


# ---------------------------------------------------- confidence thresholds --

def confidence_histogram(probabilities: jax.Array, num_bins: int,
                         valid: jax.Array | None = None) -> jax.Array:
  """int32 [C, num_bins]: for each predicted class, the histogram of the
  max-softmax confidences of the pixels predicted as that class, over bins
  [b / num_bins, (b + 1) / num_bins) (1.0 falls in the last bin).

  Mergeable by addition; accumulate across batches on the host in int64
  (a Cityscapes-scale split exceeds int32 per class)."""
  num_classes = probabilities.shape[-1]
  predicted = jnp.argmax(probabilities, axis=-1)
  confidence = jnp.max(probabilities, axis=-1).astype(jnp.float32)
  bins = jnp.clip(jnp.floor(confidence * num_bins).astype(jnp.int32), 0,
                  num_bins - 1)
  index = predicted * num_bins + bins
  if valid is not None:
    _check(valid.shape == index.shape,
           f'valid {valid.shape} does not match pixels {index.shape}')
    index = jnp.where(valid, index, num_classes * num_bins)
  counts = jnp.bincount(index.ravel(), length=num_classes * num_bins + 1)
  return counts[:-1].reshape(num_classes, num_bins).astype(jnp.int32)


def class_thresholds_from_histogram(histogram, cap: float = 0.9,
                                    quantile: float = 0.5) -> np.ndarray:
  """σ_c = min(q-quantile of class c's confidences, cap); 0 for a class never
  predicted. q = 0.5 (the median) is the released rule; a larger q keeps the
  most confident 1 - q of each class's pixels (class-balanced selection as
  in CBST, whose first round keeps the top 20 %: q = 0.8, cap 1). Host-side
  (numpy, int64 counts), once per split.

  For n values the quantile lies between the ranks floor(q (n-1)) and
  ceil(q (n-1)) (for the median the two middle ranks); both are located in
  their bins and the two bin centres averaged. Each centre is within half a
  bin of its value, so the worst-case error versus `numpy.median` is
  1 / (2 * num_bins) (5e-4 with the default 1000 bins), before the cap."""
  histogram = np.asarray(histogram, np.int64)
  _check(histogram.ndim == 2, f'histogram must be [C, bins], got '
         f'{histogram.shape}')
  _check(0.0 < quantile < 1.0, f'quantile must be in (0, 1), got {quantile}')
  num_classes, num_bins = histogram.shape
  cumulative = np.cumsum(histogram, axis=1)
  totals = cumulative[:, -1]
  thresholds = np.zeros(num_classes, np.float32)
  for c in np.nonzero(totals)[0]:
    position = quantile * (totals[c] - 1)
    lower = np.searchsorted(cumulative[c], np.floor(position), side='right')
    upper = np.searchsorted(cumulative[c], np.ceil(position), side='right')
    centre = (lower + upper + 1) / (2.0 * num_bins)
    thresholds[c] = min(centre, cap)
  return thresholds
