"""The steps of the passes that do not train: evaluation (with optional
test-time augmentation), prediction, the prototype pass (Eq. 2 sums) and the
two pseudo-label passes (confidence histograms, then labels).

Every pass predicts at the label (output) resolution: the logits are
upsampled (bilinear, corners aligned) to it (`predict_full_resolution`).
Test-time augmentation averages the softmax probabilities of several input
scales and of the horizontally flipped input; scales multiply the size of
the (already resized) input batch, which is rescaled on the device
(bilinear). Without augmentation (`scales=(1.0,)`, no flip) the classes are
the argmax of the logits.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from spcl_jax.core import metrics
from spcl_jax.core import spcl


def predict_full_resolution(model, variables, images, label_size):
  """Logits upsampled (bilinear, corners aligned) to the label size."""
  out = model.apply(variables, images, train=False)
  return spcl.upsample_bilinear(out['logits'], label_size)


def make_prototype_init_step(model) -> Callable:
  """(variables, batch) -> Eq. 2 partial sums over the batch's M_s."""
  def step(variables, batch):
    out = model.apply(variables, batch['image'], train=False)
    mask = spcl.source_mask(batch['label'], out['logits'])
    mask = jnp.where(batch['valid'][:, None, None], mask, spcl.IGNORE_INDEX)
    return spcl.prototype_init_sums(out['features'], mask, model.num_classes)
  return step


def make_histogram_step(model, num_bins) -> Callable:
  """(variables, batch) -> int32 [C, bins] confidence histogram at the
  label resolution (padding images excluded)."""
  def step(variables, batch):
    logits = predict_full_resolution(model, variables, batch['image'],
                                     batch['label'].shape[1:3])
    valid = jnp.broadcast_to(batch['valid'][:, None, None],
                             logits.shape[:3])
    return spcl.confidence_histogram(jax.nn.softmax(logits, -1), num_bins,
                                     valid)
  return step


def make_pseudo_label_step(model) -> Callable:
  """(variables, batch, class_thresholds) -> uint8 pseudo labels at the
  label resolution."""
  def step(variables, batch, class_thresholds):
    logits = predict_full_resolution(model, variables, batch['image'],
                                     batch['label'].shape[1:3])
    return spcl.pseudo_labels(jax.nn.softmax(logits, -1),
                              class_thresholds).astype(jnp.uint8)
  return step


def check_scales(scales: Sequence[float]) -> tuple:
  scales = tuple(float(s) for s in scales)
  if not scales or any(not s > 0 for s in scales):
    raise ValueError(f'scales must be positive numbers, got {list(scales)}')
  return scales


def is_plain(scales: Sequence[float], flip: bool) -> bool:
  """No test-time augmentation: one pass at scale 1, no flip."""
  return tuple(scales) == (1.0,) and not flip


def scaled_size(size, scale: float) -> tuple:
  """(height, width) of an input of `size` at `scale` (at least 1 x 1)."""
  return tuple(max(1, int(round(d * scale))) for d in size)


def averaged_probabilities(model, variables, images, output_size,
                           scales: Sequence[float] = (1.0,),
                           flip: bool = False) -> jax.Array:
  """float32 [B, H, W, C] softmax probabilities at `output_size`, averaged
  over `scales` and (with `flip`) the horizontally flipped images."""
  batch, height, width, channels = images.shape
  total, passes = 0.0, 0
  for scale in scales:
    size = scaled_size((height, width), scale)
    x = images if size == (height, width) else jax.image.resize(
        images, (batch, *size, channels), 'bilinear')
    for flipped in ((False, True) if flip else (False,)):
      logits = predict_full_resolution(
          model, variables, x[:, :, ::-1] if flipped else x, output_size)
      probabilities = jax.nn.softmax(logits.astype(jnp.float32), -1)
      total += probabilities[:, :, ::-1] if flipped else probabilities
      passes += 1
  return total / passes


def predict_classes(model, variables, images, output_size,
                    scales: Sequence[float] = (1.0,),
                    flip: bool = False) -> jax.Array:
  """int32 [B, H, W] class indices at `output_size`."""
  if is_plain(scales, flip):
    return jnp.argmax(predict_full_resolution(model, variables, images,
                                              output_size), -1)
  return jnp.argmax(averaged_probabilities(model, variables, images,
                                           output_size, scales, flip), -1)


def make_eval_step(model, scales: Sequence[float] = (1.0,),
                   flip: bool = False) -> Callable:
  """(variables, batch) -> int32 [C, C] confusion matrix of the batch. The
  training stages evaluate with the default, no augmentation: the argmax of
  the logits upsampled to the label size."""
  scales = check_scales(scales)

  def step(variables, batch):
    classes = predict_classes(model, variables, batch['image'],
                              batch['label'].shape[1:3], scales, flip)
    return metrics.confusion_matrix(batch['label'], classes,
                                    model.num_classes)
  return step


def make_predict_step(model, scales: Sequence[float] = (1.0,),
                      flip: bool = False) -> Callable:
  """(variables, images, output_size) -> uint8 [B, H, W] class indices;
  jit it with `static_argnums=2`."""
  scales = check_scales(scales)

  def step(variables, images, output_size):
    return predict_classes(model, variables, images, tuple(output_size),
                           scales, flip).astype(jnp.uint8)
  return step
