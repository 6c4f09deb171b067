"""Gradient accumulation (`stages.<stage>.micro_batches`): with frozen
BatchNorm one step over k micro-batches equals the k = 1 step (parameters,
optimiser states, discriminator, prototype bank, BN statistics, metrics);
with trainable BatchNorm it is the share-weighted combination of the k = 1
steps on each micro-batch (statistics per micro-batch); with dropout each
micro-batch draws its own masks. Also the config checks of micro_batches
and model.remat. Tiny models: compiling dominates."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import micro_batches as micro_batches_lib
from spcl_jax.core import spcl
from spcl_jax.core import train_state
from spcl_jax.core import train_steps
from spcl_jax import models
from spcl_jax.models import from_config
from spcl_jax.models import layers
from spcl_jax.run import config_checks

C, N = 5, 16  # classes, feature width
RTOL, ATOL = 2e-5, 1e-6
# XLA:CPU compiles these tiny steps ~3x faster without its expensive LLVM
# passes; both sides of every comparison are compiled alike.
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


class TinySegmenter(nn.Module):
  """A strided convolution, BatchNorm (frozen or trainable), ReLU, dropout
  (rate 0: none) and a 1x1 classifier: DeepLabV2's interface ('features',
  'logits') at stride 2."""
  bn_trainable: bool = False
  num_classes: int = C
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):  # pylint: disable=redefined-outer-name
    x = nn.Conv(N, (3, 3), strides=(2, 2), use_bias=False, name='conv')(x)
    x = layers.BatchNorm(self.bn_trainable, name='bn')(x, train)
    features = nn.relu(x)
    if self.dropout_rate:
      features = nn.Dropout(self.dropout_rate, deterministic=not train)(
          features)
    logits = nn.Conv(self.num_classes, (1, 1), name='classifier')(features)
    return {'features': features, 'logits': logits}


def random_like(shapes, rng):
  """Random values of the `shapes` tree (nothing compiled op by op): kernels
  scaled by 1 / sqrt(fan in), BatchNorm far from the identity."""
  def leaf(path, a):
    name = path[-1].key
    if name == 'kernel':
      value = rng.randn(*a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, a.shape)
    else:  # bias, mean
      value = rng.randn(*a.shape) * 0.1
    return jnp.asarray(value, jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def _variables():
  rng = np.random.RandomState(0)
  variables = models.with_batch_stats(random_like(jax.eval_shape(
      TinySegmenter().init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))),
                                              rng))
  bank = spcl.PrototypeBank(
      spcl.l2_normalize(jnp.asarray(rng.randn(C, N), jnp.float32)),
      jnp.zeros(C, jnp.int32))
  return variables, bank


@functools.lru_cache(maxsize=None)
def _disc_params(widths):
  config = default.get_config()
  config.discriminator.widths = widths
  disc = from_config.discriminator_for(config)
  return disc, random_like(jax.eval_shape(disc.init, jax.random.PRNGKey(2),
                                          jnp.zeros((1, 32, 32, C))),
                           np.random.RandomState(2))


def _batch(rng, b, h, w, ignore_rows=2):
  labels = rng.randint(0, C, (b, h, w)).astype(np.int32)
  # a different number of ignored pixels per image: the micro-batches'
  # shares of the global mean differ
  for i in range(b):
    labels[i, :ignore_rows + i % 3] = spcl.IGNORE_INDEX
  return {'image': rng.randn(b, h, w, 3).astype(np.float32), 'label': labels}


def _setup(stage_name, micro_batches, bn_trainable=False, rng=None,
           **overrides):
  """(initial state, step) of `stage_name` with `micro_batches`; everything
  else (variables, bank, discriminator) is the same for every k."""
  config = default.get_config()
  stage = config.stages[stage_name]
  stage.steps, stage.schedule_steps = 3, 10
  stage.lr = 0.05  # large enough that the update is far above rounding
  stage.bn_trainable = bn_trainable
  stage.micro_batches = micro_batches
  dropout_rate = overrides.pop('dropout_rate', 0.0)
  stage.update(overrides)
  model = TinySegmenter(bn_trainable, dropout_rate=dropout_rate)
  variables, bank = _variables()
  tx = train_state.segmenter_optimizer(stage, variables['params'],
                                       variables['batch_stats'])
  d_tx = disc_params = None
  if stage_name == 'warmup':
    disc, disc_params = _disc_params((4, 4, 4, 4))
    d_tx = train_state.discriminator_optimizer(stage)
    step = train_steps.make_warmup_step(model, disc, tx, d_tx, stage,
                                        config.discriminator)
  elif stage_name == 'spcl':
    thresholds = jnp.full((C,), 0.21, jnp.float32)
    step = train_steps.make_spcl_step(model, tx, stage, thresholds)
  else:
    step = train_steps.make_self_training_step(model, tx, stage)
  state = train_state.new_train_state(variables, tx, jax.random.PRNGKey(3), bank,
                                      disc_params, d_tx)
  return state.replace(rng=rng) if rng is not None else state, step


@functools.lru_cache(maxsize=None)
def _batches(seed=1, b=4):
  rng = np.random.RandomState(seed)
  return _batch(rng, b, 32, 48), _batch(rng, b, 32, 40)  # source, target


def _assert_trees_close(a, b, what, rtol=RTOL, atol=ATOL):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b), what
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
        err_msg=f'{what} {jax.tree_util.keystr(path)}')


def _assert_states_equal(one, many, metrics_one, metrics_many):
  assert int(one.step) == int(many.step) == 1
  for field in ('params', 'opt_state', 'batch_stats', 'disc_params',
                'disc_opt_state', 'prototype_bank'):
    _assert_trees_close(getattr(one, field), getattr(many, field), field)
  values_one, values_many = metrics_one.compute(), metrics_many.compute()
  for key, value in values_one.items():
    np.testing.assert_allclose(float(values_many[key]), float(value),
                               rtol=1e-5, atol=1e-6, err_msg=key)


_RESULTS = {}


def _run(stage_name, k, batches, **overrides):
  """(initial state, state after one step, metrics); the same run is
  computed (compiled) once per session."""
  key = (stage_name, k, id(batches[0]), tuple(sorted(overrides.items())))
  if key not in _RESULTS:
    state, step = _setup(stage_name, k, **overrides)
    new_state, metrics = jax.jit(step, compiler_options=FAST_COMPILE)(
        state, *batches)
    _RESULTS[key] = state, new_state, metrics, batches  # keeps the ids alive
  return _RESULTS[key][:3]


def _moved(before, after):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


# ------------------------------------------------------------ the layout --

def test_micro_batch_j_holds_every_kth_image():
  batch = {'image': np.arange(8)[:, None] * np.ones((8, 3)),
           'label': np.arange(8)}
  split = micro_batches_lib.split_micro_batches(batch, 4)
  assert split['image'].shape == (4, 2, 3)
  np.testing.assert_array_equal(split['label'], [[0, 4], [1, 5], [2, 6],
                                                 [3, 7]])
  np.testing.assert_array_equal(split['image'][:, :, 0], split['label'])
  with pytest.raises(ValueError, match='micro_batches = 3'):
    micro_batches_lib.split_micro_batches(batch, 3)


# ------------------------------------------------- frozen BN: k equals 1 --

def test_warmup_with_discriminator_equals_one_batch():
  batches = _batches()
  state, one, metrics_one = _run('warmup', 1, batches,
                                 adversarial_weight=0.5)
  _, many, metrics_many = _run('warmup', 2, batches, adversarial_weight=0.5)
  _assert_states_equal(one, many, metrics_one, metrics_many)
  assert _moved(state.params, one.params) > 1e-4
  assert _moved(state.disc_params, one.disc_params) > 1e-5
  assert float(metrics_one.compute()['adv_loss']) > 0


def test_source_only_warmup_equals_one_batch():
  source, _ = _batches()
  _, one, metrics_one = _run('warmup', 1, (source,), adversarial_weight=0.0)
  _, many, metrics_many = _run('warmup', 2, (source,),
                               adversarial_weight=0.0)
  _assert_states_equal(one, many, metrics_one, metrics_many)


def _spcl_overrides(order, mask):
  return dict(prototype_update=order, target_mask=mask, temperature=0.5,
              decay_absent_classes=order == 'before_loss')


@pytest.mark.parametrize('k,order,mask', [
    (2, 'after_loss', 'offline'), (4, 'before_loss', 'online')])
def test_spcl_step_and_prototype_update_equal_one_batch(k, order, mask):
  source, target = _batches(b=16)
  overrides = _spcl_overrides(order, mask)
  state, one, metrics_one = _run('spcl', 1, (source, target), **overrides)
  _, many, metrics_many = _run('spcl', k, (source, target), **overrides)
  _assert_states_equal(one, many, metrics_one, metrics_many)
  assert _moved(state.prototype_bank.prototypes,
                one.prototype_bank.prototypes) > 1e-3
  values = metrics_one.compute()
  assert 0 < float(values['source_mask_fraction']) < 1
  assert 0 < float(values['target_mask_fraction']) <= 1


def test_joint_self_training_with_frozen_bn_equals_one_batch():
  source, target = _batches()
  _, one, metrics_one = _run('self_training', 1, (target, source),
                             source_weight=0.5)
  _, many, metrics_many = _run('self_training', 2, (target, source),
                               source_weight=0.5)
  _assert_states_equal(one, many, metrics_one, metrics_many)
  assert float(metrics_one.compute()['source_seg_loss']) > 0


def test_micro_batches_on_eight_devices_equal_one_batch_on_one():
  """Batches sharded over 8 devices (2 images each, 2 micro-batches of 1
  per device) give the one-device k = 1 step."""
  batches = _batches(b=16)
  overrides = _spcl_overrides('after_loss', 'offline')
  _, one, metrics_one = _run('spcl', 1, batches, **overrides)
  mesh = mesh_lib.make_mesh(jax.devices())
  state, step = _setup('spcl', 2, **overrides)
  state = jax.device_put(state, mesh_lib.replicated(mesh))
  source, target = jax.device_put(batches, mesh_lib.batch_sharding(mesh))
  assert len(source['image'].sharding.device_set) == 8
  many, metrics_many = jax.jit(step, compiler_options=FAST_COMPILE)(
      state, source, target)
  _assert_states_equal(one, jax.device_get(many), metrics_one, metrics_many)


# ------------------------------------------------ trainable BN: defined --

def _assert_share_weighted(many, metrics_many, halves, parts):
  """The k = 2 step's first SGD update and loss are the k = 1 steps' on
  the two `halves` (`parts`: their (state, metrics)) weighted by each
  half's share of the valid pixels (the update is linear in the
  gradient)."""
  valid = [float(np.sum(h['label'] != spcl.IGNORE_INDEX)) for h in halves]
  shares = [v / sum(valid) for v in valid]
  weighted = jax.tree.map(lambda a, b: shares[0] * a + shares[1] * b,
                          parts[0][0].params, parts[1][0].params)
  _assert_trees_close(many.params, weighted, 'params', rtol=1e-4, atol=1e-6)
  loss = sum(s * float(p[1].compute()['loss']) for s, p in zip(shares,
                                                               parts))
  assert float(metrics_many.compute()['loss']) == pytest.approx(loss,
                                                                rel=1e-5)


def test_trainable_bn_is_the_mean_of_per_micro_batch_steps():
  """With trainable BN each micro-batch is normalised by its own statistics:
  the k = 2 step differs from k = 1, and equals the k = 1 steps on each
  micro-batch (images 0::2 and 1::2) combined: BN running statistics their
  mean, the first SGD update their mean weighted by each micro-batch's share
  of the valid target pixels (the update is linear in the gradient)."""
  _, target = _batches()
  state, one, _ = _run('self_training', 1, (target,), bn_trainable=True)
  _, many, metrics_many = _run('self_training', 2, (target,),
                               bn_trainable=True)
  halves = [jax.tree.map(lambda x, j=j: x[j::2], target) for j in range(2)]
  parts = [_run('self_training', 1, (half,), bn_trainable=True)[1:]
           for half in halves]
  mean_stats = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][0].batch_stats,
                            parts[1][0].batch_stats)
  _assert_trees_close(many.batch_stats, mean_stats, 'batch_stats')
  _assert_share_weighted(many, metrics_many, halves, parts)
  # BN statistics moved, and per-micro-batch normalisation changed the step
  assert _moved(state.batch_stats, many.batch_stats) > 1e-3
  assert _moved(one.params, many.params) > 1e-5
  # the first BN sees the raw convolution output: its running mean is the
  # global batch's (equal-sized micro-batches), as at k = 1
  np.testing.assert_allclose(many.batch_stats['bn']['mean'],
                             one.batch_stats['bn']['mean'], rtol=1e-5,
                             atol=1e-6)


def test_each_micro_batch_draws_its_own_dropout():
  """With dropout, micro-batch j of an accumulated step draws its masks
  from the step's key folded with j: the k = 2 step equals the k = 1 steps
  on images 0::2 and 1::2 made with those two keys, combined by their
  shares of the valid pixels (SGD's first update is linear in the
  gradient). Micro-batches sharing the step's key would fail this."""
  _, target = _batches()
  state, many, metrics_many = _run('self_training', 2, (target,),
                                   dropout_rate=0.5)
  halves = [jax.tree.map(lambda x, j=j: x[j::2], target) for j in range(2)]
  parts = []
  for j, half in enumerate(halves):
    start, step = _setup('self_training', 1, dropout_rate=0.5,
                         rng=jax.random.fold_in(state.rng, j))
    parts.append(jax.jit(step, compiler_options=FAST_COMPILE)(start, half))
  _assert_share_weighted(many, metrics_many, halves, parts)
  # k = 1 keeps the step's own key: dropout is on, and the k = 1 step on
  # the whole batch differs from one without dropout
  _, one, _ = _run('self_training', 1, (target,), dropout_rate=0.5)
  _, plain, _ = _run('self_training', 1, (target,))
  assert _moved(one.params, plain.params) > 1e-5


# ------------------------------------- per-image loss weighting (n > 0) --

_WEIGHTED_RUNS = {   # stage: (its batches' order, overrides)
    'warmup': (lambda s, t: (s, t), dict(adversarial_weight=0.5)),
    'spcl': (lambda s, t: (s, t), _spcl_overrides('before_loss', 'offline')),
    'self_training': (lambda s, t: (t, s), dict(source_weight=0.5)),
}


@pytest.mark.parametrize('stage_name,n', [
    ('warmup', 1), ('spcl', 2), ('self_training', 2)])
def test_per_image_weighting_micro_batched_equals_one_batch(stage_name, n):
  """The weights come from the global batch: k = 2 (whose micro-batches
  split every run of n = 2 consecutive images) equals k = 1; the weighting
  changes the step."""
  order, overrides = _WEIGHTED_RUNS[stage_name]
  batches = order(*_batches())
  _, one, metrics_one = _run(stage_name, 1, batches,
                             images_per_loss_mean=n, **overrides)
  _, many, metrics_many = _run(stage_name, 2, batches,
                               images_per_loss_mean=n, **overrides)
  _assert_states_equal(one, many, metrics_one, metrics_many)
  _, pixel_mean, _ = _run(stage_name, 1, batches, **overrides)
  assert _moved(one.params, pixel_mean.params) > 1e-5


def test_per_image_weighting_on_eight_devices_equals_one_device():
  batches = _batches(b=16)
  overrides = dict(images_per_loss_mean=1,
                   **_spcl_overrides('after_loss', 'online'))
  _, one, metrics_one = _run('spcl', 1, batches, **overrides)
  mesh = mesh_lib.make_mesh(jax.devices())
  state, step = _setup('spcl', 2, **overrides)
  state = jax.device_put(state, mesh_lib.replicated(mesh))
  source, target = jax.device_put(batches, mesh_lib.batch_sharding(mesh))
  many, metrics_many = jax.jit(step, compiler_options=FAST_COMPILE)(
      state, source, target)
  _assert_states_equal(one, jax.device_get(many), metrics_one, metrics_many)


def test_per_image_loss_is_the_mean_of_each_images_own_loss():
  """Self-training with one loss mean per image: the step's loss is the
  mean over the images of each image's pixel-mean cross-entropy (computed
  here image by image); with n = 0 it is their mean weighted by valid
  pixels. Image 0 is brighter (a larger loss), image 1 mostly ignored."""
  _, target = _batches()
  target = {'image': target['image'] * np.float32([4, 1, 1, 1])[:, None,
                                                                None, None],
            'label': target['label'].copy()}
  target['label'][1, 4:] = spcl.IGNORE_INDEX
  target = _UNEQUAL_TARGET.setdefault('batch', target)
  state, _, metrics = _run('self_training', 1, (target,),
                           images_per_loss_mean=1)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  def image_loss(i):
    logits = TinySegmenter().apply(variables, target['image'][i:i + 1],
                                   train=True)['logits']
    label = target['label'][i:i + 1]
    return float(spcl.segmentation_loss(
        spcl.upsample_bilinear(logits, label.shape[1:3]), label))
  losses = [image_loss(i) for i in range(len(target['label']))]
  valid = np.sum(target['label'] != spcl.IGNORE_INDEX, axis=(1, 2))
  assert float(metrics.compute()['seg_loss']) == pytest.approx(
      np.mean(losses), rel=1e-5)
  _, _, pixel_metrics = _run('self_training', 1, (target,))
  assert float(pixel_metrics.compute()['seg_loss']) == pytest.approx(
      np.sum(valid * losses) / np.sum(valid), rel=1e-5)
  assert abs(np.mean(losses) - np.sum(valid * losses) / np.sum(valid)) > 0.05


_UNEQUAL_TARGET = {}   # one batch object: _run caches by its id


# ------------------------------------------------------ config checks --

def _problems(config, devices):
  with pytest.raises(ValueError) as error:
    config_checks.validate(config, num_devices=devices)
  return str(error.value)


def test_micro_batches_must_divide_the_per_device_batch():
  config = default.get_config()
  config.stages.spcl.micro_batches = 2
  config.stages.warmup.micro_batches = 4
  config_checks.validate(config, num_devices=1)  # 4 per device: both divide
  assert config_checks.memory_config_problems(config, 1) == []
  message = _problems(config, 2)  # 2 per device: 4 does not divide it
  assert ('stages.warmup.micro_batches = 4 does not divide the per-device '
          'batch of stages.warmup.source_batch_size = 4 on 2 devices '
          '(2 per device)') in message
  assert 'stages.warmup.target_batch_size' in message
  assert 'stages.spcl.micro_batches' not in message
  config.stages.warmup.micro_batches = 1
  config.stages.self_training.micro_batches = 3
  assert 'stages.self_training.micro_batches = 3' in _problems(config, 1)
  config.stages.self_training.micro_batches = 0
  assert 'stages.self_training.micro_batches = 0 must be an integer >= 1' in (
      _problems(config, 1))


def test_source_only_warmup_does_not_split_a_target_batch():
  config = default.get_config()
  config.stages.warmup.adversarial_weight = 0.0
  config.stages.warmup.target_batch_size = 2
  config.stages.warmup.micro_batches = 4
  assert config_checks.memory_config_problems(config, 1) == []  # target unused
  config.stages.warmup.adversarial_weight = 0.001
  assert config_checks.memory_config_problems(config, 1) == [
      'stages.warmup.micro_batches = 4 does not divide the per-device batch '
      'of stages.warmup.target_batch_size = 2 on 1 devices (2 per device)']


def test_remat_value_and_model_are_checked(monkeypatch):
  config = default.get_config()
  config.model.remat = 'layers'
  assert ("model.remat: 'layers', expected one of ('none', 'blocks', "
          "'groups')") in (
      _problems(config, 1))
  config.model.remat = 'blocks'
  config_checks.validate(config, num_devices=1)
  monkeypatch.setitem(models.MODELS, 'deeplabv2_blockless',
                      models.ModelSpec('vgg16', (), has_blocks=False))
  config.model.name = 'deeplabv2_blockless'
  assert config_checks.memory_config_problems(config, 1) == [
      "model.remat = 'blocks' but model 'deeplabv2_blockless' has no blocks "
      "to rematerialise; use 'none'"]
  with pytest.raises(ValueError, match='has no blocks'):
    models.create_model('deeplabv2_blockless', C, remat='blocks')
