"""Step-level parity: one SPCL step of `train.make_spcl_step` with the
released settings equals an independent PyTorch computation of the released
step on a tiny network (loss terms, every parameter after the SGD update,
the new prototypes). Pins the step's composition: L_seg / 1.8 + λ (L_cl^s +
L_cl^t), prototypes updated before the loss, absent classes decayed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import default
from spcl_jax import spcl
from spcl_jax import train

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
  tx = train.segmenter_optimizer(stage, p, {})
  state = train.new_train_state(variables, tx, jax.random.PRNGKey(1), bank)
  new_state, metrics = jax.jit(train.make_spcl_step(model, tx, stage))(
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
