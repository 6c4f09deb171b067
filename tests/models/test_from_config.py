"""The networks a config names: which BatchNorm ε each use of the segmenter
gets (`model.frozen_bn_epsilon`, `model.pass_bn_epsilon`)."""

from configs import gta5
from spcl_jax.models import from_config


def test_passes_use_pass_bn_epsilon_and_training_the_frozen_one():
  """Under `:released`: training with frozen BatchNorm (and its evaluation)
  ε = 0, the release's FrozenBatchNorm2d; the prototype and pseudo-label
  passes 1e-5, the release's BatchNorm2d in eval mode."""
  config = gta5.get_config('released')
  training_model = from_config.model_for_stage(config, False)
  assert training_model.backbone.frozen_bn_epsilon == 0.0
  pass_model = from_config.model_for_pass(config)
  assert pass_model.backbone.frozen_bn_epsilon == 1e-5
  assert not pass_model.backbone.bn_trainable
  config.model.pass_bn_epsilon = 1e-3
  assert from_config.model_for_pass(config).backbone.frozen_bn_epsilon == 1e-3


def test_a_config_without_pass_bn_epsilon_passes_with_the_frozen_one():
  """A workdir's config written before the field: its passes ran with
  frozen_bn_epsilon."""
  config = gta5.get_config()
  config.model.frozen_bn_epsilon = 0.0
  del config.model['pass_bn_epsilon']
  assert from_config.model_for_pass(config).backbone.frozen_bn_epsilon == 0.0


def test_a_stage_is_evaluated_with_the_bn_epsilon_of_how_it_trained():
  """Under `:released` (and so in `spcl_jax.evaluate`, `analyze`): warm-up
  and SPCL train with frozen BatchNorm and are evaluated with its ε = 0;
  self-training trains BatchNorm and is evaluated with BatchNorm2d's."""
  config = gta5.get_config('released')
  epsilons = {name: from_config.model_for_evaluation(
      config, name).backbone.frozen_bn_epsilon
              for name in ('warmup', 'spcl', 'self_training')}
  assert epsilons == {'warmup': 0.0, 'spcl': 0.0, 'self_training': 1e-5}
  assert not from_config.model_for_evaluation(
      config, 'self_training').backbone.bn_trainable
