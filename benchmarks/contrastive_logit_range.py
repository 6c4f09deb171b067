r"""The range of SPCL's contrastive logits f·μ / τ on a real-size batch.

  python -m benchmarks.contrastive_logit_range            # ResNet-101
  python -m benchmarks.contrastive_logit_range --model=deeplabv2_resnet18 \
      --base_width=8 --height=64 --width=128 --target_height=64 \
      --target_width=128

One source image (`--height` x `--width`, the recipe's 720x1280) and one
target image (`--target_height` x `--target_width`, 512x1024) of random
pixels go through DeepLab-v2 (`--model`, frozen BatchNorm) with the
backbone of `benchmarks.stand_in.stand_in_weights` (fresh
initialisation, identity residual blocks: finite through ResNet-101's 33
blocks; no ImageNet download). The prototypes are built as the pipeline
builds them (`spcl.prototype_init_sums`, Eq. 2: per image the class mean
of L2-normalised features, averaged over images) from a 19-class label map
of vertical bands over the source, so each class owns a different part of
the image. Then, for each `--temperature` τ, over every pixel of both
images: the logits f̂·μ / τ (f̂ the normalised feature), their bound 1/τ
(|f̂·μ| <= ||μ|| <= 1), and the per-pixel contrastive cross-entropy against
the band's class, whose distance from ln C is at most 2/τ.

Prints one row per τ; `--output` writes them as JSON.
"""

import json
import math
import os
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import stand_in
from spcl_jax.core import spcl
from spcl_jax import models

_MODEL = flags.DEFINE_string('model', 'deeplabv2_resnet101', 'DeepLab-v2 model')
_BASE_WIDTH = flags.DEFINE_integer('base_width', 64, 'model.base_width')
_HEIGHT = flags.DEFINE_integer('height', 720, 'source height')
_WIDTH = flags.DEFINE_integer('width', 1280, 'source width')
_TARGET_HEIGHT = flags.DEFINE_integer('target_height', 512, 'target height')
_TARGET_WIDTH = flags.DEFINE_integer('target_width', 1024, 'target width')
_TEMPERATURES = flags.DEFINE_list('temperature', ['100', '1', '0.1'],
                                  'temperatures τ')
_WEIGHTS_DIR = flags.DEFINE_string('weights_dir', '', 'where the stand-in '
                                   'weights are kept (default: a temporary '
                                   'directory)')
_OUTPUT = flags.DEFINE_string('output', '', 'also write the rows (JSON)')

NUM_CLASSES = 19


def band_labels(height: int, width: int, num_classes: int) -> np.ndarray:
  """[1, height, width]: class c on the c-th of `num_classes` vertical
  bands."""
  columns = np.arange(width) * num_classes // width
  return np.broadcast_to(columns, (1, height, width)).astype(np.int32)


def features_of(variables, model, image: np.ndarray) -> jax.Array:
  return jax.jit(lambda v, x: model.apply(v, x)['features'])(variables, image)


def logit_rows(source_features, target_features, temperatures) -> list:
  """One row per τ: the logits' range and bound, the prototypes' norms, the
  per-pixel contrastive loss's distance from ln C."""
  h, w = source_features.shape[1:3]
  labels = jnp.asarray(band_labels(h, w, NUM_CLASSES))
  bank = spcl.prototype_bank_from_sums(spcl.prototype_init_sums(
      source_features, labels, NUM_CLASSES))
  mu = bank.prototypes
  f = jnp.concatenate([
      spcl.l2_normalize(x.reshape(-1, x.shape[-1]))
      for x in (source_features, target_features)])
  dots = f @ mu.T                                         # [pixels, C]
  target_bands = band_labels(*target_features.shape[1:3], NUM_CLASSES)
  classes = jnp.concatenate([labels.reshape(-1),
                             jnp.asarray(target_bands).reshape(-1)])
  norms = jnp.linalg.norm(mu, axis=-1)
  rows = []
  for tau in temperatures:
    logits = dots / tau
    per_pixel = (jax.nn.logsumexp(logits, axis=-1)
                 - jnp.take_along_axis(logits, classes[:, None], -1)[:, 0])
    rows.append({
        'temperature': tau, 'pixels': int(f.shape[0]),
        'logit_min': float(logits.min()), 'logit_max': float(logits.max()),
        'bound': 1.0 / tau, 'prototype_norm_min': float(norms.min()),
        'prototype_norm_max': float(norms.max()),
        'loss_min': float(per_pixel.min()), 'loss_max': float(per_pixel.max()),
        'loss_mean': float(per_pixel.mean()), 'ln_c': math.log(NUM_CLASSES),
        'loss_bound': 2.0 / tau})
  return rows


def print_rows(rows) -> None:
  print(f'{"tau":>6} {"logit min":>11} {"logit max":>11} {"1/tau":>8} '
        f'{"|mu| min..max":>15} {"L_cl min":>9} {"L_cl max":>9} '
        f'{"ln C":>6} {"2/tau":>7}')
  for r in rows:
    print(f'{r["temperature"]:>6g} {r["logit_min"]:>11.5f} '
          f'{r["logit_max"]:>11.5f} {r["bound"]:>8.3g} '
          f'{r["prototype_norm_min"]:>7.3f}..{r["prototype_norm_max"]:.3f} '
          f'{r["loss_min"]:>9.4f} {r["loss_max"]:>9.4f} {r["ln_c"]:>6.3f} '
          f'{r["loss_bound"]:>7.3g}')


def main(argv):
  del argv
  temperatures = [float(t) for t in _TEMPERATURES.value]
  weights_root = _WEIGHTS_DIR.value or tempfile.mkdtemp()
  directory = stand_in.stand_in_weights(weights_root, _MODEL.value,
                                             _BASE_WIDTH.value)
  variables = models.load_pretrained(directory, _MODEL.value, NUM_CLASSES,
                                     jax.random.key(0),
                                     base_width=_BASE_WIDTH.value)
  model = models.create_model(_MODEL.value, NUM_CLASSES,
                              base_width=_BASE_WIDTH.value)
  rng = np.random.default_rng(0)
  source = rng.normal(size=(1, _HEIGHT.value, _WIDTH.value, 3)).astype(
      np.float32)
  target = rng.normal(size=(1, _TARGET_HEIGHT.value, _TARGET_WIDTH.value,
                            3)).astype(np.float32)
  rows = logit_rows(features_of(variables, model, source),
                    features_of(variables, model, target), temperatures)
  print(f'{_MODEL.value} (base width {_BASE_WIDTH.value}), stand-in '
        f'weights; source {_HEIGHT.value}x{_WIDTH.value}, target '
        f'{_TARGET_HEIGHT.value}x{_TARGET_WIDTH.value}; prototypes of '
        f'{NUM_CLASSES} classes (Eq. 2, bands of the source)')
  print_rows(rows)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)),
                exist_ok=True)
    with open(_OUTPUT.value, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  app.run(main)
