"""The config checks of the fields that reproduce the released code
(docs/released_code.md): bad values refused naming the field, and a
workdir written before a field existed resumes at the value that
reproduces its run."""

import json

import pytest

from configs import demo
from configs import gta5
from spcl_jax.run import config_checks


@pytest.mark.parametrize('path,value,expected', [
    ('stages.spcl.images_per_loss_mean', -1,
     'stages.spcl.images_per_loss_mean = -1 must be an integer >= 0'),
    ('stages.self_training.images_per_loss_mean', 3,
     'stages.self_training.images_per_loss_mean = 3 does not divide '
     'stages.self_training.target_batch_size = 8'),
    ('data.color_jitter_order', 'first',
     "data.color_jitter_order: 'first', expected one of ('after_resize', "
     "'before_resize')"),
    ('data.scaled_size_rounding', 'ceil',
     "data.scaled_size_rounding: 'ceil', expected one of ['floor', "
     "'round']"),
    ('model.pass_bn_epsilon', -1e-5,
     'model.pass_bn_epsilon = -1e-05 must be a number >= 0'),
    ('stages.warmup.optimizer', 'adam',
     "stages.warmup.optimizer: 'adam', expected one of ('sgd', 'adamw')"),
    ('stages.spcl.lr_warmup_steps', 70_000,
     'stages.spcl.lr_warmup_steps = 70000 must be an integer in [0, '
     'schedule_steps]'),
    ('stages.spcl.lr_warmup_ratio', 2.0,
     'stages.spcl.lr_warmup_ratio = 2.0 must be a fraction in [0, 1]'),
    ('stages.self_training.adam_betas', (0.9, 1.5),
     'stages.self_training.adam_betas = (0.9, 1.5) must be two numbers in '
     '[0, 1)'),
    ('model.drop_path_rate', 0.1,
     'model.drop_path_rate = 0.1 but deeplabv2_resnet101 is a deeplab model '
     'without it; leave it at 0.0'),
    ('data.source_crop_from', 'resized',
     "data.source_crop_from = 'resized' needs data.source_crop_size"),
    ('stages.warmup.decay_norms', False,
     'stages.warmup.decay_norms = False but deeplabv2_resnet101 has no module '
     'named *norm*'),
])
def test_a_bad_value_is_refused_naming_its_field(path, value, expected):
  config = gta5.get_config()
  parent, _, key = path.rpartition('.')
  block = config
  for part in parent.split('.'):
    block = block[part]
  with config.unlocked():
    block[key] = value
  with pytest.raises(ValueError) as error:
    config_checks.validate(config, num_devices=4)
  assert expected in str(error.value)


def test_released_sets_the_new_fields_and_validates():
  ours, released = gta5.get_config(), gta5.get_config('released')
  assert [(c.stages.warmup.images_per_loss_mean,
           c.stages.spcl.images_per_loss_mean,
           c.stages.self_training.images_per_loss_mean,
           c.data.color_jitter_order, c.data.scaled_size_rounding,
           c.model.frozen_bn_epsilon, c.model.pass_bn_epsilon)
          for c in (ours, released)] == [
              (0, 0, 0, 'after_resize', 'round', 1e-5, 1e-5),
              (1, 1, 2, 'before_resize', 'floor', 0.0, 1e-5)]
  config_checks.validate(released, num_devices=4)
  released.stages.spcl.images_per_loss_mean = 0
  with pytest.raises(ValueError, match='contradicts '
                     'stages.spcl.images_per_loss_mean = 0'):
    config_checks.validate(released, num_devices=4)


def _older_workdir(tmp_path, config):
  """`config` as a workdir written before the fields existed."""
  older = config_checks.config_to_json(config)
  del older['model']['pass_bn_epsilon']
  del older['data']['color_jitter_order'], older['data']['scaled_size_rounding']
  for stage in older['stages'].values():
    stage.pop('images_per_loss_mean', None)
  (tmp_path / 'config.json').write_text(json.dumps(older))


def test_an_older_workdir_resumes_at_the_values_of_its_run(tmp_path):
  config = demo.get_config('smoke')
  _older_workdir(tmp_path, config)
  config_checks.check_workdir_config(config, str(tmp_path), False)
  for change, message in [
      (('stages', 'spcl', 'images_per_loss_mean', 1),
       r'stages.spcl.images_per_loss_mean: .<absent>. -> 1'),
      (('data', 'color_jitter_order', 'before_resize'),
       r"data.color_jitter_order: .<absent>. -> 'before_resize'"),
      (('model', 'pass_bn_epsilon', 0.0),
       r'model.pass_bn_epsilon: .<absent>. -> 0.0')]:
    _older_workdir(tmp_path, config)
    changed = demo.get_config('smoke')
    *path, key, value = change
    block = changed
    for part in path:
      block = block[part]
    block[key] = value
    with pytest.raises(config_checks.ConfigMismatchError, match=message):
      config_checks.check_workdir_config(changed, str(tmp_path), False)


def test_an_older_workdirs_passes_ran_with_its_frozen_epsilon(tmp_path):
  """Before `model.pass_bn_epsilon` the passes used frozen_bn_epsilon: a
  workdir with ε = 0 resumes with pass_bn_epsilon 0, not with 1e-5."""
  config = demo.get_config('smoke')
  config.model.frozen_bn_epsilon = 0.0
  config.model.pass_bn_epsilon = 0.0
  _older_workdir(tmp_path, config)
  config_checks.check_workdir_config(config, str(tmp_path), False)
  _older_workdir(tmp_path, config)
  config.model.pass_bn_epsilon = 1e-5
  with pytest.raises(config_checks.ConfigMismatchError,
                     match=r'model.pass_bn_epsilon: .<absent>. -> 1e-05'):
    config_checks.check_workdir_config(config, str(tmp_path), False)


@pytest.mark.parametrize('path,value,expected', [
    ('model.aspp_rates', (6, 12),
     'model.aspp_rates = (6, 12) but segformer_mit_b5 is a segformer model '
     'without it; leave it at (6, 12, 18, 24)'),
    ('model.base_width', 16, 'model.base_width = 16 but segformer_mit_b5'),
    ('model.head_dropout', 1.0, 'model.head_dropout = 1.0 must be a number '
     'in [0, 1)'),
    ('model.remat', 'groups', "model.remat = 'groups' but model "
     "'segformer_mit_b5' has no stages of repeated blocks to group"),
])
def test_deeplab_fields_are_refused_on_a_segformer(path, value, expected):
  config = gta5.get_config('mit_b5')
  block, _, key = path.rpartition('.')
  with config.unlocked():
    config[block][key] = value
  with pytest.raises(ValueError) as error:
    config_checks.validate(config, num_devices=2)
  assert expected in str(error.value)


def test_a_workdir_written_before_the_optimiser_fields_resumes(tmp_path):
  """A workdir whose config.json predates the MiT fields (optimizer,
  warm-up, norms' decay, stochastic depth, crops' origin) resumes with
  today's defaults, which compute what it did; another value is a change."""
  config = gta5.get_config()
  old = config_checks.config_to_json(config)
  for stage in ('warmup', 'spcl', 'self_training'):
    for field in ('optimizer', 'adam_betas', 'decay_norms', 'lr_warmup_steps',
                  'lr_warmup_ratio'):
      del old['stages'][stage][field]
  for field in ('drop_path_rate', 'head_dropout'):
    del old['model'][field]
  del old['data']['source_crop_from']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  config_checks.check_workdir_config(config, str(tmp_path), False)
  with config.unlocked():
    config.stages.spcl.optimizer = 'adamw'
  with pytest.raises(config_checks.ConfigMismatchError, match='optimizer'):
    config_checks.check_workdir_config(config, str(tmp_path), False)
