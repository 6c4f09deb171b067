r"""Our training step against a PyTorch step of the released design, side by
side in one process, with random weights and random inputs.

  python -m benchmarks.step_vs_pytorch --height=128 --width=256 --batch=1
  python -m benchmarks.step_vs_pytorch --stage=warmup --dtype=bfloat16
  python -m benchmarks.step_vs_pytorch --stage=spcl,warmup,self_training \
      --dtype=float32,bfloat16 --steps=5 --output=steps.json
  # the recipe's sizes (configs/gta5.py): 1280x720 source, 1024x512 target,
  # 4 + 4 images (warm-up, SPCL); 8 target crops of 1024x512 (self-training)
  python -m benchmarks.step_vs_pytorch --stage=warmup,spcl --height=720 \
      --width=1280 --target_height=512 --target_width=1024 --batch=4
  python -m benchmarks.step_vs_pytorch --stage=self_training --height=512 \
      --width=1024 --batch=8

  # SegFormer (MiT-B5) beside transformers' PyTorch model: the
  # self-training step (cross-entropy, AdamW), configs/gta5.py:mit_b5
  python -m benchmarks.step_vs_pytorch --model=segformer_mit_b5 \
      --stage=self_training --height=512 --width=512 --batch=2

Ours: the step the pipeline jits (`train_steps.make_warmup_step`,
`make_spcl_step`, `make_self_training_step`; `jax.jit(step,
donate_argnums=0)`, compiled by `benchmarks.memory.compile_step`) on
DeepLab-v2 (`--model`) with the config's recipe (`--config`, default
configs/gta5.py; any `--config.<field>=...` applies, e.g.
`--config.model.remat=blocks` or `--config.stages.spcl.micro_batches=2`).
PyTorch: the released design on torchvision's dilated ResNet (frozen
BatchNorm in warm-up and SPCL, trainable in self-training), ASPP v2 summed,
SGD (10 x on the classifier) with the same recipe numbers: warm-up and
self-training are `tests/torch_reference.py`'s
`released_warmup_iteration` / `released_self_training_iteration`, SPCL is
`spcl_iteration` below (CE(up(src) / T) + λ (pixel-prototype CE on source
and target), the Eq. 3 prototype update). `--dtype=bfloat16` computes our
step in bfloat16 (float32 parameters) and, on a GPU, runs PyTorch under
`torch.autocast(bfloat16)`; on a CPU PyTorch stays in float32 (autocast
bfloat16 on a CPU without bfloat16 instructions takes minutes per step at
128x256). `--torch_dtype` sets PyTorch's dtype explicitly.

With a SegFormer `--model` (`segformer_mit_*`; default config
configs/gta5.py:mit_b5) PyTorch runs `transformers`'
SegformerForSemanticSegmentation (random weights, train mode: the
config's stochastic depth and head dropout) in the self-training step
only: cross-entropy of its upsampled logits / T on the batch's labels,
then AdamW with the recipe's groups (head 10x, LayerNorms without weight
decay) and warm-up-then-poly rate; `--stage` warmup / spcl have no
PyTorch side there (`--torch=false` runs ours alone).

`--batch` B is B source + B target images (warm-up, SPCL) or B target crops
(self-training); `--height`/`--width` the source size and, unless
`--target_height`/`--target_width` are given, the target's. PyTorch runs on
CUDA when it is available, JAX on its default backend; all of PyTorch's
cases run before JAX's so that PyTorch's cached memory is released before
JAX's allocator grows (`XLA_PYTHON_CLIENT_PREALLOCATE` defaults to false
here). Each case prints one table: compile seconds (ours), the first call
(untimed), seconds per step (mean over `--steps` steps after
`--untimed_steps` untimed ones), images/s, ours/PyTorch, XLA's
cost-analysis FLOPs of our step and the FLOP/s they give at each side's
time, MFU against the chip's dense bfloat16 peak (`--peak_tflops`, env
PEAK_TFLOPS, or the table KNOWN_PEAK_TFLOPS by device kind), the compiled
program's peak memory (`benchmarks.memory.peak_bytes`: this backend's
buffer assignment) and, on a GPU, each allocator's measured peak (JAX's
cannot be reset: the highest of the process's cases so far). Several cases
end with a summary table; `--output` writes every number as JSON
(`benchmarks/accelerator_check.sh` reads it).
"""

import functools
import json
import os
import re
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import torch
import torchvision

from benchmarks import memory
from benchmarks import torch_reference as ref
from configs import gta5
from spcl_jax.core import spcl
from spcl_jax.core import train_state
from spcl_jax import models
from spcl_jax.models import from_config
from spcl_jax.models import mit
from spcl_jax.run import stage_graph

STAGES = stage_graph.TRAINING_STAGES
DTYPES = ('float32', 'bfloat16')
# DeepLab-v2 backbones with a torchvision counterpart.
TORCH_RESNETS = {'deeplabv2_resnet101': 101, 'deeplabv2_resnet50': 50,
                 'deeplabv2_resnet18': 18}

_STAGE = flags.DEFINE_list('stage', ['spcl'], f'training steps, of {STAGES}')
_DTYPE = flags.DEFINE_list('dtype', ['float32'], f'compute dtypes, of '
                           f'{DTYPES}')
_TORCH_DTYPE = flags.DEFINE_string(
    'torch_dtype', '', "PyTorch's compute dtype (empty: --dtype on a GPU, "
    'float32 on a CPU)')
_HEIGHT = flags.DEFINE_integer('height', 128, 'source image height')
_WIDTH = flags.DEFINE_integer('width', 256, 'source image width')
_TARGET_HEIGHT = flags.DEFINE_integer('target_height', 0, 'target height '
                                      '(self-training: its crop); 0: --height')
_TARGET_WIDTH = flags.DEFINE_integer('target_width', 0, 'target width; 0: '
                                     '--width')
_BATCH = flags.DEFINE_integer('batch', 1, 'images per domain per step')
_STEPS = flags.DEFINE_integer('steps', 3, 'timed steps')
_UNTIMED = flags.DEFINE_integer('untimed_steps', 1, 'steps before timing '
                                '(the first is printed as the first call)')
# SegFormers with a transformers counterpart.
TORCH_SEGFORMERS = {f'segformer_mit_{v}': v for v in mit.MIT_VARIANTS}
_MODEL = flags.DEFINE_enum('model', 'deeplabv2_resnet101',
                           list(TORCH_RESNETS) + list(TORCH_SEGFORMERS),
                           'the segmenter (both sides)')
_TORCH = flags.DEFINE_bool('torch', True, 'run the PyTorch reference')
_JAX = flags.DEFINE_bool('jax', True, 'run our step')
_PEAK = flags.DEFINE_float(
    'peak_tflops', float(os.environ.get('PEAK_TFLOPS', 0)), "the chip's "
    'dense bfloat16 peak in TFLOP/s for MFU (default: env PEAK_TFLOPS, else '
    'KNOWN_PEAK_TFLOPS by device kind; none on a CPU)')
_OUTPUT = flags.DEFINE_string('output', '', 'also write the results (JSON) '
                              'here')

# Dense bfloat16 peak TFLOP/s per chip (device_kind patterns, first match).
KNOWN_PEAK_TFLOPS = (
    (r'H100 PCIe', 756.0), (r'H100 NVL', 835.0), (r'H200|H100', 989.0),
    (r'A100', 312.0), (r'V100', 125.0), (r'\bL4\b', 121.0),
    (r'TPU v6|v6e', 918.0), (r'TPU v5 ?lite|v5e', 197.0),
    (r'TPU v5p?\b', 459.0), (r'TPU v4', 275.0))

GIB = 2.0 ** 30


def peak_tflops(device_kind: str, given: float = 0.0) -> float:
  """`given` if set, else the known peak of `device_kind`, else 0."""
  if given > 0:
    return given
  for pattern, tflops in KNOWN_PEAK_TFLOPS:
    if re.search(pattern, device_kind):
      return tflops
  return 0.0


def case_config(base, stage_name: str, dtype: str, model: str, source_hw,
                target_hw, batch: int):
  """The config with the case's model, dtype, sizes and batch sizes: batch
  source + batch target (warm-up, SPCL), batch target crops at target_hw
  (self-training)."""
  config = base.copy_and_resolve_references()
  config.unlock()
  config.model.name, config.model.dtype = model, dtype
  config.data.source_size, config.data.target_size = source_hw, target_hw
  stage = config.stages[stage_name]
  if stage_name == 'self_training':
    stage.crop_size, stage.target_batch_size = target_hw, batch
  else:
    stage.source_batch_size = stage.target_batch_size = batch
  return config


def random_batches(config, stage_name: str, seed: int) -> list:
  """Random images and labels in [0, num_classes) of the step's batch
  shapes (`benchmarks.memory`'s, one device)."""
  rng = np.random.RandomState(seed)
  num_classes = config.model.num_classes
  return [{'image': rng.randn(*b['image'].shape).astype(np.float32),
           'label': rng.randint(0, num_classes, b['label'].shape).astype(
               b['label'].dtype)}
          for b in memory._batch_shapes(config, stage_name, 1)]  # pylint: disable=protected-access


def images_per_step(batches) -> int:
  return sum(b['image'].shape[0] for b in batches)


# ------------------------------------------------------------------ ours --

def initial_state(config, stage_name: str, seed: int) -> train_state.TrainState:
  """Random variables (the model's initialisers), fresh optimiser states,
  a random unit-norm prototype bank; the discriminator in the warm-up."""
  cfg = config.stages[stage_name]
  model = from_config.model_for_stage(config, cfg.bn_trainable)
  rng = jax.random.PRNGKey(seed)
  variables = models.init_variables(model, rng)
  tx = train_state.segmenter_optimizer(cfg, variables['params'],
                                       variables['batch_stats'])
  num_classes = config.model.num_classes
  d_tx = disc_params = None
  if stage_name == 'warmup' and cfg.adversarial_weight > 0:
    d_tx = train_state.discriminator_optimizer(cfg)
    disc_params = from_config.discriminator_for(config).init(
        rng, jnp.zeros((1, 64, 64, num_classes)))
  bank = spcl.PrototypeBank(
      spcl.l2_normalize(jax.random.normal(
          rng, (num_classes, model.num_features))),
      jnp.zeros((num_classes,), jnp.int32))
  return train_state.new_train_state(variables, tx, rng, prototype_bank=bank,
                                     disc_params=disc_params, d_tx=d_tx)


def _device_peak_bytes(device):
  """The allocator's peak (GPU / TPU), None where there is no such count."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def run_ours(config, stage_name: str, batches, steps: int, untimed: int,
             seed: int) -> dict:
  """Compile seconds, first call seconds, mean seconds per timed step,
  XLA's FLOPs per step and peak bytes of the compiled step."""
  start = time.perf_counter()
  compiled = memory.compile_step(config, stage_name, 1)
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state = jax.device_put(initial_state(config, stage_name, seed))
  batches = jax.device_put(batches)
  jax.block_until_ready((state, batches))
  first_s = None
  for _ in range(untimed):
    start = time.perf_counter()
    state, metrics = compiled(state, *batches)
    jax.block_until_ready((state, metrics))
    first_s = first_s or time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):  # dispatched back to back, as the training loop
    state, metrics = compiled(state, *batches)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps
  device_peak = _device_peak_bytes(jax.local_devices()[0])
  return {'compile_s': compile_s, 'first_s': first_s, 'step_s': step_s,
          'flops': float(cost.get('flops', 0.0)) or None,
          'compiled_peak_gib': memory.peak_bytes(compiled) / GIB,
          'device_peak_gib': device_peak and device_peak / GIB,
          'loss': float(metrics.compute()['loss'])}


# --------------------------------------------------------------- PyTorch --

class TorchASPPv2(torch.nn.Module):
  """ASPP v2: 3x3 convolutions N -> C, dilation = padding = each rate,
  outputs summed (weights N(0, 0.01), bias 0)."""

  def __init__(self, in_channels, num_classes, rates):
    super().__init__()
    self.branches = torch.nn.ModuleList(
        torch.nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r)
        for r in rates)
    for branch in self.branches:
      torch.nn.init.normal_(branch.weight, 0.0, 0.01)
      torch.nn.init.zeros_(branch.bias)

  def forward(self, x):
    return sum(branch(x) for branch in self.branches)


def _dilate_basic_blocks(model) -> None:
  """torchvision refuses dilated BasicBlocks: layer3 and layer4 trade their
  stride for dilation as `spcl_jax.models.resnet.BasicBlock` does (the
  first block of a stage at the previous dilation, both 3x3 convolutions)."""
  dilation = 1
  for layer in (model.layer3, model.layer4):
    previous, dilation = dilation, dilation * 2
    for index, block in enumerate(layer):
      d = previous if index == 0 else dilation
      for conv in (block.conv1, block.conv2):
        conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
      if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


def torch_segmenter(config, bn_trainable: bool, device):
  """(feature_extractor, classifier): torchvision's dilated ResNet up to
  layer4 (BatchNorm frozen, `ref.FrozenBatchNorm2d`, or trainable) and the
  summed ASPP v2."""
  depth = TORCH_RESNETS[config.model.name]
  if config.model.base_width != 64:
    raise ValueError('torchvision ResNets have base width 64, not '
                     f'{config.model.base_width}')
  norm = (torch.nn.BatchNorm2d if bn_trainable else functools.partial(
      ref.FrozenBatchNorm2d, epsilon=config.model.frozen_bn_epsilon))
  dilation = [False, False, False] if depth == 18 else [False, True, True]
  resnet = getattr(torchvision.models, f'resnet{depth}')(
      weights=None, replace_stride_with_dilation=dilation, norm_layer=norm)
  if depth == 18:
    _dilate_basic_blocks(resnet)
  feature_extractor = torch.nn.Sequential(*list(resnet.children())[:-2])
  classifier = TorchASPPv2(resnet.fc.in_features, config.model.num_classes,
                           tuple(config.model.aspp_rates))
  return feature_extractor.to(device).train(), classifier.to(device).train()


def _poly_rates(optimizers, multipliers, stage, iteration) -> None:
  lr = ref.poly_lr(stage.lr, iteration, stage.schedule_steps,
                   stage.poly_power)
  for optimizer, multiplier in zip(optimizers, multipliers):
    for group in optimizer.param_groups:
      group['lr'] = multiplier * lr


def spcl_iteration(feature_extractor, classifier, optimizers, prototypes,
                   source, source_label, target, target_label, *, stage,
                   iteration) -> dict:
  """One SPCL iteration of the released design (offline target mask):
  CE(up(src) / T) + λ (CE(f̂_s μᵀ / τ, M_s) + w_t CE(f̂_t μᵀ / τ, M_t)),
  M_s the nearest-downsampled source labels where the prediction agrees,
  M_t the downsampled pseudo labels; μ updated in place by Eq. 3 from the
  source class means (the loss sees the updated μ with `prototype_update =
  'before_loss'`), then one SGD step on both optimisers. `prototypes`
  [C, N], updated in place."""
  if stage.target_mask != 'offline':
    raise ValueError('the PyTorch SPCL step has the offline target mask '
                     f'only, not {stage.target_mask!r}')
  num_classes = prototypes.shape[0]
  _poly_rates(optimizers, (1.0, stage.classifier_lr_multiplier), stage,
              iteration)
  for optimizer in optimizers:
    optimizer.zero_grad()
  f_s = feature_extractor(source)
  logits_s = classifier(f_s)
  f_t = feature_extractor(target)
  up = torch.nn.functional.interpolate(
      logits_s, size=source_label.shape[-2:], mode='bilinear',
      align_corners=True)
  seg = torch.nn.functional.cross_entropy(
      up.float() / stage.logit_temperature, source_label, ignore_index=255)

  def small(labels, features):  # nearest, PyTorch's rule
    return torch.nn.functional.interpolate(
        labels[:, None].float(), size=features.shape[-2:],
        mode='nearest')[:, 0].long()

  mask_s, mask_t = small(source_label, f_s), small(target_label, f_t)
  keep = (logits_s.argmax(1) == mask_s) & (mask_s < num_classes)
  mask_s = torch.where(keep, mask_s, torch.full_like(mask_s, 255))
  mask_t = torch.where(mask_t < num_classes, mask_t,
                       torch.full_like(mask_t, 255))

  def unit_pixels(features):  # [B, N, h, w] -> [B h w, N], L2-normalised
    flat = features.float().permute(0, 2, 3, 1).reshape(-1,
                                                        features.shape[1])
    return torch.nn.functional.normalize(flat, dim=1)

  def updated_prototypes():
    with torch.no_grad():
      pixels, labels = unit_pixels(f_s), mask_s.reshape(-1)
      valid = labels != 255
      sums = torch.zeros_like(prototypes).index_add_(0, labels[valid],
                                                     pixels[valid])
      counts = torch.bincount(labels[valid], minlength=num_classes)
      updated = stage.alpha * prototypes + (1 - stage.alpha) * (
          sums / counts.clamp(min=1)[:, None])
      present = (counts > 0)[:, None] | stage.decay_absent_classes
      return torch.where(present, updated, prototypes)

  def contrastive(features, mask, mu):
    logits = unit_pixels(features) @ mu.T / stage.temperature
    return torch.nn.functional.cross_entropy(logits, mask.reshape(-1),
                                             ignore_index=255)

  new_prototypes = updated_prototypes()
  mu = (new_prototypes if stage.prototype_update == 'before_loss'
        else prototypes)
  cl_s, cl_t = contrastive(f_s, mask_s, mu), contrastive(f_t, mask_t, mu)
  loss = seg + stage.contrastive_weight * (
      cl_s + stage.target_contrastive_weight * cl_t)
  loss.backward()
  for optimizer in optimizers:
    optimizer.step()
  prototypes.copy_(new_prototypes)
  return {'loss': loss.item()}


def _torch_batches(batches, device):
  """NCHW float images, int64 labels."""
  return [(ref.nchw(b['image']).to(device),
           torch.from_numpy(b['label'].astype(np.int64)).to(device))
          for b in batches]


def segformer_iteration(config, stage_name: str, batches, device):
  """`iteration(i) -> {'loss': ...}`: one self-training step of
  transformers' SegFormer: CE(up(logits) / T) on the target crops, AdamW
  (the head at `classifier_lr_multiplier` x, no weight decay on LayerNorms
  where `decay_norms` is False) at the warm-up-then-poly rate."""
  from benchmarks import segformer_reference  # pylint: disable=g-import-not-at-top
  if stage_name != 'self_training':
    raise ValueError(f'the PyTorch SegFormer reference is the self-training '
                     f'step; {stage_name} has none (run it with --torch=false)')
  cfg = config.stages[stage_name]
  model = segformer_reference.random_segformer(
      TORCH_SEGFORMERS[config.model.name], config.model.num_classes,
      seed=config.seed, drop_path_rate=config.model.drop_path_rate,
      classifier_dropout_prob=config.model.head_dropout).to(device).train()
  # ours: modules named '*norm*' (the LayerNorms; the head's BatchNorm is
  # `fuse_bn`), as train_state.decay_mask
  no_decay = lambda name: (not cfg.decay_norms and 'norm' in name
                           and not name.startswith('decode_head.'))
  groups = {}
  for name, param in model.named_parameters():
    key = (name.startswith('decode_head.'), no_decay(name))
    groups.setdefault(key, []).append(param)
  optimizer = torch.optim.AdamW(
      [{'params': params, 'multiplier': (cfg.classifier_lr_multiplier
                                         if head else 1.0),
        'weight_decay': 0.0 if skip else cfg.weight_decay, 'lr': cfg.lr}
       for (head, skip), params in groups.items()],
      betas=tuple(cfg.adam_betas), eps=1e-8)
  schedule = train_state.learning_rate(cfg)
  (images, labels), = _torch_batches(batches, device)

  def iteration(i):
    for group in optimizer.param_groups:
      group['lr'] = group['multiplier'] * float(schedule(i))
    logits = model(pixel_values=images).logits
    logits = torch.nn.functional.interpolate(
        logits, size=labels.shape[1:], mode='bilinear', align_corners=False)
    loss = torch.nn.functional.cross_entropy(
        logits / cfg.logit_temperature, labels, ignore_index=255)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {'loss': loss.detach()}
  return iteration


def torch_iteration(config, stage_name: str, batches, device):
  """`iteration(i) -> {'loss': ...}`: one PyTorch step of the stage's
  released design on `batches` (this module's random ones)."""
  if config.model.name in TORCH_SEGFORMERS:
    return segformer_iteration(config, stage_name, batches, device)
  cfg = config.stages[stage_name]
  feature_extractor, classifier = torch_segmenter(config, cfg.bn_trainable,
                                                  device)
  optimizers = ref.segmenter_optimizers(feature_extractor, classifier,
                                        cfg.lr, cfg.momentum,
                                        cfg.weight_decay)
  tensors = _torch_batches(batches, device)
  if stage_name == 'warmup':
    if cfg.adversarial_weight <= 0:
      raise ValueError('the released warm-up is adversarial; '
                       'adversarial_weight 0 has no PyTorch reference here')
    disc = config.discriminator
    model_d = ref.fc_discriminator(config.model.num_classes,
                                   tuple(disc.widths),
                                   disc.negative_slope).to(device)
    optimizers += (torch.optim.Adam(model_d.parameters(),
                                    lr=cfg.discriminator_lr,
                                    betas=tuple(cfg.discriminator_betas)),)
    (src, src_label), (tgt, _) = tensors
    return lambda i: ref.released_warmup_iteration(
        feature_extractor, classifier, model_d, optimizers, src, src_label,
        tgt, iteration=i, base_lr=cfg.lr, base_lr_d=cfg.discriminator_lr,
        max_iters=cfg.schedule_steps, power=cfg.poly_power,
        lambda_adv=cfg.adversarial_weight,
        temperature=cfg.logit_temperature, source_label=disc.source_label,
        target_label=disc.target_label)
  if stage_name == 'spcl':
    prototypes = torch.nn.functional.normalize(torch.randn(
        config.model.num_classes, classifier.branches[0].in_channels,
        device=device), dim=1)
    (src, src_label), (tgt, tgt_label) = tensors
    return lambda i: spcl_iteration(
        feature_extractor, classifier, optimizers, prototypes, src,
        src_label, tgt, tgt_label, stage=cfg, iteration=i)
  (tgt, tgt_label), *source = tensors
  joint = {}
  if source:
    joint = {'src_input': source[0][0], 'src_label': source[0][1],
             'source_weight': cfg.source_weight,
             'source_temperature': cfg.logit_temperature}
  return lambda i: ref.released_self_training_iteration(
      feature_extractor, classifier, optimizers, tgt, tgt_label,
      iteration=i, base_lr=cfg.lr, max_iters=cfg.schedule_steps,
      power=cfg.poly_power, **joint)


def run_torch(config, stage_name: str, batches, steps: int, untimed: int,
              dtype: str, device) -> dict:
  """First call seconds and mean seconds per timed step of the PyTorch
  step (under autocast when `dtype` is bfloat16)."""
  torch.manual_seed(config.seed)
  iteration = torch_iteration(config, stage_name, batches, device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=dtype == 'bfloat16')

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize(device)

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  first_s, i = None, 0
  for i in range(untimed):
    start = time.perf_counter()
    with autocast:
      iteration(i)
    sync()
    first_s = first_s or time.perf_counter() - start
  sync()
  start = time.perf_counter()
  for i in range(untimed, untimed + steps):
    with autocast:
      out = iteration(i)
  sync()
  step_s = (time.perf_counter() - start) / steps
  peak = (torch.cuda.max_memory_allocated(device) / GIB
          if device.type == 'cuda' else None)
  return {'first_s': first_s, 'step_s': step_s, 'device_peak_gib': peak,
          'loss': float(out['loss'])}


# ---------------------------------------------------------------- report --

def _fmt(value, spec='.3f') -> str:
  return '-' if value is None else format(value, spec)


# The rows of a case's table and their number formats.
ROWS = (('compile s', '.2f'), ('first call s', '.3f'), ('s/step', '.3f'),
        ('images/s', '.2f'), ('GFLOP/step (XLA)', '.1f'),
        ('TFLOP/s', '.4f'), ('MFU %', '.1f'), ('peak GiB (compiled)', '.2f'),
        ('peak GiB (allocator)', '.2f'))


def case_table(result: dict) -> dict:
  """{row: [ours, PyTorch, ours / PyTorch]} of one case (None where a value
  does not exist). TFLOP/s and MFU of both sides use XLA's FLOP count of
  our step (the same network and losses)."""
  images, peak = result['images'], result['peak_tflops']
  flops = (result.get('ours') or {}).get('flops')

  def side(numbers):
    if not numbers:
      return {}
    step_s = numbers['step_s']
    rate = flops / step_s if flops else None
    return {'compile s': numbers.get('compile_s'),
            'first call s': numbers['first_s'], 's/step': step_s,
            'images/s': images / step_s,
            'GFLOP/step (XLA)': numbers.get('flops') and flops / 1e9,
            'TFLOP/s': rate and rate / 1e12,
            'MFU %': 100 * rate / (peak * 1e12) if rate and peak else None,
            'peak GiB (compiled)': numbers.get('compiled_peak_gib'),
            'peak GiB (allocator)': numbers.get('device_peak_gib')}

  ours, theirs = side(result.get('ours')), side(result.get('torch'))
  table = {}
  for row, _ in ROWS:
    a, b = ours.get(row), theirs.get(row)
    table[row] = [a, b, a / b if a and b else None]
  return table


def print_case(result: dict) -> None:
  print(f"\n== {result['stage']} {result['dtype']} (PyTorch "
        f"{result['torch_dtype']}): {result['model']}, batch "
        f"{result['batch_sizes']}, source {result['source_size']}, target "
        f"{result['target_size']}; {result['steps']} timed steps after "
        f"{result['untimed_steps']} untimed")
  print(f"{'':<22}{'ours (JAX)':>12}{'PyTorch':>12}{'ours/PyTorch':>14}")
  table = case_table(result)
  for row, spec in ROWS:
    ours, theirs, ratio = table[row]
    print(f'{row:<22}{_fmt(ours, spec):>12}{_fmt(theirs, spec):>12}'
          f'{_fmt(ratio):>14}')


def print_summary(results) -> None:
  """One row per case: s/step and images/s of both sides, ours/PyTorch
  seconds, TFLOP/s, MFU and compiled peak memory of ours."""
  print('\nsummary (ratio: ours/PyTorch seconds per step, < 1: ours faster)')
  print(f"{'stage':<14}{'dtype':<10}{'batch':>6}{'ours s':>9}"
        f"{'torch s':>9}{'ratio':>7}{'ours img/s':>11}{'torch img/s':>12}"
        f"{'TFLOP/s':>9}{'MFU %':>7}{'GiB':>7}")
  for result in results:
    t = case_table(result)
    print(f"{result['stage']:<14}{result['dtype']:<10}"
          f"{result['batch_sizes']:>6}{_fmt(t['s/step'][0]):>9}"
          f"{_fmt(t['s/step'][1]):>9}{_fmt(t['s/step'][2], '.2f'):>7}"
          f"{_fmt(t['images/s'][0], '.2f'):>11}"
          f"{_fmt(t['images/s'][1], '.2f'):>12}"
          f"{_fmt(t['TFLOP/s'][0], '.3f'):>9}{_fmt(t['MFU %'][0], '.1f'):>7}"
          f"{_fmt(t['peak GiB (compiled)'][0], '.2f'):>7}")


def write_results(cases) -> list:
  """The cases' results (with their tables); also written to `--output`
  (after every run, so that a run cut short keeps what finished)."""
  results = [{k: v for k, v in case.items() if k not in ('config', 'batches')}
             for case in cases]
  for result in results:
    result['table'] = case_table(result)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(results, f, indent=1)
  return results


def _progress(side: str, case: dict, numbers: dict) -> None:
  print(f"{side} {case['stage']} {case['dtype']}: first call "
        f"{numbers['first_s']:.3f} s, {numbers['step_s']:.3f} s/step",
        flush=True)


def main(argv):
  del argv
  for name, values, allowed in (('stage', _STAGE.value, STAGES),
                                ('dtype', _DTYPE.value, DTYPES)):
    bad = [v for v in values if v not in allowed]
    if bad:
      raise app.UsageError(f'--{name}: {bad} not in {allowed}')
  if _TORCH_DTYPE.value not in ('',) + DTYPES:
    raise app.UsageError(f'--torch_dtype: {_TORCH_DTYPE.value!r} not in '
                         f'{DTYPES}')
  if _STEPS.value < 1 or _UNTIMED.value < 1:
    raise app.UsageError('--steps and --untimed_steps must be >= 1')
  base = flags.FLAGS.config or gta5.get_config(
      'mit_b5' if _MODEL.value in TORCH_SEGFORMERS else None)
  source_hw = (_HEIGHT.value, _WIDTH.value)
  target_hw = (_TARGET_HEIGHT.value or _HEIGHT.value,
               _TARGET_WIDTH.value or _WIDTH.value)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
  jax_device = jax.local_devices()[0]
  peak = peak_tflops(jax_device.device_kind, _PEAK.value)
  print(f'JAX {jax.__version__} on {jax.default_backend()} '
        f'({jax_device.device_kind}); PyTorch {torch.__version__} on '
        f'{device.type}, {torch.get_num_threads()} threads; peak '
        f'{_fmt(peak or None, ".0f")} TFLOP/s bfloat16 dense')

  cases = []
  for stage_name in _STAGE.value:
    for dtype in _DTYPE.value:
      config = case_config(base, stage_name, dtype, _MODEL.value, source_hw,
                           target_hw, _BATCH.value)
      batches = random_batches(config, stage_name, config.seed)
      cases.append({
          'stage': stage_name, 'dtype': dtype,
          'torch_dtype': _TORCH_DTYPE.value or (
              dtype if device.type == 'cuda' else 'float32'),
          'model': _MODEL.value,
          'batch_sizes': '+'.join(str(b['image'].shape[0]) for b in batches),
          'source_size': 'x'.join(map(str, source_hw)),
          'target_size': 'x'.join(map(str, target_hw)),
          'images': images_per_step(batches), 'steps': _STEPS.value,
          'untimed_steps': _UNTIMED.value, 'peak_tflops': peak,
          'jax_device': jax_device.device_kind,
          'torch_device': device.type, 'config': config, 'batches': batches})
  # PyTorch first: its cached memory is given back before JAX's grows.
  runs = [('torch', 'PyTorch', lambda c: run_torch(
      c['config'], c['stage'], c['batches'], _STEPS.value, _UNTIMED.value,
      c['torch_dtype'], device))] if _TORCH.value else []
  if _JAX.value:
    runs.append(('ours', 'ours', lambda c: run_ours(
        c['config'], c['stage'], c['batches'], _STEPS.value, _UNTIMED.value,
        c['config'].seed)))
  failed = []
  for key, side, run in runs:
    for case in cases:
      try:
        case[key] = run(case)
        _progress(side, case, case[key])
      except Exception as e:  # pylint: disable=broad-except
        # e.g. out of memory at one size: the other cases still run
        failed.append(f"{side} {case['stage']} {case['dtype']}: "
                      f'{type(e).__name__}: {e}')
        print(f'FAILED {failed[-1]}', flush=True)
      if device.type == 'cuda':
        torch.cuda.empty_cache()
      write_results(cases)
  results = write_results(cases)
  for result in results:
    print_case(result)
  if len(results) > 1:
    print_summary(results)
  if failed:
    raise SystemExit('failed cases:\n  ' + '\n  '.join(failed))


if __name__ == '__main__':
  # defined here, not on import: benchmarks.memory, which this imports,
  # defines its own --config when it runs
  config_flags.DEFINE_config_file('config', None, 'config file[:args] '
                                  '(default: configs/gta5.py)',
                                  lock_config=True)
  app.run(main)
