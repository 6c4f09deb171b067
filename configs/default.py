"""Every field of an spcl_jax run, with the released GTA5 -> Cityscapes recipe
(DeepLab-v2 ResNet-101) as the default values (SPEC §2).

Other configs start from `get_config()` here and change what differs. A
config file's `get_config(arg)` takes a comma-separated argument list: stage
names (run only those stages) and variant names of that file, e.g.
`configs/gta5.py:vgg16` or `configs/demo.py:smoke,warmup`.

Sizes are (height, width). Step counts: `steps` is where a stage stops,
`schedule_steps` the length of its poly schedule (the released code stops at
40k of a 62.5k schedule).
"""

import ml_collections

from spcl_jax.run import released as released_lib
from spcl_jax.run import stage_graph

# The pipeline's stages, in order (spcl_jax.run.stage_graph.STAGES holds
# their wiring).
STAGE_NAMES = tuple(stage.name for stage in stage_graph.STAGES)


def _sgd(lr, steps, schedule_steps):
  return ml_collections.ConfigDict({
      # 'sgd' (momentum, coupled weight decay: the released recipe) or
      # 'adamw' (decoupled weight decay: DAFormer's MiT recipe)
      'optimizer': 'sgd',
      'lr': lr,
      'classifier_lr_multiplier': 10.0,
      'momentum': 0.9,               # sgd
      'adam_betas': (0.9, 0.999),    # adamw
      'weight_decay': 5e-4,
      # False: no weight decay on the parameters of modules named '*norm*'
      # (the MiT's LayerNorms; DAFormer's custom_keys norm decay_mult 0)
      'decay_norms': True,
      'poly_power': 0.9,
      # linear warm-up of the poly schedule over the first steps (mmcv's:
      # the rate times 1 - (1 - step / W) (1 - ratio)); 0: none
      'lr_warmup_steps': 0,
      'lr_warmup_ratio': 1e-6,
      'steps': steps,
      'schedule_steps': schedule_steps,
      # k: the step computes its global batch in k sequential micro-batches
      # (each 1/k of every per-device batch; k must divide them) and applies
      # one update. With frozen BatchNorm the update equals k = 1's; with
      # trainable BatchNorm each micro-batch is normalised by its own
      # statistics (docs/performance.md, "Memory: micro-batches and
      # rematerialisation").
      'micro_batches': 1,
      # How every pixel-averaged loss of the step (cross-entropies,
      # contrastive terms) weighs its images. 0: the mean over the valid
      # pixels of the whole global batch (an image with more valid pixels
      # weighs more). n > 0: the mean over the valid pixels of each run of n
      # consecutive images of the global batch, then the mean over the runs
      # (each run weighs the same): the released code's per-GPU losses with
      # gradients averaged over the GPUs (1 source + 1 target image per GPU
      # in warm-up and SPCL, 2 target images in self-training). n must
      # divide the step's global batches.
      'images_per_loss_mean': 0,
  })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages_to_run = STAGE_NAMES  # replaced by stage names given in `arg`
  # True (the `:released` variant): every field of
  # spcl_jax.run.released.RELEASED holds the released code's value; a
  # setting that contradicts it fails validation.
  c.released = False
  # What a stage starts from (`model_from`): the previous stage's 'final'
  # model, or its 'best' one on the validation split (the released scripts
  # chain model_best.pth; that selects on the split we evaluate on).
  c.chain_model = 'final'

  c.model = ml_collections.ConfigDict({
      'name': 'deeplabv2_resnet101',
      'num_classes': 19,
      'dtype': 'float32',          # 'bfloat16' on GPU / TPU
      'base_width': 64,            # ResNet stem / VGG conv1 width (ImageNet 64)
      # Directory written by `python -m data_prep.port_torchvision`; '' trains
      # from scratch (only sensible for the demo).
      'pretrained_dir': '',
      # True: if pretrained_dir holds no weights, make them first with the
      # config's `pretrain` block (`spcl_jax.pretrain`; the demo's stand-in
      # for ImageNet weights, configs/demo.py:pretrained).
      'pretrain_if_missing': False,
      'aspp_rates': (6, 12, 18, 24),
      # ε of frozen BatchNorm: PyTorch's BatchNorm2d default; the released
      # code's frozen BatchNorm has none (0.0).
      'frozen_bn_epsilon': 1e-5,
      # ε of BatchNorm where the released code runs nn.BatchNorm2d in eval
      # mode: the prototype and pseudo-label passes, and the evaluation of a
      # stage that trains BatchNorm (self-training). Warm-up and SPCL train
      # and are evaluated with frozen_bn_epsilon; self-training trains with
      # trainable BatchNorm's 1e-5.
      'pass_bn_epsilon': 1e-5,
      # Initialisation of the fresh discriminator and VGG fc6/fc7: 'flax'
      # (kaiming-normal, zero bias) or 'torch' (PyTorch's defaults, released).
      'layer_init': 'flax',
      # 'blocks': recompute every residual / VGG block's activations in the
      # backward pass instead of storing them (less memory, ~1/3 more
      # compute; same gradients); 'none': store them.
      'remat': 'none',
      # SegFormer models only (0 for DeepLab): stochastic depth of the last
      # encoder block (rising linearly from 0 at the first), and dropout
      # before the head's classifier
      'drop_path_rate': 0.0,
      'head_dropout': 0.0,
  })
  c.discriminator = ml_collections.ConfigDict({
      'widths': (64, 128, 256, 512),
      'negative_slope': 0.2,
      'source_label': 0.0,
      'target_label': 1.0,
  })

  c.data = ml_collections.ConfigDict({
      'data_dir': '~/tensorflow_datasets',
      'source': 'gta5',
      'source_split': 'train',
      'target': 'spcl_cityscapes',  # not TFDS's own `cityscapes`
      # The classes the model predicts (spcl_jax.core.labels.LABEL_SPACES); stored
      # trainIds outside it are ignored. model.num_classes must match.
      'label_space': 'cityscapes19',
      # Image interpolation of the resize to source/target/eval size:
      # 'bilinear', or 'bicubic' (the released transforms); labels: nearest.
      'image_interpolation': 'bilinear',
      'target_split': 'train',
      'val_split': 'validation',
      'source_size': (720, 1280),
      'target_size': (512, 1024),
      'eval_size': (512, 1024),    # logits are upsampled to the label size
      'mean': (0.485, 0.456, 0.406),
      'std': (0.229, 0.224, 0.225),
      'source_color_jitter': (0.5, 0.5, 0.5, 0.2),  # b, c, s, h
      # How colour jitter (source, self-training) is computed: 'released',
      # torchvision's ColorJitter on PIL images (uint8 after each operation,
      # as the released code); 'float', a float HSV jitter of the same
      # factors (the demo's recorded results;
      # spcl_jax.data.transforms.COLOR_JITTERS).
      'color_jitter_implementation': 'released',
      # When the source's colour jitter (warm-up, SPCL) is applied:
      # 'after_resize' (to the image resized to source_size: cheaper) or
      # 'before_resize' (to the stored full-resolution image, then resized:
      # the released order). Self-training jitters the stored image before
      # its random scale either way.
      'color_jitter_order': 'after_resize',
      # How a random scale's size (each side times the scale; self-training,
      # a cropped source) becomes an integer: 'round' to the nearest, or
      # 'floor' (the released transforms' int()).
      'scaled_size_rounding': 'round',
      # Geometric augmentation of the source in the warm-up and SPCL stages.
      # () / False: the released recipe (the image resized to source_size,
      # no crop, no flip). A crop size: the original image randomly scaled
      # by source_scale_range (() = 1), then cropped (padded if smaller).
      'source_scale_range': (),
      'source_crop_size': (),
      # What the crop is taken from: 'original' (the stored image, randomly
      # scaled) or 'resized' (the image resized to source_size first, then
      # randomly scaled: DAFormer's GTA5 1280x720 -> 512x512 crops).
      'source_crop_from': 'original',
      'source_flip': False,
      # Which source images the training stages read (warm-up, SPCL, and
      # self-training's joint source): 'uniform', a seeded shuffle of every
      # epoch; 'class_balanced', the released code's rule for GTA5 and
      # SYNTHIA (configs/gta5.py, synthia.py): sub-epochs of
      # `source_sampling_sub_epoch` draws, each picking class c with
      # probability ∝ 1 / log(source_sampling_log_offset + share_c) and then
      # the next source image containing c (spcl_jax/data/class_balanced.py;
      # it needs the source's labels). The prototype pass always reads the
      # source once in file order; the target is always uniform.
      'source_sampling': 'uniform',
      'source_sampling_sub_epoch': 3000,
      'source_sampling_log_offset': 1.01,
      'worker_count': 4,
      # Each stream of each worker reads (decodes) records with `read_threads`
      # threads, at most `read_ahead` of them ahead of its transforms: host
      # memory, not which batches (docs/performance.md, "Host memory").
      'read_threads': 4,
      'read_ahead': 16,
      # Training batches made and put onto the devices by a background
      # thread while the step runs (per data stream; up to this + 1 ahead).
      # 0: each batch is made when the step asks for it.
      'device_prefetch': 2,
      'eval_batch_size': 8,
      # Build the demo dataset if it is missing (sim2real_demo only).
      'build_if_missing': False,
  })

  c.evaluation = ml_collections.ConfigDict({
      # Evaluated class sets (19, 16 or 13 classes); the first is the one
      # whose mIoU is reported as "miou" and selects the best checkpoint.
      'class_sets': (19,),
      # Validation images shown at every evaluation of a training stage
      # (DIR/tensorboard; input | prediction | ground truth, the same
      # images each time, spcl_jax/report/dashboards.py); 0: none.
      'dashboard_images': 4,
  })

  warmup = _sgd(2.5e-4, 40_000, 62_500)
  warmup.source_batch_size = 4
  warmup.target_batch_size = 4
  warmup.adversarial_weight = 0.001  # 0: the source-only baseline
  warmup.discriminator_lr = 1e-4
  warmup.discriminator_betas = (0.9, 0.99)
  warmup.logit_temperature = 1.8
  warmup.bn_trainable = False
  warmup.eval_every_steps = 2_000

  prototypes = ml_collections.ConfigDict({'batch_size': 4})

  pseudo_labels = ml_collections.ConfigDict({
      'batch_size': 4,
      'histogram_bins': 1000,
      # σ_c = min(quantile of class c's confidences, cap). Released: the
      # median (0.5) capped at 0.9; CBST-style class-balanced selection of
      # the top 20 %: quantile 0.8, cap 1.0.
      'threshold_quantile': 0.5,
      'threshold_cap': 0.9,
      # 'model': the model's thresholded predictions (the method).
      # 'stored': the split's own labels, written as if they were pseudo
      # labels — a diagnostic of the self-training path (its upper bound);
      # needs a labelled target split, never part of the method.
      'labels_from': 'model',
  })

  spcl = _sgd(2.5e-4, 40_000, 62_500)
  spcl.source_batch_size = 4
  spcl.target_batch_size = 4
  spcl.logit_temperature = 1.8
  spcl.alpha = 0.1                 # prototype momentum (1.0 freezes them)
  spcl.temperature = 100.0         # τ; the released code divides by 100
  spcl.contrastive_weight = 1.0    # λ
  spcl.target_contrastive_weight = 1.0  # weight of L_cl^t inside λ(...)
  # 'after_loss': Eq. 3 applied after the step's loss (the paper's order);
  # 'before_loss': the released code's order (the loss sees updated μ).
  spcl.prototype_update = 'after_loss'
  spcl.target_mask = 'offline'     # 'offline' (released) or 'online' (Eq. 5)
  spcl.decay_absent_classes = False  # True: the released code's behaviour
  spcl.bn_trainable = False
  spcl.eval_every_steps = 2_000

  self_training = _sgd(5e-4, 20_000, 31_250)
  self_training.target_batch_size = 8
  # > 0: also source cross-entropy on this many labelled source images per
  # step (joint self-training as in CBST / CRST); 0: target only (released)
  self_training.source_batch_size = 0
  self_training.source_weight = 1.0
  self_training.logit_temperature = 1.0
  self_training.bn_trainable = True
  self_training.scale_range = (0.5, 1.5)
  self_training.crop_size = (512, 1024)
  self_training.flip = True
  self_training.color_jitter = (0.5, 0.5, 0.5, 0.2)
  self_training.eval_every_steps = 2_000

  c.stages = ml_collections.ConfigDict({
      'warmup': warmup,
      'prototypes': prototypes,
      'pseudo_labels': pseudo_labels,
      'spcl': spcl,
      'pseudo_labels_2': pseudo_labels.copy_and_resolve_references(),
      'self_training': self_training,
  })

  c.checkpoint = ml_collections.ConfigDict({
      'every_steps': 1_000,
      'keep': 3,
      # Several processes agree on a SIGTERM (an all-gather, which waits for
      # every process) at log, checkpoint and evaluation steps and every this
      # many steps, so they stop at the same step: keep it below the
      # scheduler's grace period (e.g. 30 s) divided by the step time. One
      # process looks at its own SIGTERM after every step.
      'preemption_check_every_steps': 10,
  })
  c.log_every_steps = 50
  # At most this many training steps dispatched ahead of the devices (the
  # host waits for the oldest to finish, without reading anything): each
  # step in flight holds its batches and outputs in device memory. 0: no
  # bound (a whole log interval may be queued).
  c.max_steps_in_flight = 2

  # Test hooks, never set in a run. Deterministic preemption: the process
  # sends itself SIGTERM when `sigterm_stage` reaches step `sigterm_at_step`
  # (in a prototypes or pseudo-label stage: before that batch of its passes).
  # Deterministic crash: the process sends itself SIGKILL right after the
  # write named by `crash_after_write` (workdir-relative: 'config.json',
  # '<stage>/checkpoints/<step>', '<stage>/best/<step>',
  # '<stage>/eval_history.json', '<stage>/model', '<stage>/prototypes',
  # '<stage>/labels', '<stage>/table', '<stage>/done.json', or
  # 'report.json:<stage>' for the report's update after <stage>; every one
  # is logged to DIR/log.txt as 'write point <name>').
  c.testing = ml_collections.ConfigDict({
      'sigterm_stage': '',
      'sigterm_at_step': -1,
      'crash_after_write': '',
      # Deterministic SIGTERM during a wait that cannot stop between
      # batches (run.processes.interruptible): 'build' (the demo dataset's
      # build), '<stage>/compile' (its step; a pseudo-label stage's
      # confidence step), '<stage>/compile_evaluation',
      # '<stage>/compile_dashboard', '<pseudo-label stage>/compile_labels'.
      'sigterm_during': '',
      # A jax.transfer_guard_device_to_host level ('disallow', 'log', ...)
      # around the training steps between two check points (log,
      # checkpoint, evaluation): no device-to-host read happens there.
      'transfer_guard': '',
      # Read the metrics (a host sync) and agree on a SIGTERM after every
      # step: the step loop before issue 14 (benchmarks/step_loop.py).
      'sync_every_step': False,
  })
  return apply_arg(c, arg, {})


def released(config) -> None:
  """The `:released` variant: every field of spcl_jax.run.released.RELEASED
  set to the released code's value (prototype update order and decay, the
  best-on-val chain, bicubic resizes, PyTorch's layer initialisation
  including the ASPP biases, frozen BatchNorm without ε and the passes'
  with 1e-5, one loss mean per GPU's images, colour jitter before the
  resize, truncated random-scale sizes). What it does not reproduce
  (per-GPU prototype banks, unsaved prototypes, the exact in-memory median
  at 512x1024) is listed in docs/released_code.md with its reason; the
  source sampling is each recipe config's own."""
  released_lib.apply(config)


def oracle(config) -> None:
  """The upper bound that measures the domain gap: the warm-up trained on
  the labelled target training split instead of the source (no adversarial
  term, no source colour jitter, uniform sampling)."""
  data = config.data
  data.source, data.source_split = data.target, data.target_split
  data.source_size = data.target_size
  data.source_color_jitter = ()
  data.source_sampling = 'uniform'   # the target's own frequencies
  config.stages.warmup.adversarial_weight = 0.0


def class_balanced(config) -> None:
  """Self-training on class-balanced pseudo labels: each class keeps the
  most confident 20 % of the target pixels predicted as it (threshold: the
  0.8 quantile of its confidences, no cap), as in CBST's first round (Zou
  et al., ECCV 2018), instead of the released median capped at 0.9. Only
  the labels self-training reads (`pseudo_labels_2`) change; the SPCL
  stage's offline target mask keeps the released rule."""
  config.stages.pseudo_labels_2.threshold_quantile = 0.8
  config.stages.pseudo_labels_2.threshold_cap = 1.0


def segformer_recipe(config, variant: str) -> None:
  """SegFormer on a MiT encoder (`segformer_mit_<variant>`) with DAFormer's
  optimiser and crops (Hoyer et al., CVPR 2022, the GTA5 -> Cityscapes
  DAFormer config: configs/_base_/schedules/adamw.py, poly10warm.py,
  configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py):
    AdamW, lr 6e-5, betas (0.9, 0.999), weight decay 0.01 (none on the
    LayerNorms: custom_keys norm decay_mult 0), the head at 10x the rate;
    1500 steps of linear warm-up from 1e-6 x the rate, then poly of power
    1.0 down to 0 at each stage's last step; batch 2 + 2; the source
    resized (GTA5 1280x720) then randomly cropped to 512x512 and flipped;
    stochastic depth 0.1 (DAFormer's mit_b5) and dropout 0.1 before the
    head's classifier (SegFormer's).
  SPCL's stages and their lengths are kept (warm-up, SPCL 40k steps each,
  self-training 20k), each with its own warm-up (a stage starts a fresh
  AdamW state). Self-training reads 4 target crops of 512x512 (the pixels
  of 2 + 2).
  Not DAFormer's: the target of the warm-up and SPCL stages is the
  recipe's whole 512x1024 image (SPCL's offline pseudo labels are per
  image), and no crop is retried for holding one class over 75 %.
  BatchNorm: the MiT has only LayerNorms (no statistics, always trained);
  the head's one BatchNorm trains in every stage, as DAFormer's head's
  does (`bn_trainable`; frozen, it would keep its initial statistics and
  scale). Ported ImageNet encoder weights: model.pretrained_dir
  (docs/networks.md, "SegFormer and the Mix Transformer")."""
  config.model.name = f'segformer_mit_{variant}'
  config.model.drop_path_rate = 0.1
  config.model.head_dropout = 0.1
  data = config.data
  data.source_crop_size = (512, 512)
  data.source_crop_from = 'resized'
  data.source_flip = True
  for name in ('warmup', 'spcl', 'self_training'):
    stage = config.stages[name]
    stage.optimizer = 'adamw'
    stage.lr = 6e-5
    stage.classifier_lr_multiplier = 10.0
    stage.adam_betas = (0.9, 0.999)
    stage.weight_decay = 0.01
    stage.decay_norms = False
    stage.poly_power = 1.0
    stage.lr_warmup_steps = 1500
    stage.lr_warmup_ratio = 1e-6
    stage.schedule_steps = stage.steps
    stage.bn_trainable = True
  for name in ('warmup', 'spcl'):
    stage = config.stages[name]
    stage.source_batch_size = stage.target_batch_size = 2
  config.stages.self_training.target_batch_size = 4
  config.stages.self_training.crop_size = (512, 512)


def mit_b5(config) -> None:
  """`segformer_recipe` on MiT-B5 (the `:mit_b5` variant of the recipes)."""
  segformer_recipe(config, 'b5')


def apply_arg(config, arg, variants):
  """Applies a `get_config` argument: comma-separated stage names and names
  of `variants` ({name: function(config) -> None}), in order."""
  stages = []
  for token in (arg or '').split(','):
    token = token.strip()
    if not token:
      continue
    if token in STAGE_NAMES:
      stages.append(token)
    elif token in variants:
      variants[token](config)
    else:
      raise ValueError(f'unknown config argument {token!r}; expected stage '
                       f'names {list(STAGE_NAMES)} or variants '
                       f'{sorted(variants)}')
  if stages:
    config.stages_to_run = tuple(stages)
  return config
