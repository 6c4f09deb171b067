"""The whole pipeline on the built-in `sim2real_demo` dataset with a narrow
dilated ResNet-18 at 128x256 on the CPU (about 7 minutes on 2 cores, plus
the dataset build on first use).

As the real configs start from ImageNet weights, the demo's backbone starts
from weights pretrained on a separate, differently-labelled task (object
classification, `spcl_jax.pretrain`; shipped in weights/, docs/research_log.md §4),
and self-training reads class-balanced pseudo labels (the top 20 % of each
class, `default.class_balanced`): the setting in which the demo's
self-training adapts (docs/research_log.md §4). The dataset is built into
`data.data_dir` on first use. Variants:
  smoke        the `tiny` dataset at 32x64 and a few steps per stage (CI)
  source_only  warm-up without the adversarial term
  oracle       warm-up trained on the labelled target_train split (the upper
               bound that measures the domain gap; stop after `warmup`)
  same_domain  target = source (a control: no stage should lose accuracy)
  scratch      the backbone starts from random weights (docs/research_log.md §1-§3)
  released_labels  self-training reads the released pseudo labels (class
               thresholds: the median capped at 0.9) instead
  res96        96x192 with 4 + 4 images a step (docs/research_log.md §1-§4)
  mit          SegFormer on a narrow Mix Transformer, pretrained alike
  pretrained, class_balanced  the defaults (kept so that older commands run)
`:res96,scratch,released_labels` is the demo as it was before docs/research_log.md §4,
`:res96` the demo of §4's class-balanced subsection.
"""

import os

from configs import default
from configs import demo_pretrain

# The demo backbone's starting weights, shipped with the repository (2.7 MB):
# `python -m spcl_jax.pretrain --config=configs/demo_pretrain.py` made them
# (seed 0, 20 min on 2 cores, 98.3 % held-out accuracy; metadata.json holds
# the recipe, checked against configs/demo_pretrain.py on every load). They
# play the part of the ImageNet weights a real run downloads. Deleted, they
# are made again on first use.
SHIPPED_PRETRAINED_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'weights',
    'demo_pretrain_resnet18_w16')
# The same for the `mit` variant's encoder (configs/demo_pretrain.py:mit).
SHIPPED_MIT_PRETRAINED_DIR = os.path.join(
    os.path.dirname(SHIPPED_PRETRAINED_DIR), 'demo_pretrain_mit_demo')


def smoke(config):
  config.data.source = config.data.target = 'sim2real_demo/tiny'
  config.data.source_size = config.data.target_size = (32, 64)
  config.data.eval_size = (32, 64)
  config.data.worker_count = 0
  config.data.eval_batch_size = 8
  for name in ('warmup', 'spcl', 'self_training'):
    stage = config.stages[name]
    stage.steps, stage.schedule_steps, stage.eval_every_steps = 4, 6, 4
    stage.lr_warmup_steps = min(stage.lr_warmup_steps, stage.steps)
  for name in ('warmup', 'spcl'):  # a multiple of 8 simulated devices
    stage = config.stages[name]
    stage.source_batch_size = stage.target_batch_size = 8
  config.stages.self_training.crop_size = (32, 64)
  config.stages.self_training.target_batch_size = 8
  config.checkpoint.every_steps = 2
  config.log_every_steps = 2


def source_only(config):
  config.stages.warmup.adversarial_weight = 0.0


def pretrained(config):
  """The backbone starts from `spcl_jax.pretrain`'s object-centric
  classification weights (the demo's stand-in for ImageNet; shipped, made
  again on first use if deleted; the same weights for every seed, as
  ImageNet weights are)."""
  config.model.pretrained_dir = SHIPPED_PRETRAINED_DIR
  config.model.pretrain_if_missing = True


def mit(config):
  """SegFormer on the narrow MiT (`segformer_mit_demo`: B0's shape at half
  its widths, one block a stage) with its own stand-in pretraining
  (configs/demo_pretrain.py:mit, shipped in weights/) and the MiT recipe's
  optimiser (default.segformer_recipe) at the demo's scale: AdamW, the
  head at 10x, no decay on LayerNorms, poly 1.0 after a linear warm-up of
  `MIT_DEMO_WARMUP_STEPS`; stochastic depth and head dropout 0.1. Sizes,
  batches, stage lengths and BatchNorm (the head's, trained) are the
  ResNet-18 demo's: the same budget."""
  config.model.name = 'segformer_mit_demo'
  config.model.base_width = 64    # unused: the variant fixes the widths
  config.model.drop_path_rate = 0.1
  config.model.head_dropout = 0.1
  config.pretrain = demo_pretrain.get_config('mit')
  config.model.pretrained_dir = SHIPPED_MIT_PRETRAINED_DIR
  config.model.pretrain_if_missing = True
  for name in ('warmup', 'spcl', 'self_training'):
    stage = config.stages[name]
    stage.optimizer = 'adamw'
    stage.lr = MIT_DEMO_LR
    stage.weight_decay = 0.01
    stage.decay_norms = False
    stage.poly_power = 1.0
    stage.lr_warmup_steps = min(MIT_DEMO_WARMUP_STEPS, stage.steps)


# The `mit` variant's rate and warm-up: DAFormer's 6e-5 times 10 for the
# demo's 36x shorter schedule (the ResNet-18 demo runs SGD at 40x the
# recipe's rate), a warm-up of 1/12 of the warm-up stage; not tuned.
MIT_DEMO_LR = 6e-4
MIT_DEMO_WARMUP_STEPS = 50


def scratch(config):
  """The backbone starts from random weights."""
  config.model.pretrained_dir = ''
  config.model.pretrain_if_missing = False


def released_labels(config):
  """Self-training reads pseudo labels made with the released rule, as
  the SPCL stage's do (undoes `class_balanced`)."""
  released = default.get_config().stages.pseudo_labels
  labels = config.stages.pseudo_labels_2
  labels.threshold_quantile = released.threshold_quantile
  labels.threshold_cap = released.threshold_cap


def res96(config):
  """The demo's size before docs/research_log.md §4's last subsection: 96x192 with
  4 + 4 images a step, self-training 8 crops of 96x192 at 0.5-1.0x the
  128x256 renders (docs/research_log.md §1-§4 were measured with it)."""
  data = config.data
  data.source_size = data.target_size = data.eval_size = (96, 192)
  for name in ('warmup', 'spcl'):
    stage = config.stages[name]
    stage.source_batch_size = stage.target_batch_size = 4
  self_training = config.stages.self_training
  self_training.target_batch_size = 8
  self_training.crop_size = (96, 192)
  self_training.scale_range = (0.5, 1.0)


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
  # the pretraining recipe of the shipped weights (made again if missing)
  config.pretrain = demo_pretrain.get_config()
  pretrained(config)
  # the discriminator narrowed like the segmenter (base width 16 of 64)
  config.discriminator.widths = (16, 32, 64, 128)

  data = config.data
  data.data_dir = '~/tensorflow_datasets'
  data.source = data.target = 'sim2real_demo/default'
  data.source_split, data.target_split = 'source_train', 'target_train'
  data.val_split = 'target_val'
  # the renders' full 128x256: logits at 16x32, where the demo's street
  # furniture is resolvable (the oracle: ~42 at 64x128, ~50 at 96x192, ~56
  # here; docs/research_log.md §1)
  data.source_size = data.target_size = data.eval_size = (128, 256)
  data.worker_count = 2
  data.eval_batch_size = 40
  data.build_if_missing = True
  # docs/research_log.md's numbers were made with the float jitter ('released', the
  # recipes' PIL one, is 5x faster at 1280x720 but draws other images)
  data.color_jitter_implementation = 'float'

  config.evaluation.class_sets = (19,)
  for name in ('warmup', 'spcl', 'self_training'):
    stage = config.stages[name]
    stage.lr = 0.01
    stage.weight_decay = 1e-4
    # BatchNorm trains: the pretrained statistics are those of 64x64 object
    # crops, not of street scenes (and from scratch there are none).
    stage.bn_trainable = True
    stage.eval_every_steps = 200
  warmup, spcl, self_training = (config.stages.warmup, config.stages.spcl,
                                 config.stages.self_training)
  warmup.steps, warmup.schedule_steps = 600, 938
  # 2 + 2 images of 128x256 a step: the pixels of 4 + 4 at 96x192
  warmup.source_batch_size = warmup.target_batch_size = 2
  spcl.steps, spcl.schedule_steps = 300, 469
  spcl.source_batch_size = spcl.target_batch_size = 2
  self_training.steps, self_training.schedule_steps = 200, 313
  self_training.target_batch_size = 4
  self_training.crop_size = (128, 256)
  # of the 128x256 originals: 0.67-1.33x the evaluation scale
  self_training.scale_range = (0.67, 1.33)
  config.stages.prototypes.batch_size = 40
  config.stages.pseudo_labels.batch_size = 40
  config.stages.pseudo_labels_2.batch_size = 40
  config.checkpoint.every_steps = 100
  config.log_every_steps = 25
  default.class_balanced(config)
  return default.apply_arg(config, arg, {'smoke': smoke,
                                         'source_only': source_only,
                                         'oracle': default.oracle,
                                         'same_domain': same_domain,
                                         'pretrained': pretrained,
                                         'mit': mit,
                                         'class_balanced':
                                             default.class_balanced,
                                         'scratch': scratch,
                                         'res96': res96,
                                         'released_labels': released_labels})
