"""Optimisers and train steps: torch parity, frozen groups, 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import default
from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import spcl
from spcl_jax.core import train_state
from spcl_jax.core import train_steps
from spcl_jax.models import from_config
from spcl_jax.run import pretraining


def _stage(**kw):
  stage = default.get_config().stages.spcl.copy_and_resolve_references()
  stage.update(kw)
  return stage


def test_poly_schedule_hand_values():
  schedule = train_state.poly_schedule(2.5e-4, 62_500, 0.9)
  assert float(schedule(0)) == pytest.approx(2.5e-4)
  assert float(schedule(40_000)) == pytest.approx(
      2.5e-4 * (1 - 40_000 / 62_500) ** 0.9, rel=1e-5)
  assert float(schedule(62_500)) == 0.0


def test_sgd_matches_torch_with_classifier_multiplier_and_frozen_bn():
  rng = np.random.RandomState(0)
  params = {'backbone': {'conv': {'kernel': rng.randn(3, 2).astype(np.float32)},
                         'bn': {'scale': np.ones(2, np.float32),
                                'bias': np.zeros(2, np.float32)}},
            'classifier': {'kernel': rng.randn(2, 4).astype(np.float32)}}
  batch_stats = {'backbone': {'bn': {'mean': np.zeros(2), 'var': np.ones(2)}}}
  stage = _stage(lr=0.1, schedule_steps=10, weight_decay=0.05)
  tx = train_state.segmenter_optimizer(stage, params, batch_stats)
  opt_state = tx.init(params)
  conv = torch.nn.Parameter(torch.tensor(params['backbone']['conv']['kernel']))
  head = torch.nn.Parameter(torch.tensor(params['classifier']['kernel']))
  torch_opt = torch.optim.SGD([{'params': [conv], 'lr': 0.1},
                               {'params': [head], 'lr': 1.0}],
                              momentum=0.9, weight_decay=0.05)
  poly = torch.optim.lr_scheduler.LambdaLR(
      torch_opt, lambda step: (1 - step / 10) ** 0.9)
  ours = params
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape),
                                               jnp.float32), ours)
    conv.grad = torch.tensor(np.asarray(grads['backbone']['conv']['kernel']))
    head.grad = torch.tensor(np.asarray(grads['classifier']['kernel']))
    updates, opt_state = tx.update(grads, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
    torch_opt.step()
    poly.step()
  np.testing.assert_allclose(ours['backbone']['conv']['kernel'],
                             conv.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours['classifier']['kernel'],
                             head.detach().numpy(), rtol=1e-5, atol=1e-6)
  # frozen BN: neither gradient nor weight decay moves it
  np.testing.assert_array_equal(ours['backbone']['bn']['scale'], np.ones(2))
  np.testing.assert_array_equal(ours['backbone']['bn']['bias'], np.zeros(2))
  trainable = train_state.segmenter_optimizer(_stage(bn_trainable=True), params,
                                              batch_stats)
  moved, _ = trainable.update(grads, trainable.init(params), params)
  assert np.abs(np.asarray(moved['backbone']['bn']['scale'])).sum() > 0


def test_adamw_matches_torch_with_warmup_head_multiplier_and_norms():
  """`optimizer='adamw'` (the MiT recipe) against torch.optim.AdamW with
  mmcv's warm-up-then-poly rate written out by hand: the head at 10x, no
  weight decay on a LayerNorm, frozen BatchNorm untouched."""
  rng = np.random.RandomState(0)
  params = {'backbone': {'fc': {'kernel': rng.randn(3, 2).astype(np.float32)},
                         'norm1': {'scale': rng.rand(2).astype(np.float32),
                                   'bias': rng.randn(2).astype(np.float32)}},
            'classifier': {'logits': {'kernel': rng.randn(2, 4).astype(
                np.float32)},
                           'fuse_bn': {'scale': np.ones(2, np.float32),
                                       'bias': np.zeros(2, np.float32)}}}
  batch_stats = {'classifier': {'fuse_bn': {'mean': np.zeros(2),
                                            'var': np.ones(2)}}}
  lr, steps, warmup, ratio, decay = 0.01, 10, 4, 1e-3, 0.05
  stage = _stage(optimizer='adamw', lr=lr, schedule_steps=steps,
                 poly_power=1.0, weight_decay=decay, decay_norms=False,
                 lr_warmup_steps=warmup, lr_warmup_ratio=ratio,
                 adam_betas=(0.9, 0.999))

  def rate(i):   # mmcv: poly, times 1 - (1 - i / W)(1 - r) while i < W
    poly = (1 - i / steps) ** 1.0
    return poly * (1 - (1 - i / warmup) * (1 - ratio)) if i < warmup else poly
  schedule = train_state.learning_rate(stage)
  for i in range(6):
    assert float(schedule(i)) == pytest.approx(lr * rate(i), rel=1e-5)
  tx = train_state.segmenter_optimizer(stage, params, batch_stats)
  opt_state = tx.init(params)
  fc = torch.nn.Parameter(torch.tensor(params['backbone']['fc']['kernel']))
  norm = [torch.nn.Parameter(torch.tensor(params['backbone']['norm1'][k]))
          for k in ('scale', 'bias')]
  head = torch.nn.Parameter(torch.tensor(
      params['classifier']['logits']['kernel']))
  torch_opt = torch.optim.AdamW(
      [{'params': [fc], 'lr': lr, 'weight_decay': decay},
       {'params': norm, 'lr': lr, 'weight_decay': 0.0},
       {'params': [head], 'lr': 10 * lr, 'weight_decay': decay}],
      betas=(0.9, 0.999), eps=1e-8)
  scheduler = torch.optim.lr_scheduler.LambdaLR(torch_opt, rate)
  ours = params
  for _ in range(5):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape),
                                               jnp.float32), ours)
    fc.grad = torch.tensor(np.asarray(grads['backbone']['fc']['kernel']))
    for p, k in zip(norm, ('scale', 'bias')):
      p.grad = torch.tensor(np.asarray(grads['backbone']['norm1'][k]))
    head.grad = torch.tensor(np.asarray(
        grads['classifier']['logits']['kernel']))
    updates, opt_state = tx.update(grads, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
    torch_opt.step()
    scheduler.step()
  for got, want in ((ours['backbone']['fc']['kernel'], fc),
                    (ours['backbone']['norm1']['scale'], norm[0]),
                    (ours['backbone']['norm1']['bias'], norm[1]),
                    (ours['classifier']['logits']['kernel'], head)):
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_array_equal(ours['classifier']['fuse_bn']['scale'],
                                np.ones(2))
  # decay_norms=True decays the LayerNorm too: with zero gradients only
  # weight decay moves a parameter
  zeros = jax.tree.map(jnp.zeros_like, params)
  for decay_norms, moves in ((False, False), (True, True)):
    stage.decay_norms = decay_norms
    tx = train_state.segmenter_optimizer(stage, params, batch_stats)
    step = tx.update(zeros, tx.init(params), params)[0]
    assert bool(jnp.any(step['backbone']['norm1']['scale'] != 0)) == moves
    assert bool(jnp.any(step['backbone']['fc']['kernel'] != 0))


def test_source_only_warmup_needs_no_target_batch():
  state, step, batches = _small_setup('warmup', adversarial_weight=0.0)
  new_state, metrics = jax.jit(step)(state, batches[0][0])
  values = metrics.compute()
  assert float(values['adv_loss']) == 0.0 and float(values['disc_loss']) == 0
  assert int(new_state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.disc_params,
               state.disc_params)


def _small_config():
  config = default.get_config()
  config.model.name, config.model.base_width = 'deeplabv2_resnet18', 8
  config.model.num_classes = 5
  return config


def _small_setup(step_name, **stage_overrides):
  config = _small_config()
  stage = config.stages[step_name]
  stage.steps, stage.schedule_steps = 3, 10
  stage.update(stage_overrides)
  model = from_config.model_for_stage(config, stage.bn_trainable)
  variables = pretraining.initial_variables(config, jax.random.PRNGKey(0))
  tx = train_state.segmenter_optimizer(stage, variables['params'],
                                       variables['batch_stats'])
  rng = np.random.RandomState(1)
  bank = spcl.PrototypeBank(
      spcl.l2_normalize(jnp.asarray(rng.randn(5, 64), jnp.float32)),
      jnp.zeros(5, jnp.int32))
  d_tx, disc_params, disc = None, None, None
  if step_name == 'warmup':
    disc = from_config.discriminator_for(config)
    d_tx = train_state.discriminator_optimizer(stage)
    disc_params = disc.init(jax.random.PRNGKey(2), jnp.zeros((1, 32, 32, 5)))
    step = train_steps.make_warmup_step(model, disc, tx, d_tx, stage,
                                        config.discriminator)
  elif step_name == 'self_training':
    step = train_steps.make_self_training_step(model, tx, stage)
  else:
    step = train_steps.make_spcl_step(model, tx, stage)
  state = train_state.new_train_state(variables, tx, jax.random.PRNGKey(3), bank,
                                      disc_params, d_tx)
  batches = []
  for _ in range(3):
    batch = []
    for _ in range(2):  # source, target
      labels = rng.randint(0, 5, (8, 32, 48)).astype(np.int32)
      labels[:, :4] = 255
      batch.append({'image': rng.randn(8, 32, 48, 3).astype(np.float32),
                    'label': labels})
    batches.append(batch)
  return state, step, batches


@pytest.mark.parametrize('step_name', ['warmup', 'spcl'])
def test_one_device_and_eight_devices_agree(step_name):
  state, step, batches = _small_setup(step_name)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = mesh_lib.make_mesh(devices)
    s = jax.device_put(state, mesh_lib.replicated(mesh))
    step_fn = jax.jit(step)
    losses = []
    for source, target in batches:
      put = lambda b: jax.device_put(b, mesh_lib.batch_sharding(mesh))
      source, target = put(source), put(target)
      assert len(source['image'].sharding.device_set) == len(devices)
      s, metrics = step_fn(s, source, target)
      losses.append({k: float(v) for k, v in metrics.compute().items()})
    results.append((jax.device_get(s), losses))
  (single, single_losses), (multi, multi_losses) = results
  for a, b in zip(single_losses, multi_losses):
    for key in a:
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               single.params, multi.params)
  np.testing.assert_allclose(single.prototype_bank.prototypes,
                             multi.prototype_bank.prototypes, rtol=1e-4,
                             atol=1e-6)
  assert int(single.step) == int(multi.step) == 3
  if step_name == 'spcl':
    assert np.abs(np.asarray(single.prototype_bank.prototypes)
                  - np.asarray(state.prototype_bank.prototypes)).max() > 0


def test_joint_self_training_adds_weighted_source_cross_entropy():
  state, step, batches = _small_setup('self_training', source_weight=0.5)
  source, target = batches[0]
  model = from_config.model_for_stage(_small_config(), True)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  def cross_entropy(batch):  # training-mode BN: batch statistics only
    out, _ = model.apply(variables, batch['image'], train=True,
                         mutable=['batch_stats'])
    logits = spcl.upsample_bilinear(out['logits'], batch['label'].shape[1:3])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    labels = batch['label']
    valid = labels != 255
    picked = np.take_along_axis(np.asarray(logp),
                                np.where(valid, labels, 0)[..., None], -1)
    return -picked[..., 0][valid].mean()

  joint_state, joint = jax.jit(step)(state, target, source)
  values = {k: float(v) for k, v in joint.compute().items()}
  assert values['seg_loss'] == pytest.approx(cross_entropy(target), rel=1e-4)
  assert values['source_seg_loss'] == pytest.approx(cross_entropy(source),
                                                    rel=1e-4)
  assert values['loss'] == pytest.approx(
      cross_entropy(target) + 0.5 * cross_entropy(source), rel=1e-4)
  # target only: no source term, and the update is that of the target loss
  only_state, only = jax.jit(step)(state, target)
  assert float(only.compute()['source_seg_loss']) == 0.0
  zero_state, zero_step, _ = _small_setup('self_training', source_weight=0.0)
  zero_new, _ = jax.jit(zero_step)(zero_state, target, source)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               zero_new.params, only_state.params)
  assert not np.allclose(
      jax.tree.leaves(joint_state.params)[0],
      jax.tree.leaves(only_state.params)[0])


def test_prototype_update_order_and_target_contrastive_weight():
  """'before_loss' (released order) scores the contrastive loss against the
  bank already updated with this batch, 'after_loss' against the old one;
  both leave the same bank. Weight 0 drops L_cl^t from the loss only."""
  outputs = {}
  for order, weight in (('after_loss', 1.0), ('before_loss', 1.0),
                        ('after_loss', 0.0)):
    state, step, batches = _small_setup(
        'spcl', prototype_update=order, target_contrastive_weight=weight,
        temperature=0.1)
    source, target = batches[0]
    new_state, metrics = jax.jit(step)(state, source, target)
    outputs[order, weight] = (state, new_state, metrics.compute())
  after, before = outputs['after_loss', 1.0], outputs['before_loss', 1.0]
  np.testing.assert_allclose(after[1].prototype_bank.prototypes,
                             before[1].prototype_bank.prototypes, atol=1e-6)
  assert abs(float(after[2]['contrastive_source'])
             - float(before[2]['contrastive_source'])) > 1e-4
  # with the bank that the step produced, the 'after' loss would be the
  # 'before' loss: recompute L_cl^s by hand with both banks
  state = after[0]
  model_config = default.get_config()
  model_config.model.name, model_config.model.base_width = (
      'deeplabv2_resnet18', 8)
  model_config.model.num_classes = 5
  model = from_config.model_for_stage(model_config, False)
  source = batches[0][0]  # every setup draws the same batches
  out = model.apply({'params': state.params,
                     'batch_stats': state.batch_stats},
                    jnp.asarray(source['image']), train=True)
  mask = spcl.source_mask(jnp.asarray(source['label']), out['logits'])
  for (_, _, metrics), bank in ((after, state.prototype_bank),
                                (before, after[1].prototype_bank)):
    expected = spcl.contrastive_loss(out['features'], bank.prototypes, mask,
                                     0.1)
    assert float(metrics['contrastive_source']) == pytest.approx(
        float(expected), rel=1e-4)
  full, source_only = after[2], outputs['after_loss', 0.0][2]
  assert float(full['loss']) == pytest.approx(
      float(full['seg_loss'] + full['contrastive_source']
            + full['contrastive_target']), rel=1e-5)
  assert float(source_only['loss']) == pytest.approx(
      float(source_only['seg_loss'] + source_only['contrastive_source']),
      rel=1e-5)
  assert float(source_only['contrastive_target']) == pytest.approx(
      float(full['contrastive_target']), rel=1e-5)  # still reported
