"""Inference of a trained segmenter with optional test-time augmentation:
the softmax probabilities of several input scales and of the horizontally
flipped input, averaged at the label (output) resolution.

Scales multiply the size of the (already resized) input batch, which is
rescaled on the device (bilinear); each pass's logits are upsampled to the
output size, as in evaluation (`train.predict_full_resolution`). Without
augmentation (`scales=(1.0,)`, no flip) the classes are the argmax of the
logits, exactly as `train.make_eval_step` computes them.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from spcl_jax import evaluation
from spcl_jax import train


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
      logits = train.predict_full_resolution(
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
    return jnp.argmax(train.predict_full_resolution(model, variables, images,
                                                    output_size), -1)
  return jnp.argmax(averaged_probabilities(model, variables, images,
                                           output_size, scales, flip), -1)


def make_eval_step(model, scales: Sequence[float] = (1.0,),
                   flip: bool = False) -> Callable:
  """(variables, batch) -> int32 [C, C] confusion matrix of the batch; the
  training loop's own step (`train.make_eval_step`) without augmentation."""
  scales = check_scales(scales)
  if is_plain(scales, flip):
    return train.make_eval_step(model)

  def step(variables, batch):
    classes = predict_classes(model, variables, batch['image'],
                              batch['label'].shape[1:3], scales, flip)
    return evaluation.confusion_matrix(batch['label'], classes,
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
