"""Step-level parity: the steps of `spcl_jax.core.train_steps` with the released
settings equal an independent PyTorch computation of the released step on a
tiny network.

* SPCL (`make_spcl_step`): loss terms, every parameter after the SGD update,
  the new prototypes. Pins L_seg / 1.8 + λ (L_cl^s + L_cl^t), prototypes
  updated before the loss, absent classes decayed.
* Warm-up (`make_warmup_step`, against `torch_reference.
  released_warmup_iteration`): loss terms, the segmenter's and the
  discriminator's gradients, and, over two steps, every parameter after the
  SGD / Adam updates. Pins CE(up(src) / 1.8) + λ_adv BCE(D(softmax(up(tgt))),
  0), D trained on softmax(up(src) / 1.8) -> 0 and softmax(up(tgt)) -> 1
  (halves), D frozen in the segmenter's loss and updated from its old
  parameters, frozen BatchNorm untouched.
* Self-training (`make_self_training_step`, against `torch_reference.
  released_self_training_iteration`): target CE without temperature,
  trainable BatchNorm (batch statistics, running averages, affine
  parameters trained and decayed), and our joint variant's weighted source
  term.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from benchmarks import torch_reference as ref
from configs import default
from spcl_jax.core import spcl
from spcl_jax.core import train_state
from spcl_jax.core import train_steps
from spcl_jax.models import from_config
from spcl_jax.models import layers

C, N = 3, 6  # classes, feature width


class Tiny(nn.Module):
  """2x2 average pool, a 1x1 'backbone' convolution + ReLU (the features),
  a 1x1 'classifier' (the logits); no BatchNorm."""
  num_classes: int = C

  @nn.compact
  def __call__(self, x, train=False):  # pylint: disable=redefined-outer-name
    del train
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    features = nn.relu(nn.Dense(N, name='backbone')(x))
    return {'features': features,
            'logits': nn.Dense(self.num_classes, name='classifier')(features)}


def _torch_spcl_step(p, prototypes, source, target, stage):
  """The released SPCL step, written from the method with torch ops."""
  t = {k: torch.tensor(np.asarray(v), dtype=torch.float64,
                       requires_grad=True) for k, v in p.items()}

  def forward(images):
    x = torch.tensor(images, dtype=torch.float64)
    b, h, w, _ = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, 3).mean((2, 4))
    f = torch.relu(x @ t['bk'] + t['bb'])
    return f, f @ t['ck'] + t['cb']

  def small_labels(labels, size):
    return F.interpolate(torch.tensor(labels)[:, None].double(), size=size,
                         mode='nearest')[:, 0].long()

  f_s, logits_s = forward(source['image'])
  f_t, _ = forward(target['image'])
  size = source['label'].shape[1:]
  up = F.interpolate(logits_s.permute(0, 3, 1, 2), size=size,
                     mode='bilinear', align_corners=True)
  seg = F.cross_entropy(up / stage.logit_temperature,
                        torch.tensor(source['label']).long(),
                        ignore_index=255)
  small_s = small_labels(source['label'], logits_s.shape[1:3])
  mask_s = torch.where((logits_s.argmax(-1) == small_s) & (small_s < C),
                       small_s, torch.full_like(small_s, 255))
  small_t = small_labels(target['label'], logits_s.shape[1:3])
  mask_t = torch.where(small_t < C, small_t, torch.full_like(small_t, 255))
  # released order: Eq. 3 (absent classes decay) before the loss
  fn_s = F.normalize(f_s.detach(), dim=-1)
  mu = torch.tensor(np.asarray(prototypes), dtype=torch.float64)
  new_mu = torch.stack([
      stage.alpha * mu[c] + (1 - stage.alpha) * (
          fn_s[mask_s == c].mean(0) if (mask_s == c).any()
          else torch.zeros(N, dtype=torch.float64)) for c in range(C)])

  def contrastive(f, mask):
    logits = F.normalize(f, dim=-1) @ new_mu.T / stage.temperature
    return F.cross_entropy(logits.reshape(-1, C), mask.reshape(-1),
                           ignore_index=255)

  cl_s, cl_t = contrastive(f_s, mask_s), contrastive(f_t, mask_t)
  loss = seg + stage.contrastive_weight * (cl_s + cl_t)
  loss.backward()
  new = {}
  for k, v in t.items():  # SGD, first step: p -= lr * (g + wd p)
    lr = stage.lr * (stage.classifier_lr_multiplier if k[0] == 'c' else 1)
    new[k] = (v - lr * (v.grad + stage.weight_decay * v)).detach().numpy()
  values = {'loss': loss, 'seg_loss': seg, 'contrastive_source': cl_s,
            'contrastive_target': cl_t}
  return ({k: v.item() for k, v in values.items()}, new,
          new_mu.numpy(), int((mask_s == 2).sum()))


@pytest.mark.parametrize('absent', [False, True])
def test_released_spcl_step_equals_torch(absent):
  config = default.get_config()
  default.released(config)
  stage = config.stages.spcl
  stage.temperature = 0.5  # small τ: the update order matters
  # the torch side is the released step on one GPU holding the batch's 2 + 2
  # images: one loss mean over both (per image on 4 GPUs: `:released`'s 1)
  stage.images_per_loss_mean = 2
  rng = np.random.RandomState(0)
  model = Tiny()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  variables = {'params': jax.tree.map(
      lambda a: jnp.asarray(rng.randn(*a.shape), jnp.float32),
      variables['params']), 'batch_stats': {}}
  p = variables['params']
  flat = {'bk': p['backbone']['kernel'], 'bb': p['backbone']['bias'],
          'ck': p['classifier']['kernel'], 'cb': p['classifier']['bias']}
  source = {'image': rng.randn(2, 8, 12, 3).astype(np.float32),
            'label': rng.randint(0, C, (2, 8, 12)).astype(np.int32)}
  source['label'][0, 0] = 255
  if absent:  # class 2 absent from the source batch: its prototype decays
    source['label'][source['label'] == 2] = 1
  target = {'image': rng.randn(2, 8, 12, 3).astype(np.float32),
            'label': rng.randint(0, C, (2, 8, 12)).astype(np.int32)}
  target['label'][1, :2] = 255
  bank = spcl.PrototypeBank(
      spcl.l2_normalize(jnp.asarray(rng.randn(C, N), jnp.float32)),
      jnp.zeros(C, jnp.int32))
  tx = train_state.segmenter_optimizer(stage, p, {})
  state = train_state.new_train_state(variables, tx, jax.random.PRNGKey(1), bank)
  new_state, metrics = jax.jit(train_steps.make_spcl_step(model, tx, stage))(
      state, source, target)
  expected, new_params, new_mu, class2 = _torch_spcl_step(
      flat, bank.prototypes, source, target, stage)
  if absent:
    assert class2 == 0  # the decay branch of the update is exercised
  ours = {k: float(v) for k, v in metrics.compute().items()}
  for key, value in expected.items():
    assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  q = new_state.params
  for key, leaf in (('bk', q['backbone']['kernel']),
                    ('bb', q['backbone']['bias']),
                    ('ck', q['classifier']['kernel']),
                    ('cb', q['classifier']['bias'])):
    np.testing.assert_allclose(leaf, new_params[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  np.testing.assert_allclose(new_state.prototype_bank.prototypes, new_mu,
                             rtol=1e-5, atol=1e-6)


# ------------------------------------------------ warm-up and self-training --

DISC_WIDTHS = (4, 8, 8, 4)  # a narrow AdaptSegNet discriminator


class TinyBN(nn.Module):
  """`Tiny` with a BatchNorm between the 'backbone' convolution (no bias, as
  in ResNet) and the ReLU: frozen (warm-up) or trainable (self-training), as
  the stage has it."""
  bn_trainable: bool = False
  frozen_epsilon: float = 0.0
  num_classes: int = C

  @nn.compact
  def __call__(self, x, train=False):  # pylint: disable=redefined-outer-name
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dense(N, use_bias=False, name='backbone')(x)
    x = layers.BatchNorm(self.bn_trainable,
                         frozen_epsilon=self.frozen_epsilon, name='bn')(x, train)
    features = nn.relu(x)
    return {'features': features,
            'logits': nn.Dense(self.num_classes, name='classifier')(features)}


# our parameter path -> key in `ref._grads(feature_extractor, classifier,
# discriminator)` / `_torch_values` (module index . torch name)
SEGMENTER_KEYS = {('backbone', 'kernel'): '0.1.weight',
                  ('bn', 'scale'): '0.2.weight', ('bn', 'bias'): '0.2.bias',
                  ('classifier', 'kernel'): '1.weight',
                  ('classifier', 'bias'): '1.bias'}
STATS_KEYS = {('bn', 'mean'): '0.2.running_mean',
              ('bn', 'var'): '0.2.running_var'}
DISC_KEYS = {(name, kind): f'2.{2 * i}.{"weight" if kind == "kernel" else kind}'
             for i, name in enumerate(('conv1', 'conv2', 'conv3', 'conv4',
                                       'classifier'))
             for kind in ('kernel', 'bias')}


def _to_torch(leaf) -> torch.Tensor:
  """Our layout -> torch's: Dense [I, O] -> 1x1 conv [O, I, 1, 1]; conv
  HWIO -> OIHW."""
  a = torch.tensor(np.asarray(leaf), dtype=torch.float64)
  if a.ndim == 2:
    return a.T[:, :, None, None].contiguous()
  if a.ndim == 4:
    return a.permute(3, 2, 0, 1).contiguous()
  return a


def _to_ours(t: torch.Tensor) -> np.ndarray:
  a = t.detach().numpy()
  if a.ndim == 4 and a.shape[2:] == (1, 1):
    return a[:, :, 0, 0].T
  if a.ndim == 4:
    return a.transpose(2, 3, 1, 0)
  return a


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _random_variables(model, rng):
  """Random weights, and BatchNorm affine parameters and statistics far from
  the identity, so a mixed-up BatchNorm cannot pass (shapes only from
  `init`: nothing is compiled op by op)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 8, 8, 3)))
  params = jax.tree.map(lambda a: jnp.asarray(rng.randn(*a.shape),
                                              jnp.float32),
                        shapes['params'])
  params['bn'] = {'scale': jnp.asarray(rng.rand(N) + 0.5, jnp.float32),
                  'bias': jnp.asarray(rng.randn(N) * 0.3, jnp.float32)}
  stats = {'bn': {'mean': jnp.asarray(rng.randn(N) * 0.3, jnp.float32),
                  'var': jnp.asarray(rng.rand(N) + 0.5, jnp.float32)}}
  return {'params': params, 'batch_stats': stats}


def _torch_segmenter(variables, bn_trainable, frozen_epsilon):
  """The released (feature_extractor, classifier) pair of `TinyBN`, in
  float64, holding `variables`."""
  bn = (torch.nn.BatchNorm2d(N) if bn_trainable  # eps 1e-5, momentum 0.1
        else ref.FrozenBatchNorm2d(N, frozen_epsilon))
  feature_extractor = torch.nn.Sequential(
      torch.nn.AvgPool2d(2), torch.nn.Conv2d(3, N, 1, bias=False), bn,
      torch.nn.ReLU()).double()
  classifier = torch.nn.Conv2d(N, C, 1).double()
  values = _torch_values(feature_extractor, classifier)
  with torch.no_grad():
    for keys, tree in ((SEGMENTER_KEYS, variables['params']),
                       (STATS_KEYS, variables['batch_stats'])):
      for path, leaf in _flat(tree).items():
        values[keys[path]].copy_(_to_torch(leaf))
  return feature_extractor, classifier


def _torch_discriminator(disc_variables):
  model_d = ref.fc_discriminator(C, DISC_WIDTHS).double()
  values = _torch_values(None, None, model_d)
  with torch.no_grad():
    for path, leaf in _flat(disc_variables['params']).items():
      values[DISC_KEYS[path]].copy_(_to_torch(leaf))
  return model_d


def _torch_values(*modules) -> dict:
  """Parameters and buffers, keyed '<module index>.<name>' (live tensors)."""
  return {f'{i}.{name}': value for i, module in enumerate(modules)
          if module is not None
          for name, value in module.state_dict(keep_vars=True).items()
          if not name.endswith('num_batches_tracked')}


def _capture() -> optax.GradientTransformation:
  """An 'optimiser' that leaves the parameters where they are and keeps the
  gradients it is given as its state: the step's exact gradients."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (
          jax.tree.map(jnp.zeros_like, grads), grads))


def _assert_tree(ours, values, keys, what, rtol=1e-6, atol=1e-7):
  for path, leaf in _flat(ours).items():
    np.testing.assert_allclose(np.asarray(leaf), _to_ours(values[keys[path]]),
                               rtol=rtol, atol=atol,
                               err_msg=f'{what} {"/".join(path)}')


def _assert_grads(ours, expected, keys, what, tol=1e-5):
  """Each leaf: max |ours - torch| <= tol * max |torch|. Frozen parameters,
  which torch keeps as buffers, must have no gradient at all."""
  for path, leaf in _flat(ours).items():
    key = keys[path]
    if key not in expected:
      np.testing.assert_array_equal(leaf, 0, err_msg=f'{what} {path}')
      continue
    reference = _to_ours(expected[key])
    assert np.abs(reference).max() > 0, (what, path)
    error = ref.relative_error(leaf, reference)
    assert error <= tol, f'{what} gradient {"/".join(path)}: {error:.2e}'


def _assert_metrics(metrics, expected, step):
  ours = {k: float(v) for k, v in metrics.compute().items()}
  for key, value in expected.items():
    if key != 'grads':
      assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (
          f'step {step}: {key} {ours[key]!r} vs torch {value!r}')


def _released_stage(name):
  config = default.get_config()
  default.released(config)
  config.model.num_classes = C
  config.discriminator.widths = DISC_WIDTHS
  stage = config.stages[name]
  stage.schedule_steps = 5  # the poly rate moves between the two steps
  return config, stage


def _image(rng, b, h, w):
  return rng.randn(b, h, w, 3).astype(np.float32)


def _labels(rng, b, h, w):
  labels = rng.randint(0, C, (b, h, w)).astype(np.int32)
  labels[:, :3, :5] = 255
  return labels


@pytest.mark.parametrize('adversarial_weight', [None, 1.0],
                         ids=['released', 'adversarial_weight_1'])
def test_released_warmup_steps_equal_torch(adversarial_weight):
  """Two warm-up steps: loss terms, both networks' gradients (first step)
  and parameters (after each step) equal the released iteration's. The
  torch side takes every hyper-parameter from the released recipe, ours from
  the config; `adversarial_weight_1` makes the adversarial path's share of
  the segmenter's gradient as large as the CE's."""
  config, stage = _released_stage('warmup')
  lambda_adv = {}
  if adversarial_weight is not None:
    stage.adversarial_weight = lambda_adv['lambda_adv'] = adversarial_weight
  rng = np.random.RandomState(0)
  model = TinyBN(stage.bn_trainable, config.model.frozen_bn_epsilon)
  variables = _random_variables(model, rng)
  disc = from_config.discriminator_for(config)
  # 3 x PyTorch's default range: a D whose output depends on its input
  # enough that the adversarial gradient is a large share of the CE's
  disc_variables = jax.tree.map(
      lambda a: jnp.asarray(rng.uniform(-1, 1, a.shape) * (
          3 * (16 * a.shape[2]) ** -0.5 if a.ndim == 4 else 0.1), jnp.float32),
      jax.eval_shape(disc.init, jax.random.key(2),
                     jnp.zeros((1, 32, 32, C))))
  fe, cls = _torch_segmenter(variables, False, 0.0)  # released: eps 0
  model_d = _torch_discriminator(disc_variables)
  optimizers = (*ref.segmenter_optimizers(fe, cls, 2.5e-4, 0.9, 5e-4),
                torch.optim.Adam(model_d.parameters(), lr=1e-4,
                                 betas=(0.9, 0.99)))
  batches = []
  for _ in range(2):  # source 32x48, target 32x64 (D outputs 1x1 and 1x2)
    batches.append(({'image': _image(rng, 2, 32, 48),
                     'label': _labels(rng, 2, 32, 48)},
                    {'image': _image(rng, 2, 32, 64),
                     'label': np.full((2, 32, 64), 255, np.int32)}))

  def run(tx, d_tx, steps):
    state = train_state.new_train_state(variables, tx, jax.random.PRNGKey(1),
                                        disc_params=disc_variables, d_tx=d_tx,
                                        num_features=N, num_classes=C)
    step = jax.jit(train_steps.make_warmup_step(model, disc, tx, d_tx, stage,
                                                config.discriminator))
    for source, target in batches[:steps]:
      state, metrics = step(state, source, target)
      yield state, metrics

  (captured, _), = run(_capture(), _capture(), 1)
  tx = train_state.segmenter_optimizer(stage, variables['params'],
                                       variables['batch_stats'])
  d_tx = train_state.discriminator_optimizer(stage)
  for i, (state, metrics) in enumerate(run(tx, d_tx, 2)):
    source, target = batches[i]
    expected = ref.released_warmup_iteration(
        fe, cls, model_d, optimizers, ref.nchw(source['image']).double(),
        torch.tensor(source['label']).long(),
        ref.nchw(target['image']).double(), iteration=i, base_lr=2.5e-4,
        base_lr_d=1e-4, max_iters=5, power=0.9, **lambda_adv)
    if i == 0:  # before the parameters: Adam's update hides a gradient scale
      _assert_grads(captured.opt_state, expected['grads'], SEGMENTER_KEYS,
                    'segmenter')
      _assert_grads(captured.disc_opt_state['params'], expected['grads'],
                    DISC_KEYS, 'discriminator')
    _assert_metrics(metrics, expected, i)
    values = _torch_values(fe, cls, model_d)
    _assert_tree(state.params, values, SEGMENTER_KEYS, f'step {i}')
    _assert_tree(state.disc_params['params'], values, DISC_KEYS, f'step {i}')
    # frozen BatchNorm: affine parameters and statistics never move
    for tree, initial in ((state.params['bn'], variables['params']['bn']),
                          (state.batch_stats, variables['batch_stats'])):
      jax.tree.map(np.testing.assert_array_equal, tree, initial)


@pytest.mark.parametrize('source_weight', [None, 0.5],
                         ids=['released_target_only', 'joint'])
def test_released_self_training_steps_equal_torch(source_weight):
  """Two self-training steps with trainable BatchNorm: loss terms, the
  gradients (first step), every parameter and the BN running statistics
  (after each step) equal the released iteration's; `joint` (our CBST-style
  variant) adds 0.5 x the source CE, the source batch forwarded first."""
  config, stage = _released_stage('self_training')
  assert stage.bn_trainable
  rng = np.random.RandomState(1)
  model = TinyBN(True, config.model.frozen_bn_epsilon)
  variables = _random_variables(model, rng)
  fe, cls = _torch_segmenter(variables, True, 0.0)
  optimizers = ref.segmenter_optimizers(fe, cls, 5e-4, 0.9, 5e-4)
  batches = []
  for _ in range(2):
    target = {'image': _image(rng, 2, 8, 12), 'label': _labels(rng, 2, 8, 12)}
    source = None
    if source_weight is not None:
      source = {'image': _image(rng, 3, 8, 12) * 2 + 0.5,
                'label': _labels(rng, 3, 8, 12)}
    batches.append((target, source))
  if source_weight is not None:
    stage.source_weight = source_weight
    # 2 target and 3 source images, on one GPU in the torch reference: one
    # pixel mean over each batch (the released target-only step's n = 2
    # already is its whole batch)
    stage.images_per_loss_mean = 0

  def run(tx, steps):
    state = train_state.new_train_state(variables, tx, jax.random.PRNGKey(1),
                                        num_features=N, num_classes=C)
    step = jax.jit(train_steps.make_self_training_step(model, tx, stage))
    for target, source in batches[:steps]:
      state, metrics = (step(state, target) if source is None
                        else step(state, target, source))
      yield state, metrics

  (captured, _), = run(_capture(), 1)
  tx = train_state.segmenter_optimizer(stage, variables['params'],
                                       variables['batch_stats'])
  for i, (state, metrics) in enumerate(run(tx, 2)):
    target, source = batches[i]
    joint = {}
    if source is not None:
      joint = {'src_input': ref.nchw(source['image']).double(),
               'src_label': torch.tensor(source['label']).long(),
               'source_weight': source_weight}
    expected = ref.released_self_training_iteration(
        fe, cls, optimizers, ref.nchw(target['image']).double(),
        torch.tensor(target['label']).long(), iteration=i, base_lr=5e-4,
        max_iters=5, power=0.9, **joint)
    if i == 0:
      _assert_grads(captured.opt_state, expected['grads'], SEGMENTER_KEYS,
                    'segmenter')
    _assert_metrics(metrics, expected, i)
    values = _torch_values(fe, cls)
    _assert_tree(state.params, values, SEGMENTER_KEYS, f'step {i}')
    _assert_tree(state.batch_stats, values, STATS_KEYS, f'step {i}')
