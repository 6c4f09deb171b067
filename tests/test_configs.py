"""Every config builds, and gta5.py holds the released recipe (SPEC §2)."""

import importlib
import os
import re

import pytest

from spcl_jax.run import config_checks
from spcl_jax.run import pipeline
from spcl_jax.run import released as released_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name,args', [
    ('default', ''), ('gta5', ''), ('gta5', 'vgg16'), ('gta5', 'source_only'),
    ('synthia', ''), ('synthia', 'vgg16'), ('synscapes', ''), ('demo', ''),
    ('demo', 'smoke'), ('demo', 'oracle,warmup'), ('demo', 'source_only'),
    ('demo', 'pretrained,class_balanced'), ('demo', 'scratch,released_labels'),
    ('demo', 'res96,scratch,released_labels'), ('gta5', 'class_balanced'),
    ('gta5', 'mit_b5'), ('synthia', 'mit_b5'), ('synscapes', 'mit_b5'),
    ('demo', 'mit'), ('demo', 'mit,smoke')])
def test_every_config_and_variant_validates(name, args):
  config = importlib.import_module(f'configs.{name}').get_config(args)
  # the recipes on one GPU node of the paper (the MiT recipe's 2 + 2 on
  # two); the CPU demo's 2 + 2 images a step on (at most) two devices
  devices = 2 if (name == 'demo' and 'smoke' not in args
                  or 'mit_b5' in args) else 4
  config_checks.validate(config, num_devices=devices)


@pytest.mark.parametrize('name,plain_arg', [
    ('gta5', ''), ('synthia', ''), ('synscapes', ''),
    ('demo', 'released_labels')])
def test_class_balanced_changes_only_the_self_training_labels(name, plain_arg):
  module = importlib.import_module(f'configs.{name}')
  plain = module.get_config(plain_arg)
  balanced = module.get_config(plain_arg + ',class_balanced')
  assert (balanced.stages.pseudo_labels_2.threshold_quantile,
          balanced.stages.pseudo_labels_2.threshold_cap) == (0.8, 1.0)
  balanced.stages.pseudo_labels_2.threshold_quantile = 0.5
  balanced.stages.pseudo_labels_2.threshold_cap = 0.9
  assert balanced.to_dict() == plain.to_dict()  # nothing else, stage 3 kept


def test_demo_defaults_to_the_shipped_backbone_and_class_balanced_labels():
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  assert config.model.pretrained_dir == demo.SHIPPED_PRETRAINED_DIR
  assert config.model.pretrain_if_missing
  labels = config.stages.pseudo_labels_2
  assert (labels.threshold_quantile, labels.threshold_cap) == (0.8, 1.0)
  # the SPCL stage's offline mask keeps the released rule
  assert (config.stages.pseudo_labels.threshold_quantile,
          config.stages.pseudo_labels.threshold_cap) == (0.5, 0.9)
  assert config.to_dict() == demo.get_config(
      'pretrained,class_balanced').to_dict()
  # `scratch,released_labels` is the demo before docs/research_log.md §4: it differs
  # in these fields only
  old = demo.get_config('scratch,released_labels')
  assert (old.model.pretrained_dir, old.model.pretrain_if_missing) == (
      '', False)
  old.model.pretrained_dir = config.model.pretrained_dir
  old.model.pretrain_if_missing = True
  old.stages.pseudo_labels_2.threshold_quantile = 0.8
  old.stages.pseudo_labels_2.threshold_cap = 1.0
  assert old.to_dict() == config.to_dict()


def test_res96_is_the_demo_size_of_results_1_to_4():
  """`:res96` restores the size and batches docs/research_log.md §1-§4 measured
  (96x192, 4 + 4 images, self-training 8 crops of 96x192 at 0.5-1.0x) and
  changes nothing else; the default trains on the same pixels per step."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  config, res96 = demo.get_config(), demo.get_config('res96')
  assert res96.data.eval_size == res96.data.source_size == (96, 192)
  assert res96.stages.warmup.source_batch_size == 4
  assert (res96.stages.self_training.target_batch_size,
          res96.stages.self_training.crop_size,
          res96.stages.self_training.scale_range) == (8, (96, 192), (0.5, 1.0))
  pixels = lambda c: (c.stages.warmup.source_batch_size
                      * c.data.source_size[0] * c.data.source_size[1])
  assert 0.85 < pixels(config) / pixels(res96) <= 1.0
  for field in ('data.source_size', 'data.target_size', 'data.eval_size',
                'stages.warmup.source_batch_size',
                'stages.warmup.target_batch_size',
                'stages.spcl.source_batch_size',
                'stages.spcl.target_batch_size',
                'stages.self_training.target_batch_size',
                'stages.self_training.crop_size',
                'stages.self_training.scale_range'):
    *parents, key = field.split('.')
    node = res96
    for parent in parents:
      node = node[parent]
    expected = config
    for part in field.split('.'):
      expected = expected[part]
    node[key] = expected
  assert res96.to_dict() == config.to_dict()


def test_unknown_config_argument_is_named():
  from configs import gta5  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='vgg19'):
    gta5.get_config('vgg19')


def test_gta5_holds_the_released_recipe():
  from configs import gta5  # pylint: disable=g-import-not-at-top
  c = gta5.get_config()
  assert c.model.name == 'deeplabv2_resnet101'
  assert c.model.aspp_rates == (6, 12, 18, 24)
  assert c.data.source_size == (720, 1280)
  assert c.data.target_size == c.data.eval_size == (512, 1024)
  assert c.data.mean == (0.485, 0.456, 0.406)
  assert c.data.std == (0.229, 0.224, 0.225)
  assert c.data.source_color_jitter == (0.5, 0.5, 0.5, 0.2)
  assert c.evaluation.class_sets == (19,)
  w = c.stages.warmup
  assert (w.steps, w.schedule_steps) == (40_000, 62_500)
  assert (w.source_batch_size, w.target_batch_size) == (4, 4)
  assert (w.lr, w.classifier_lr_multiplier, w.momentum, w.weight_decay,
          w.poly_power) == (2.5e-4, 10.0, 0.9, 5e-4, 0.9)
  assert w.adversarial_weight == 0.001
  assert (w.discriminator_lr, w.discriminator_betas) == (1e-4, (0.9, 0.99))
  assert w.logit_temperature == 1.8 and not w.bn_trainable
  s = c.stages.spcl
  assert (s.steps, s.schedule_steps, s.lr) == (40_000, 62_500, 2.5e-4)
  assert (s.source_batch_size, s.target_batch_size) == (4, 4)
  assert (s.alpha, s.temperature, s.contrastive_weight) == (0.1, 100.0, 1.0)
  assert s.logit_temperature == 1.8 and not s.bn_trainable
  assert s.target_mask == 'offline' and not s.decay_absent_classes
  t = c.stages.self_training
  assert (t.steps, t.schedule_steps, t.lr) == (20_000, 31_250, 5e-4)
  assert t.target_batch_size == 8 and t.bn_trainable
  assert t.logit_temperature == 1.0
  assert (t.scale_range, t.crop_size, t.flip) == ((0.5, 1.5), (512, 1024),
                                                  True)
  assert t.color_jitter == (0.5, 0.5, 0.5, 0.2)
  # torchvision's jitter on PIL images, as the released transforms
  assert c.data.color_jitter_implementation == 'released'
  for name in ('pseudo_labels', 'pseudo_labels_2'):
    assert c.stages[name].threshold_cap == 0.9
    assert c.stages[name].threshold_quantile == 0.5  # the median


def test_synthia_and_synscapes_sizes_and_class_sets():
  from configs import synscapes, synthia  # pylint: disable=g-import-not-at-top
  assert synthia.get_config().data.source_size == (760, 1280)
  assert synthia.get_config().evaluation.class_sets == (16, 13)
  # the released protocol: a 16-way head over SYNTHIA's classes
  assert synthia.get_config().model.num_classes == 16
  assert synthia.get_config().data.label_space == 'synthia16'
  assert synscapes.get_config().model.num_classes == 19
  assert synscapes.get_config().data.source_size == (512, 1024)


@pytest.mark.parametrize('name', ['gta5', 'synthia', 'synscapes'])
def test_released_variant_turns_on_every_released_behaviour(name):
  module = importlib.import_module(f'configs.{name}')
  ours, released = module.get_config(), module.get_config('released')
  assert not ours.released and released.released
  assert (ours.stages.spcl.prototype_update,
          released.stages.spcl.prototype_update) == ('after_loss',
                                                     'before_loss')
  assert (ours.stages.spcl.decay_absent_classes,
          released.stages.spcl.decay_absent_classes) == (False, True)
  assert (ours.chain_model, released.chain_model) == ('final', 'best')
  assert (ours.data.image_interpolation,
          released.data.image_interpolation) == ('bilinear', 'bicubic')
  assert released.stages.spcl.target_mask == 'offline'
  config_checks.validate(released, num_devices=4)


def test_released_with_a_contradicting_setting_is_refused():
  from configs import gta5  # pylint: disable=g-import-not-at-top
  config = gta5.get_config('released')
  config.stages.spcl.target_mask = 'online'
  config.chain_model = 'final'
  with pytest.raises(ValueError) as error:
    config_checks.validate(config, num_devices=4)
  message = str(error.value)
  assert ("released = True (the `:released` variant) contradicts "
          "stages.spcl.target_mask = 'online'; the released code has "
          "'offline'") in message
  assert "contradicts chain_model = 'final'" in message


def test_colour_jitter_implementation_is_checked_and_reaches_the_pipeline():
  from configs import demo  # pylint: disable=g-import-not-at-top
  from spcl_jax.data import loaders  # pylint: disable=g-import-not-at-top
  from spcl_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import context  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  # the demo keeps the jitter its recorded results were made with
  assert config.data.color_jitter_implementation == 'float'
  config.data.color_jitter_implementation = 'pil'
  with pytest.raises(ValueError, match=r"data.color_jitter_implementation: "
                     r"'pil', expected one of \['float', 'released'\]"):
    config_checks.validate(config, num_devices=2)
  config.data.color_jitter_implementation = 'released'
  ctx = context.Context(config, '/nonexistent', None, None)
  specs = context.train_specs(ctx, pipeline.stage_graph.STAGE_BY_NAME[
      'warmup'])
  jitters = [op for op in loaders.transforms_of(specs['source_iterator'])
             if isinstance(op, transforms.ColorJitter)]
  assert [j.implementation for j in jitters] == ['released']


def _released_table() -> list:
  """The rows (cells) of docs/released_code.md's table."""
  path = os.path.join(ROOT, 'docs', 'released_code.md')
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f if line.startswith('| ')]
  return [[cell.strip() for cell in line.strip().strip('|').split('|')]
          for line in lines[1:]]   # after the header ('|---' is skipped)


def test_the_released_table_names_every_released_field_and_value():
  rows = _released_table()
  assert rows and all(len(row) == 5 for row in rows), rows
  restoring = [row[3] for row in rows]
  for field, value in released_lib.RELEASED.items():
    assert any(f'`{field}={value!r}`' in cell for cell in restoring), (
        f'docs/released_code.md has no row restoring {field}={value!r}')
  # every row names the field that restores the release, or says why none
  for behaviour, _, _, field, why in rows:
    names_field = re.search(r'`[a-z_.]+=[^`]+`', field)
    assert names_field or (why and why != '–'), behaviour


@pytest.mark.parametrize('name', ['gta5', 'synthia', 'synscapes'])
def test_mit_b5_holds_daformers_recipe(name):
  """`:mit_b5`: DAFormer's AdamW numbers in every training stage, the
  source resized then cropped to 512x512, SPCL's stage lengths, and
  nothing else of the recipe changed."""
  plain = importlib.import_module(f'configs.{name}').get_config()
  config = importlib.import_module(f'configs.{name}').get_config('mit_b5')
  assert config.model.name == 'segformer_mit_b5'
  assert (config.model.drop_path_rate, config.model.head_dropout) == (0.1, 0.1)
  for stage_name in ('warmup', 'spcl', 'self_training'):
    stage = config.stages[stage_name]
    assert (stage.optimizer, stage.lr, stage.classifier_lr_multiplier,
            tuple(stage.adam_betas), stage.weight_decay, stage.decay_norms,
            stage.poly_power, stage.lr_warmup_steps, stage.lr_warmup_ratio,
            stage.bn_trainable) == ('adamw', 6e-5, 10.0, (0.9, 0.999), 0.01,
                                    False, 1.0, 1500, 1e-6, True)
    assert stage.steps == stage.schedule_steps == plain.stages[
        stage_name].steps
  for stage_name in ('warmup', 'spcl'):
    stage = config.stages[stage_name]
    assert (stage.source_batch_size, stage.target_batch_size) == (2, 2)
  assert config.stages.self_training.target_batch_size == 4
  assert tuple(config.stages.self_training.crop_size) == (512, 512)
  assert tuple(config.data.source_crop_size) == (512, 512)
  assert config.data.source_crop_from == 'resized' and config.data.source_flip
  assert config.data.source_size == plain.data.source_size
  assert config.data.source_sampling == plain.data.source_sampling
  assert config.stages.spcl.temperature == plain.stages.spcl.temperature
