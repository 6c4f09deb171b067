"""The whole pipeline on the built-in `sim2real_demo` dataset, from scratch,
with a narrow dilated ResNet-18 at 96x192 on the CPU (about 14 minutes on 2
cores, plus the dataset build on first use).

The dataset is built into `data.data_dir` on first use. Variants:
  smoke        the `tiny` dataset at 32x64 and a few steps per stage (CI)
  source_only  warm-up without the adversarial term
  oracle       warm-up trained on the labelled target_train split (the upper
               bound that measures the domain gap; stop after `warmup`)
  same_domain  target = source (a control: no stage should lose accuracy)
  pretrained   the backbone starts from weights pretrained on a separate,
               differently-labelled task (`spcl_jax.pretrain`, the stand-in
               for ImageNet; made on first use, ~15 min on 2 cores)
  class_balanced  self-training reads class-balanced pseudo labels (the top
               20 % of each class, default.class_balanced). With
               `pretrained` (`:pretrained,class_balanced`) this is the
               setting in which self-training adapts (RESULTS.md §4)
"""

from configs import default
from configs import demo_pretrain


def smoke(config):
  config.data.source = config.data.target = 'sim2real_demo/tiny'
  config.data.source_size = config.data.target_size = (32, 64)
  config.data.eval_size = (32, 64)
  config.data.worker_count = 0
  config.data.eval_batch_size = 8
  for name in ('warmup', 'spcl', 'self_training'):
    stage = config.stages[name]
    stage.steps, stage.schedule_steps, stage.eval_every_steps = 4, 6, 4
  for name in ('warmup', 'spcl'):  # a multiple of 8 simulated devices
    stage = config.stages[name]
    stage.source_batch_size = stage.target_batch_size = 8
  config.stages.self_training.crop_size = (32, 64)
  config.checkpoint.every_steps = 2
  config.log_every_steps = 2


def source_only(config):
  config.stages.warmup.adversarial_weight = 0.0


def pretrained(config):
  """The backbone starts from `spcl_jax.pretrain`'s object-centric
  classification weights (the demo's stand-in for ImageNet; made on first
  use, the same weights for every seed, as ImageNet weights are)."""
  config.model.pretrained_dir = '~/spcl_jax_weights/demo_pretrain_resnet18_w16'
  config.model.pretrain_if_missing = True


def same_domain(config):
  """A control: the 'target' is the source domain itself (its training
  split, validated on `source_val`); adaptation has nothing to fix, so no
  stage should lose more than seed noise."""
  config.data.target = config.data.source
  config.data.target_split = config.data.source_split
  config.data.val_split = 'source_val'


def get_config(arg=None):
  config = default.get_config()
  config.model.name = 'deeplabv2_resnet18'
  config.model.base_width = 16
  config.model.pretrained_dir = ''
  # the pretraining recipe of the `pretrained` variant
  config.pretrain = demo_pretrain.get_config()
  # the discriminator narrowed like the segmenter (base width 16 of 64)
  config.discriminator.widths = (16, 32, 64, 128)

  data = config.data
  data.data_dir = '~/tensorflow_datasets'
  data.source = data.target = 'sim2real_demo/default'
  data.source_split, data.target_split = 'source_train', 'target_train'
  data.val_split = 'target_val'
  # 3/4 of the 128x256 renders: logits at 12x24, where the demo's street
  # furniture is still resolvable (at 64x128 even the oracle stops at ~42)
  data.source_size = data.target_size = data.eval_size = (96, 192)
  data.worker_count = 2
  data.eval_batch_size = 40
  data.build_if_missing = True

  config.evaluation.class_sets = (19,)
  for name in ('warmup', 'spcl', 'self_training'):
    stage = config.stages[name]
    stage.lr = 0.01
    stage.weight_decay = 1e-4
    # From scratch, BatchNorm has no ImageNet statistics to keep.
    stage.bn_trainable = True
    stage.eval_every_steps = 200
  warmup, spcl, self_training = (config.stages.warmup, config.stages.spcl,
                                 config.stages.self_training)
  warmup.steps, warmup.schedule_steps = 600, 938
  warmup.source_batch_size = warmup.target_batch_size = 4
  spcl.steps, spcl.schedule_steps = 300, 469
  spcl.source_batch_size = spcl.target_batch_size = 4
  self_training.steps, self_training.schedule_steps = 200, 313
  self_training.target_batch_size = 8
  self_training.crop_size = (96, 192)
  # from the 128x256 originals: 0.67-1.33x the evaluation scale
  self_training.scale_range = (0.5, 1.0)
  config.stages.prototypes.batch_size = 40
  config.stages.pseudo_labels.batch_size = 40
  config.stages.pseudo_labels_2.batch_size = 40
  config.checkpoint.every_steps = 100
  config.log_every_steps = 25
  return default.apply_arg(config, arg, {'smoke': smoke,
                                         'source_only': source_only,
                                         'oracle': default.oracle,
                                         'same_domain': same_domain,
                                         'pretrained': pretrained,
                                         'class_balanced':
                                             default.class_balanced})
