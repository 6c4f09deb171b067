"""Pretrains the demo's backbone on object-centric classification, the
demo's stand-in for ImageNet initialisation (`data_prep/pretrain_render.py`
says what the task is and why it is an honest analogue).

  python -m spcl_jax.pretrain --config=configs/demo_pretrain.py --output=DIR

renders the images (in memory, seeded apart from the demo splits), trains the
backbone of `config.model` with a global-average-pooled linear classifier,
and writes the backbone to DIR in the layout of `data_prep.port_torchvision`
(`metadata.json` + `weights/`, atomically), with the held-out accuracy in the
metadata. `--config.model.pretrained_dir=DIR` starts any stage from it.
"""

import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import config_flags

from data_prep import pretrain_render
from spcl_jax import flag_errors
from spcl_jax import models
from spcl_jax import storage
from spcl_jax import workdir as workdir_lib
from spcl_jax.models import porting

# seeds of the pretraining images: namespaced apart from every demo split
SEED_NAMESPACE = 0x5052_4554  # 'PRET'


class Classifier(nn.Module):
  """The segmenter's backbone, global average pooling, a linear layer."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool = False):
    features = self.backbone(images, train)
    return nn.Dense(self.num_classes, name='head')(features.mean((1, 2)))


def backbone_of(config, bn_trainable: bool) -> nn.Module:
  """The backbone of the segmenter `config.model` names (the registry's)."""
  return models.create_model(
      config.model.name, len(pretrain_render.CATEGORIES),
      base_width=config.model.base_width, bn_trainable=bn_trainable).backbone


def render_images(seed: int, split: str, count: int, size: int):
  """(images uint8 [count, size, size, 3], categories int32 [count])."""
  split_id = {'train': 0, 'val': 1}[split]
  pairs = [pretrain_render.render((SEED_NAMESPACE, seed, split_id, index),
                                  size) for index in range(count)]
  return (np.stack([p[0] for p in pairs]),
          np.asarray([p[1] for p in pairs], np.int32))


def augment(images: np.ndarray, rng: np.random.Generator, pad: int,
            flip: bool) -> np.ndarray:
  """Random crops of the edge-padded images and horizontal flips."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                  mode='edge')
  tops = rng.integers(0, 2 * pad + 1, n)
  lefts = rng.integers(0, 2 * pad + 1, n)
  out = np.stack([padded[i, t:t + h, l:l + w]
                  for i, (t, l) in enumerate(zip(tops, lefts))])
  if flip:
    mirror = rng.random(n) < 0.5
    out[mirror] = out[mirror, :, ::-1]
  return out


def normalise(images: np.ndarray, config) -> np.ndarray:
  return ((images.astype(np.float32) / 255.0 - np.asarray(config.mean))
          / np.asarray(config.std)).astype(np.float32)


def optimizer(config) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, config.warmup_steps, config.steps)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum, nesterov=True))


def make_train_step(model: Classifier, tx):
  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    return loss, updates['batch_stats']

  @jax.jit
  def step(state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['batch_stats'], images, labels)
    updates, opt_state = tx.update(grads, state['opt_state'],
                                   state['params'])
    return {'params': optax.apply_updates(state['params'], updates),
            'batch_stats': batch_stats, 'opt_state': opt_state}, loss
  return step


def make_predict(model: Classifier):
  return jax.jit(lambda v, x: model.apply(v, x, train=False).argmax(-1))


def accuracy(predict, state, images, labels, config, batch_size=250) -> float:
  """Share of `images` whose predicted category is `labels`."""
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  correct = 0
  for start in range(0, len(images), batch_size):
    chunk = normalise(images[start:start + batch_size], config)
    correct += int((np.asarray(predict(variables, chunk))
                    == labels[start:start + batch_size]).sum())
  return correct / len(images)


def pretrain(config) -> tuple[dict, dict]:
  """Trains; returns (backbone variables {"params", "batch_stats"}, summary)."""
  started = time.time()
  train_x, train_y = render_images(config.seed, 'train', config.train_images,
                                   config.image_size)
  val_x, val_y = render_images(config.seed, 'val', config.val_images,
                               config.image_size)
  logging.info('rendered %d + %d images in %.0f s', len(train_x), len(val_x),
               time.time() - started)
  model = Classifier(backbone_of(config, True),
                     len(pretrain_render.CATEGORIES))
  variables = model.init(jax.random.key(config.seed),
                         jnp.zeros((1, config.image_size, config.image_size,
                                    3)), train=False)
  tx = optimizer(config)
  state: dict[str, Any] = {'params': variables['params'],
                           'batch_stats': variables['batch_stats'],
                           'opt_state': tx.init(variables['params'])}
  step, predict = make_train_step(model, tx), make_predict(model)
  rng = np.random.default_rng((SEED_NAMESPACE, config.seed, 2))
  history = []
  for index in range(1, config.steps + 1):
    picks = rng.integers(0, len(train_x), config.batch_size)
    images = normalise(augment(train_x[picks], rng, config.pad_crop,
                               config.flip), config)
    state, loss = step(state, images, train_y[picks])
    if index % config.log_every_steps == 0:
      logging.info('pretrain step %d: loss %.3f', index, float(loss))
    if index % config.eval_every_steps == 0 or index == config.steps:
      history.append({'step': index, 'loss': float(loss),
                      'val_accuracy': accuracy(predict, state, val_x, val_y,
                                               config)})
      logging.info('pretrain step %d: val accuracy %.3f', index,
                   history[-1]['val_accuracy'])
  backbone = {'params': state['params']['backbone'],
              'batch_stats': state['batch_stats']['backbone']}
  summary = {'categories': list(pretrain_render.CATEGORIES),
             'val_accuracy': history[-1]['val_accuracy'],
             'history': history, 'seconds': round(time.time() - started, 1)}
  return jax.device_get(backbone), summary


def write_backbone(output: str, config, backbone, summary) -> None:
  spec = models.check_name(config.model.name)
  porting.save_ported(output, spec.arch, backbone, {
      'source': 'spcl_jax.pretrain (object-centric classification, '
                'data_prep/pretrain_render.py)',
      'base_width': config.model.base_width,
      'config': json.loads(config.to_json()), **summary})


def ensure_pretrained(directory: str, config) -> str:
  """`directory` (made absolute; a `gs://` URL as it is), pretrained with
  `config` first if it holds no weights yet (`model.pretrain_if_missing`:
  on the demo's first use; never into a bucket)."""
  directory = storage.resolve(directory)
  metadata_path = os.path.join(directory, porting.METADATA_FILE)
  if storage.exists(metadata_path):
    made_with = workdir_lib.read_json(metadata_path).get('config')
    wanted = json.loads(config.to_json())
    if made_with is not None and made_with != wanted:
      changed = sorted(k for k in set(made_with) | set(wanted)
                       if made_with.get(k) != wanted.get(k))
      raise ValueError(
          f'{directory} was pretrained with another pretraining config '
          f'(fields {", ".join(changed)} differ); delete it to pretrain '
          'again, or point model.pretrained_dir elsewhere')
    return directory
  if jax.process_count() > 1 or storage.is_remote(directory):
    where = ('a multi-process run' if jax.process_count() > 1 else
             'reading them from a bucket')
    output = 'LOCAL_DIR' if storage.is_remote(directory) else directory
    copy_up = (f' && gsutil -m cp -r LOCAL_DIR/* {directory}/'
               if storage.is_remote(directory) else '')
    raise FileNotFoundError(
        f'{directory} holds no pretrained weights; make them once before '
        f'{where}: python -m spcl_jax.pretrain '
        f'--config=configs/demo_pretrain.py --output={output}{copy_up}')
  logging.info('pretraining the backbone into %s (first use)', directory)
  backbone, summary = pretrain(config)
  write_backbone(directory, config, backbone, summary)
  return directory


def main(argv):
  del argv
  config = flags.FLAGS.config
  output = os.path.expanduser(flags.FLAGS.output)  # `--output=~/...`
  try:
    porting.check_local_output(output)   # before minutes of pretraining
  except ValueError as e:
    raise SystemExit(f'error: {e}') from e
  backbone, summary = pretrain(config)
  write_backbone(output, config, backbone, summary)
  print(f'pretrained {config.model.name} backbone (base width '
        f'{config.model.base_width}): val accuracy '
        f'{summary["val_accuracy"]:.3f} in {summary["seconds"]:.0f} s -> '
        f'{output}')


if __name__ == '__main__':
  # defined here, not on import: the pipeline imports this module next to
  # spcl_jax.main's own --config flag
  config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                  lock_config=True)
  flags.DEFINE_string('output', None, 'directory to write')
  flags.mark_flags_as_required(['config', 'output'])
  app.run(main, flags_parser=flag_errors.parse_flags)
