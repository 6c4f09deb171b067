"""SegFormer (MiT encoder + all-MLP head) against `transformers`' PyTorch
SegformerForSemanticSegmentation with the same random weights."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spcl_jax import models
from spcl_jax.models import mit

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from benchmarks import segformer_reference as ref  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('variant', ['b0', 'b5'])
def test_matches_transformers_segformer(variant):
  num_labels = 19
  torch_model = ref.random_segformer(variant, num_labels)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 67, 93, 3)).astype(np.float32)  # odd sizes
  with torch.no_grad():
    out = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                      output_hidden_states=True)
  ours = models.create_model(f'segformer_mit_{variant}', num_labels)
  variables = ref.ported_variables(torch_model, variant)
  maps = jax.jit(lambda v, x: ours.apply(v, x, method=lambda m, x: m.backbone(
      x, False)))(variables, images)
  assert len(maps) == len(out.hidden_states) == 4
  for ours_map, theirs in zip(maps, out.hidden_states):
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    assert ours_map.shape == theirs.shape
    assert ref.relative_error(ours_map, theirs) <= 1e-4
  result = jax.jit(ours.apply)(variables, images)
  logits = out.logits.numpy().transpose(0, 2, 3, 1)
  assert result['logits'].shape == logits.shape == (2, 17, 24, num_labels)
  assert ref.relative_error(result['logits'], logits) <= 1e-4
  assert result['features'].shape == (2, 17, 24, ours.num_features)
  assert ours.num_features == mit.MIT_VARIANTS[variant].decoder_width


def test_stage_sizes_round_up():
  model = models.create_model('segformer_mit_demo', 5)
  images = jax.ShapeDtypeStruct((1, 33, 50, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  maps = jax.eval_shape(lambda v, x: model.apply(
      v, x, method=lambda m, x: m.backbone(x, False)), variables, images)
  assert [m.shape[1:3] for m in maps] == [(9, 13), (5, 7), (3, 4), (2, 2)]


def test_parameter_tree_and_groups():
  """The whole decode head is `classifier` (the optimiser's 10x group, as
  DAFormer's head); the encoder has no BatchNorm, the head one."""
  model = models.create_model('segformer_mit_demo', 7)
  variables = jax.eval_shape(
      lambda: models.init_variables(model, jax.random.key(0)))
  assert set(variables['params']) == {'backbone', 'classifier'}
  assert jax.tree.map(np.shape, variables['batch_stats']) == {
      'classifier': {'fuse_bn': {'mean': (128,), 'var': (128,)}}}
  assert set(variables['params']['classifier']) == {
      'linear_c1', 'linear_c2', 'linear_c3', 'linear_c4', 'fuse', 'fuse_bn',
      'logits'}
  flat = flax.traverse_util.flatten_dict(variables['params']['backbone'])
  assert ('stage3_0', 'attention', 'reduction', 'kernel') in flat
  assert ('stage4_0', 'attention', 'reduction', 'kernel') not in flat  # r=1


def test_drop_path_and_dropout_only_under_train():
  model = models.create_model('segformer_mit_demo', 5, drop_path_rate=0.5,
                              head_dropout=0.5)
  variables = models.init_variables(model, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  plain = models.create_model('segformer_mit_demo', 5)
  evaluated = jax.jit(model.apply)(variables, images)
  assert np.array_equal(evaluated['logits'],
                        jax.jit(plain.apply)(variables, images)['logits'])

  @jax.jit
  def train_logits(key):
    return model.apply(variables, images, train=True,
                       rngs={'dropout': key})['logits']

  def train(seed):
    return train_logits(jax.random.key(seed))
  np.testing.assert_array_equal(train(2), train(2))   # the key decides
  assert not np.allclose(train(2), train(3))
  assert not np.allclose(train(2), evaluated['logits'])
  with pytest.raises(Exception, match='dropout'):
    model.apply(variables, images, train=True)


def test_drop_path_rates_rise_linearly():
  assert mit.drop_path_rates((1, 2, 1, 1), 0.1) == pytest.approx(
      [0.0, 0.025, 0.05, 0.075, 0.1])
  assert mit.drop_path_rates((1,), 0.3) == [0.0]


def test_remat_keeps_values_and_gradients():
  images = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
  plain = models.create_model('segformer_mit_demo', 5)
  remat = models.create_model('segformer_mit_demo', 5, remat='blocks')
  variables = models.init_variables(plain, jax.random.key(0))

  def loss(model):
    return lambda p: (model.apply({**variables, 'params': p},
                                 images)['logits'] ** 2).mean()
  def fc1_gradient(model):
    return jax.jit(jax.grad(loss(model)))(variables['params'])['backbone'][
        'stage1_0']['ffn']['fc1']['kernel']
  np.testing.assert_allclose(fc1_gradient(remat), fc1_gradient(plain),
                             rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='groups'):
    models.create_model('segformer_mit_demo', 5, remat='groups')


def test_deeplab_keywords_refused():
  with pytest.raises(TypeError, match='aspp_rates'):
    models.create_model('segformer_mit_b0', 5, aspp_rates=(6, 12))
  with pytest.raises(TypeError, match='drop_path_rate'):
    models.create_model('deeplabv2_resnet18', 5, drop_path_rate=0.1)
