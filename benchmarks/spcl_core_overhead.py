r"""Cost of the SPCL terms (contrastive loss on source + target and the
prototype update) relative to a forward/backward pass of the same batch.

  python -m benchmarks.spcl_core_overhead --model=deeplabv2_resnet18 \
      --base_width=16 --height=128 --width=256 --batch=4

Prints, in one run: the time of a segmentation forward/backward step, of the
same step with the SPCL terms added, of the SPCL terms alone on given
features, and the ratios.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from spcl_jax.core import spcl
from spcl_jax import models

_MODEL = flags.DEFINE_string('model', 'deeplabv2_resnet18', 'model name')
_BASE_WIDTH = flags.DEFINE_integer('base_width', 16, 'ResNet stem width')
_HEIGHT = flags.DEFINE_integer('height', 128, 'image height')
_WIDTH = flags.DEFINE_integer('width', 256, 'image width')
_BATCH = flags.DEFINE_integer('batch', 4, 'images per domain')
_CLASSES = flags.DEFINE_integer('classes', 19, 'number of classes')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'timed repetitions')


def _time(fn, *args):
  jax.block_until_ready(fn(*args))  # compile + warm up
  start = time.perf_counter()
  for _ in range(_REPEATS.value):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / _REPEATS.value


def main(argv):
  del argv
  kw = {} if 'vgg' in _MODEL.value else {'base_width': _BASE_WIDTH.value}
  model = models.create_model(_MODEL.value, _CLASSES.value, **kw)
  variables = models.init_variables(model, jax.random.key(0))
  rng = np.random.RandomState(0)
  shape = (2 * _BATCH.value, _HEIGHT.value, _WIDTH.value)
  images = jnp.asarray(rng.randn(*shape, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, _CLASSES.value, shape), jnp.int32)
  out = model.apply(variables, images)
  num_features = out['features'].shape[-1]
  bank = spcl.PrototypeBank(
      spcl.l2_normalize(jnp.asarray(rng.randn(_CLASSES.value, num_features),
                                    jnp.float32)),
      jnp.zeros(_CLASSES.value, jnp.int32))
  n = _BATCH.value

  def spcl_terms(features, logits, labels, bank):
    source_mask = spcl.source_mask(labels[:n], logits[:n])
    target_mask = spcl.target_mask('offline', logits[n:],
                                   offline_labels=labels[n:])
    loss = (spcl.contrastive_loss(features[:n], bank.prototypes, source_mask,
                                  100.0)
            + spcl.contrastive_loss(features[n:], bank.prototypes,
                                    target_mask, 100.0))
    sums, counts = spcl.class_feature_sums(features[:n], source_mask,
                                           bank.prototypes.shape[0])
    return loss, spcl.update_prototypes(bank, sums, counts, 0.1)

  def step(params, bank, with_spcl):
    def loss_fn(params):
      out = model.apply({**variables, 'params': params}, images)
      logits = spcl.upsample_bilinear(out['logits'], shape[1:])
      loss = spcl.segmentation_loss(logits[:n], labels[:n], 1.8)
      new_bank = bank
      if with_spcl:
        cl, new_bank = spcl_terms(out['features'], out['logits'], labels, bank)
        loss = loss + cl
      return loss, new_bank
    return jax.grad(loss_fn, has_aux=True)(params)

  base = _time(jax.jit(lambda p, b: step(p, b, False)), variables['params'],
               bank)
  full = _time(jax.jit(lambda p, b: step(p, b, True)), variables['params'],
               bank)
  terms = _time(jax.jit(jax.grad(lambda f, l, y, b: spcl_terms(f, l, y, b)[0])),
                out['features'], out['logits'], labels, bank)
  print(f'model={_MODEL.value} batch={n}+{n} size={_HEIGHT.value}x'
        f'{_WIDTH.value} features={num_features} devices={jax.device_count()}'
        f' ({jax.devices()[0].platform})')
  print(f'forward/backward (segmentation only):  {base * 1e3:9.1f} ms')
  print(f'forward/backward + SPCL terms:         {full * 1e3:9.1f} ms   '
        f'ratio {full / base:.3f}')
  print(f'SPCL terms alone (loss grad + update): {terms * 1e3:9.1f} ms   '
        f'ratio {terms / base:.3f}')


if __name__ == '__main__':
  app.run(main)
