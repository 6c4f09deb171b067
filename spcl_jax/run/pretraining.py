"""The demo's stand-in for ImageNet initialisation, as a library: pretrain
the backbone on object-centric classification (data_prep/pretrain_render.py
says what the task is and why it is an honest analogue), write it in the
layout of `data_prep.port_torchvision`, and the initial variables of a run's
first stage (ported ImageNet weights, these pretrained ones, made on first
use with `model.pretrain_if_missing`, or fresh ones).

The command is `python -m spcl_jax.pretrain`.
"""

import json
import os
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax import models
from spcl_jax.models import from_config
from spcl_jax.models import porting
from spcl_jax.run import builds

# seeds of the pretraining images: namespaced apart from every demo split
SEED_NAMESPACE = 0x5052_4554  # 'PRET'


class Classifier(nn.Module):
  """The segmenter's backbone, global average pooling (of its last map, for
  an encoder of several), a linear layer."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool = False):
    features = self.backbone(images, train)
    if isinstance(features, (list, tuple)):
      features = features[-1]
    return nn.Dense(self.num_classes, name='head')(features.mean((1, 2)))


def backbone_of(config, bn_trainable: bool) -> nn.Module:
  """The backbone of the segmenter `config.model` names (the registry's)."""
  return models.create_model(
      config.model.name, len(builds.pretraining_categories()),
      bn_trainable=bn_trainable, **from_config.width_kwargs(config)).backbone


def render_images(seed: int, split: str, count: int, size: int):
  """(images uint8 [count, size, size, 3], categories int32 [count])."""
  split_id = {'train': 0, 'val': 1}[split]
  return builds.render_pretraining_images(
      [(SEED_NAMESPACE, seed, split_id, index) for index in range(count)],
      size)


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
  """SGD with Nesterov momentum and coupled weight decay (`optimizer`
  'sgd', the ResNet's), or AdamW (`optimizer` 'adamw', the MiT's), on a
  linear warm-up then cosine decay."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, config.warmup_steps, config.steps)
  if config.get('optimizer', 'sgd') == 'adamw':
    return optax.adamw(schedule, weight_decay=config.weight_decay)
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
                     len(builds.pretraining_categories()))
  variables = models.with_batch_stats(model.init(
      jax.random.key(config.seed),
      jnp.zeros((1, config.image_size, config.image_size, 3)), train=False))
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
              'batch_stats': state['batch_stats'].get('backbone', {})}
  summary = {'categories': list(builds.pretraining_categories()),
             'val_accuracy': history[-1]['val_accuracy'],
             'history': history, 'seconds': round(time.time() - started, 1)}
  return jax.device_get(backbone), summary


def write_backbone(output: str, config, backbone, summary) -> None:
  spec = models.check_name(config.model.name)
  # no empty collection (a MiT has no BatchNorm statistics): the restore
  # reads exactly the ported leaves
  backbone = {name: tree for name, tree in backbone.items() if tree}
  porting.save_ported(output, spec.arch, backbone, {
      'source': 'spcl_jax.pretrain (object-centric classification, '
                'data_prep/pretrain_render.py)',
      'base_width': config.model.base_width,
      'config': json.loads(config.to_json()), **summary})


# Pretraining config fields added after weights were shipped, with the value
# those weights were made with.
ADDED_PRETRAINING_FIELDS = {'optimizer': 'sgd'}


def ensure_pretrained(directory: str, config) -> str:
  """`directory` (made absolute; a `gs://` URL as it is), pretrained with
  `config` first if it holds no weights yet (`model.pretrain_if_missing`:
  on the demo's first use; never into a bucket)."""
  directory = storage.resolve(directory)
  metadata_path = os.path.join(directory, porting.METADATA_FILE)
  if storage.exists(metadata_path):
    made_with = workdir_lib.read_json(metadata_path).get('config')
    wanted = json.loads(config.to_json())
    if made_with is not None:   # weights made before a field was added
      made_with = {**ADDED_PRETRAINING_FIELDS, **made_with}
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


def initial_variables(config, rng):
  """ImageNet-initialised (ported weights), pretrained (the demo's stand-in,
  made on first use with `model.pretrain_if_missing`) or fresh variables."""
  if config.model.pretrained_dir:
    directory = config.model.pretrained_dir
    if config.model.pretrain_if_missing:
      if 'pretrain' not in config:
        raise ValueError('model.pretrain_if_missing needs a `pretrain` block '
                         'in the config (configs/demo_pretrain.py, as '
                         'configs/demo.py has)')
      made_for = (config.pretrain.model.name, config.pretrain.model.base_width)
      if made_for != (config.model.name, config.model.base_width):
        raise ValueError(
            f'pretrain.model is {made_for[0]} at base width {made_for[1]} '
            f'but model is {config.model.name} at base width '
            f'{config.model.base_width}; set both alike')
      directory = ensure_pretrained(directory, config.pretrain)
    return models.load_pretrained(directory,
                                  config.model.name, config.model.num_classes,
                                  rng, **from_config.model_kwargs(config))
  return models.init_variables(from_config.model_for_stage(config, False), rng)
