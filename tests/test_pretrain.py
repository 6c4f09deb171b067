"""The demo's pretraining: what it writes is what a stage starts from."""

import os

import flax
import jax
import numpy as np
import pytest

from configs import demo
from configs import demo_pretrain
from spcl_jax.infra import workdir
from spcl_jax import models
from spcl_jax.models import from_config
from spcl_jax.run import pretraining as pretraining_lib


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  config = demo_pretrain.get_config('smoke')
  backbone, summary = pretraining_lib.pretrain(config)
  output = str(tmp_path_factory.mktemp('pretrained') / 'weights')
  pretraining_lib.write_backbone(output, config, backbone, summary)
  return config, backbone, summary, output


def test_pretrained_backbone_is_what_the_segmenter_starts_from(pretrained):
  config, backbone, summary, output = pretrained
  variables = models.load_pretrained(output, config.model.name, 19,
                                     jax.random.key(1),
                                     base_width=config.model.base_width)
  for collection in ('params', 'batch_stats'):
    saved = flax.traverse_util.flatten_dict(backbone[collection])
    loaded = flax.traverse_util.flatten_dict(
        variables[collection]['backbone'])
    assert saved.keys() == loaded.keys()
    for path, value in saved.items():
      np.testing.assert_array_equal(np.asarray(loaded[path]), value)
  assert 'classifier' in variables['params']  # the ASPP head stays fresh
  assert summary['categories'][0] == 'boxy_car'
  assert [h['step'] for h in summary['history']] == [2, 4]


def test_trained_backbone_differs_from_its_initialisation(pretrained):
  config, backbone, _, _ = pretrained
  fresh = pretraining_lib.Classifier(pretraining_lib.backbone_of(config, True), 16).init(
      jax.random.key(config.seed), np.zeros((1, 32, 32, 3), np.float32))
  assert not np.allclose(backbone['params']['conv1']['kernel'],
                         fresh['params']['backbone']['conv1']['kernel'])


def test_other_width_is_refused_naming_both(pretrained):
  config, _, _, output = pretrained
  with pytest.raises(ValueError, match='base_width 32.*base_width 16'):
    models.load_pretrained(output, config.model.name, 19, jax.random.key(1),
                           base_width=32)


def test_augment_keeps_shape_and_content_under_no_padding():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
  same = pretraining_lib.augment(images, rng, pad=0, flip=False)
  np.testing.assert_array_equal(same, images)
  flipped = pretraining_lib.augment(images, np.random.default_rng(1), pad=2,
                                    flip=True)
  assert flipped.shape == images.shape


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match='smok'):
    demo_pretrain.get_config('smok')


def test_existing_weights_are_reused_only_for_the_same_recipe(pretrained):
  config, _, _, output = pretrained
  before = os.stat(os.path.join(output, 'metadata.json')).st_mtime_ns
  assert pretraining_lib.ensure_pretrained(output, config) == output
  assert os.stat(os.path.join(output, 'metadata.json')).st_mtime_ns == before
  other = demo_pretrain.get_config('smoke')
  other.steps = 5
  with pytest.raises(ValueError, match='fields steps differ'):
    pretraining_lib.ensure_pretrained(output, other)


def test_pretrained_variant_refuses_a_backbone_of_another_width(tmp_path):
  config = demo.get_config('pretrained')
  config.model.pretrained_dir = str(tmp_path / 'weights')
  config.model.base_width = 32
  with pytest.raises(ValueError, match='base width 16 but model is '
                     'deeplabv2_resnet18 at base width 32'):
    pretraining_lib.initial_variables(config, jax.random.key(0))
  assert not os.path.exists(tmp_path / 'weights')


def test_shipped_weights_follow_the_recipe_and_load_into_the_demo_model():
  """configs/demo.py:pretrained reads the weights shipped in weights/: made
  with configs/demo_pretrain.py as it is (else ensure_pretrained would
  refuse them), loaded without pretraining or writing anything."""
  config = demo.get_config('pretrained')
  directory = config.model.pretrained_dir
  assert directory == demo.SHIPPED_PRETRAINED_DIR
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(directory)
                 for f in fs)
  before = [os.stat(f).st_mtime_ns for f in files]
  metadata = workdir.read_json(os.path.join(directory, 'metadata.json'))
  assert metadata['val_accuracy'] >= 0.98
  variables = pretraining_lib.initial_variables(config, jax.random.key(0))
  fresh = models.init_variables(from_config.model_for_stage(config, False),
                                jax.random.key(0))
  assert [os.stat(f).st_mtime_ns for f in files] == before
  loaded = flax.traverse_util.flatten_dict(variables['params']['backbone'])
  initial = flax.traverse_util.flatten_dict(fresh['params']['backbone'])
  assert loaded.keys() == initial.keys()
  for path, value in loaded.items():
    assert np.all(np.isfinite(value)), path
  assert not np.allclose(loaded[('conv1', 'kernel')],
                         initial[('conv1', 'kernel')])


def test_mit_encoder_pretrains_with_adamw_and_loads_into_segformer(tmp_path):
  """configs/demo_pretrain.py:mit: the MiT encoder (no BatchNorm, several
  maps: the classifier pools the last) trains with AdamW, is written
  without an empty statistics collection and loads into the segmenter."""
  config = demo_pretrain.get_config('smoke,mit')
  assert config.optimizer == 'adamw'
  backbone, _ = pretraining_lib.pretrain(config)
  output = str(tmp_path / 'mit')
  pretraining_lib.write_backbone(output, config, backbone, {})
  variables = models.load_pretrained(output, 'segformer_mit_demo', 19,
                                     jax.random.key(1))
  saved = flax.traverse_util.flatten_dict(backbone['params'])
  loaded = flax.traverse_util.flatten_dict(variables['params']['backbone'])
  assert saved.keys() == loaded.keys()
  for path, value in saved.items():
    np.testing.assert_array_equal(np.asarray(loaded[path]), value)
  fresh = models.init_variables(
      models.create_model('segformer_mit_demo', 19), jax.random.key(1))
  assert not np.allclose(loaded[('patch_embed1', 'kernel')],
                         fresh['params']['backbone']['patch_embed1']['kernel'])


def test_shipped_mit_weights_follow_the_recipe():
  """configs/demo.py:mit reads its own shipped encoder, made with
  configs/demo_pretrain.py:mit as it is (ensure_pretrained compares)."""
  config = demo.get_config('mit')
  assert config.model.pretrained_dir == demo.SHIPPED_MIT_PRETRAINED_DIR
  metadata = workdir.read_json(os.path.join(config.model.pretrained_dir,
                                            'metadata.json'))
  assert metadata['arch'] == 'mit_demo' and metadata['val_accuracy'] >= 0.9
  variables = pretraining_lib.initial_variables(config, jax.random.key(0))
  assert set(variables['params']) == {'backbone', 'classifier'}
