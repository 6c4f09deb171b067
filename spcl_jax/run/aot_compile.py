"""The training steps compiled ahead of time, for this machine's backend or
for a TPU topology that is not attached.

A step is built from a config as `run/train_stage.py` builds it (model,
optimiser, state, step factory of `core/train_steps.py`), but abstract:
state and batches are shapes, nothing is initialised or run.

`compile_for_mesh` jits it as a run jits it on its mesh (`core/mesh.py`: one
'data' axis over every device of every process): the state replicated and
donated, each batch of the config's global batch size split along its
leading axis, the new state and metrics replicated. On a TPU topology's mesh
(`topology_mesh`) that is the program a multi-host run of that slice
compiles, compiled by libtpu's compiler on this machine (its devices are
compile-only; one per chip, as in a run). `memory_analysis()` then gives
one chip's buffers, `cost_analysis()` one chip's FLOPs and the optimised
HLO the collectives (`collective_bytes`). `measure` times a compile and can
keep what it measured on disk, so that a setting is compiled once.

libtpu comes from `requirements-tpu-compile.txt` (`jax[tpu]`), not from the
runtime install. `topology_devices` starts its plugin with the environment
a compile-only use needs (`_PLUGIN_ENVIRONMENT`, set only while the plugin
starts). `spcl_jax/infra/platforms.py` keeps ordinary runs from loading it.
"""

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import os
import re
import time

import jax
import jax.numpy as jnp

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import train_state
from spcl_jax.core import train_steps
from spcl_jax import models
from spcl_jax.models import from_config
from spcl_jax.infra import platforms
from spcl_jax.infra import workdir

# Topologies libtpu compiles for (`v5e:1x1` is refused: a v5e host is 2x2).
EXAMPLE_TOPOLOGIES = ('v5e:2x2', 'v5e:4x4', 'v4:2x2x2', 'v5p:2x2x1',
                      'v6e:2x2')
INSTALL_HINT = 'pip install -r requirements-tpu-compile.txt'

# What libtpu reads when its plugin starts, set only while it does: without
# the first two it prints that it could not determine them; without the
# third a second process loading libtpu (two compiles at once) fails on the
# lock of /tmp/libtpu_lockfile, which guards TPU chips this use never
# opens.
_PLUGIN_ENVIRONMENT = {'TPU_WORKER_HOSTNAMES': 'localhost',
                       'TPU_ACCELERATOR_TYPE': 'v5litepod-4',
                       'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}

# libtpu's refusal of a program that does not fit the chip's HBM
_OUT_OF_MEMORY = re.compile(r'Ran out of memory in memory space \w+[^\n]*|'
                            r'Ran out of memory on HBM[^\n]*')

# An instruction of an optimised HLO module that is a collective (or the
# asynchronous `-start` half of one): its result shape and its opcode.
_COLLECTIVE = re.compile(
    r'^\s*(?:ROOT\s+)?\S+\s*=\s*(?P<shape>.*?)\s(?P<op>all-reduce|'
    r'all-gather|reduce-scatter|all-to-all|collective-permute)'
    r'(?P<start>-start)?\(', re.MULTILINE)
_ARRAY = re.compile(r'\b([a-z]+[0-9]*)\[([0-9,]*)\]')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
                'f64': 8}


class TopologyError(ValueError):
  """A TPU topology libtpu cannot compile for (or no libtpu): one line."""


# ------------------------------------------------------------ the step --

def abstract_step(config, stage_name: str):
  """(step function, abstract `TrainState`) of training stage `stage_name`
  (warm-up, SPCL or self-training) as the config builds it."""
  cfg = config.stages[stage_name]
  model = from_config.model_for_stage(config, cfg.bn_trainable)
  rng = jax.random.PRNGKey(0)
  variables = jax.eval_shape(lambda: models.init_variables(model, rng))
  tx = train_state.segmenter_optimizer(cfg, variables['params'],
                                       variables['batch_stats'])
  num_classes = config.model.num_classes
  num_features = model.num_features
  d_tx, disc = None, None
  if stage_name == 'warmup' and cfg.adversarial_weight > 0:
    disc = from_config.discriminator_for(config)
    d_tx = train_state.discriminator_optimizer(cfg)

  def state_fn():
    disc_params = None if disc is None else disc.init(
        rng, jnp.zeros((1, 64, 64, num_classes)))
    return train_state.new_train_state(
        models.init_variables(model, rng), tx, rng, disc_params=disc_params,
        d_tx=d_tx, num_features=num_features, num_classes=num_classes)

  state = jax.eval_shape(state_fn)
  if stage_name == 'warmup':
    step = train_steps.make_warmup_step(model, disc, tx, d_tx, cfg,
                                        config.discriminator)
  elif stage_name == 'spcl':
    thresholds = (jnp.zeros((num_classes,), jnp.float32)
                  if cfg.target_mask == 'online' else None)
    step = train_steps.make_spcl_step(model, tx, cfg, thresholds)
  else:
    step = train_steps.make_self_training_step(model, tx, cfg)
  return step, state


def batch_fields(config, stage_name: str) -> list:
  """(batch-size field, (height, width)) of each batch the stage's step
  takes after the state, in argument order."""
  data, stage = config.data, config.stages[stage_name]
  source_hw = tuple(data.source_crop_size or data.source_size)
  target_hw = tuple(data.target_size)
  if stage_name == 'warmup':
    return [('source_batch_size', source_hw)] + (
        [('target_batch_size', target_hw)] if stage.adversarial_weight > 0
        else [])
  if stage_name == 'spcl':
    return [('source_batch_size', source_hw),
            ('target_batch_size', target_hw)]
  return [('target_batch_size', tuple(stage.crop_size))] + (
      [('source_batch_size', tuple(data.source_size))]
      if stage.source_batch_size else [])


def batch_shapes(config, stage_name: str, divide_by: int = 1) -> list:
  """The step's batch arguments as ShapeDtypeStructs: the global batch
  (`divide_by` 1), or one of `divide_by` data-parallel devices' share."""
  stage = config.stages[stage_name]
  return [{'image': jax.ShapeDtypeStruct(
               (stage[field] // divide_by, *hw, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((stage[field] // divide_by, *hw),
                                         jnp.uint8)}
          for field, hw in batch_fields(config, stage_name)]


def unsplit_batches(config, stage_names, devices: int) -> list:
  """`stages.<stage>.<field> = <size>` for each batch size of the stages'
  steps that does not split over `devices` devices (empty when all do)."""
  found = []
  for name in stage_names:
    for field, _ in batch_fields(config, name):
      size = config.stages[name][field]
      if size < 1 or size % devices:
        found.append(f'stages.{name}.{field} = {size}')
  return found


@dataclasses.dataclass(frozen=True)
class Program:
  """A step lowered for `devices` (those of its mesh, or this backend's
  first), ready to compile."""
  lowered: jax.stages.Lowered
  devices: tuple

  @property
  def compile_only(self) -> bool:
    """Whether `devices` belong to no attached backend (libtpu's
    compile-only devices of a TPU topology)."""
    attached = {id(d.client) for d in jax.devices()}
    return any(id(d.client) not in attached for d in self.devices)

  def compile(self):
    """`lowered.compile()`. A compile for compile-only devices is kept out
    of JAX's persistent compilation cache: it would store the executable
    (hundreds of MB at the recipe's sizes) but cannot load it back without
    a TPU ("PjRtCompiler must be constructed with a Client"). `measure`'s
    cache keeps what a compile measured instead."""
    if not self.compile_only:
      return self.lowered.compile()
    setting = 'jax_persistent_cache_min_compile_time_secs'
    before = getattr(jax.config, setting)
    jax.config.update(setting, float('inf'))
    try:
      return self.lowered.compile()
    finally:
      jax.config.update(setting, before)


def lower_one_device(config, stage_name: str, devices: int = 1) -> Program:
  """The stage's step lowered for this machine's default backend, as one
  of `devices` data-parallel devices runs it (1/`devices` of each
  batch)."""
  step, state = abstract_step(config, stage_name)
  batches = batch_shapes(config, stage_name, devices)
  return Program(jax.jit(step, donate_argnums=0).lower(state, *batches),
                 (jax.devices()[0],))


def lower_for_mesh(config, stage_name: str,
                   mesh: jax.sharding.Mesh) -> Program:
  """The stage's step lowered for `mesh` as a run on it compiles it (see
  the module docstring): the global batch split over the 'data' axis."""
  step, state = abstract_step(config, stage_name)
  batches = batch_shapes(config, stage_name)
  replicated = mesh_lib.replicated(mesh)
  split = mesh_lib.batch_sharding(mesh)
  jitted = jax.jit(step, donate_argnums=0,
                   in_shardings=(replicated, *[split] * len(batches)),
                   out_shardings=replicated)
  return Program(jitted.lower(state, *batches), tuple(mesh.devices.flat))


def compile_one_device(config, stage_name: str, devices: int = 1):
  """`lower_one_device` compiled."""
  return lower_one_device(config, stage_name, devices).compile()


def compile_for_mesh(config, stage_name: str, mesh: jax.sharding.Mesh):
  """`lower_for_mesh` compiled."""
  return lower_for_mesh(config, stage_name, mesh).compile()


# ------------------------------------------------------- TPU topologies --

@contextlib.contextmanager
def _plugin_environment():
  """`_PLUGIN_ENVIRONMENT`'s variables absent from the environment, set
  for the duration of the block."""
  added = {k: v for k, v in _PLUGIN_ENVIRONMENT.items()
           if k not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for name in added:
      os.environ.pop(name, None)


def topology_devices(name: str) -> list:
  """libtpu's compile-only devices of TPU topology `name` (e.g. `v5e:2x2`,
  four v5e chips); raises TopologyError (what is wrong and what works, in
  one line that leaves naming `name` to the caller) for a name libtpu
  refuses, or without libtpu."""
  if not platforms.libtpu_installed():
    raise TopologyError('compiling for a TPU topology needs libtpu, which '
                        f'is not installed ({INSTALL_HINT})')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    with _plugin_environment():
      return list(topologies.get_topology_desc(
          topology_name=name, platform='tpu').devices)
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
    lines = str(e).strip().splitlines()
    reason = re.sub(r'^[A-Z_]+: ', '', lines[-1]) if lines else (
        type(e).__name__)
    raise TopologyError(
        f'not a TPU topology libtpu compiles for ({reason}); use one such '
        f'as {", ".join(EXAMPLE_TOPOLOGIES)} (<version>:<chips per axis>; '
        'v5e and v6e have at least 2x2)') from e


def topology_mesh(name: str) -> jax.sharding.Mesh:
  """The run's ('data',) mesh over TPU topology `name`: one device per
  chip. libtpu describes a v4 chip as two devices, one per TensorCore; a
  JAX run on v4 has one per chip (megacore), so the mesh takes each chip's
  first core, and the batch splits over the chips as in a run."""
  devices = [d for d in topology_devices(name)
             if getattr(d, 'core_on_chip', 0) == 0]
  return mesh_lib.make_mesh(devices)


# ------------------------------------------------ what was compiled --

@dataclasses.dataclass(frozen=True)
class CompiledCost:
  """One device's share of a compiled step."""
  peak_bytes: int          # buffers live at once (`peak_bytes`)
  flops: float             # per step (cost_analysis; 0 if not given)
  collective_bytes: dict   # collective -> bytes of its results
  compile_seconds: float
  cached: bool = False     # read from `measure`'s cache, not compiled now
  # The compiler's refusal when the program does not fit the device's
  # memory (libtpu: 'Ran out of memory on HBM, ...'); '' when it compiled.
  out_of_memory: str = ''


def peak_bytes(compiled) -> int:
  """Peak memory per device of a compiled program from its buffer
  assignment: arguments + outputs - donated aliases + temporaries (XLA:CPU's
  `peak_memory_in_bytes` leaves out most of the temporaries)."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def flops(compiled) -> float:
  """FLOPs of one call on one device (XLA's cost analysis; 0.0 where it
  gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


def _array_bytes(shape: str) -> list:
  """Bytes of each array of an HLO shape (`f32[2,3]{1,0}` or a tuple)."""
  sizes = []
  for dtype, dims in _ARRAY.findall(shape):
    count = 1
    for d in filter(None, dims.split(',')):
      count *= int(d)
    sizes.append(count * _DTYPE_BYTES.get(dtype, 4))
  return sizes


def collective_bytes(compiled) -> dict:
  """Bytes of the results of each kind of collective (all-reduce,
  all-gather, ...) in one device's optimised program, summed over its
  instructions (once per instruction: a collective inside a loop counts
  once). XLA's cost analysis gives no such number; this reads the HLO. The
  operand that an asynchronous all-gather or collective-permute `-start`
  also returns is not counted."""
  totals = {}
  for match in _COLLECTIVE.finditer(compiled.as_text()):
    op, sizes = match.group('op'), _array_bytes(match.group('shape'))
    if match.group('start') and op != 'all-reduce':
      sizes = sizes[1:]
    totals[op] = totals.get(op, 0) + sum(sizes)
  return totals


def _cache_key(program: Program) -> str:
  """What determines a compile's result: the lowered program (shapes and
  shardings), its devices, the compiler and its flags."""
  digest = hashlib.sha256()
  for part in (program.lowered.as_text(),
               repr([(d.platform, d.device_kind, d.id, getattr(
                   d, 'coords', None)) for d in program.devices]),
               jax.__version__, _version('jaxlib'), _version('libtpu'),
               os.environ.get('XLA_FLAGS', ''),
               os.environ.get('LIBTPU_INIT_ARGS', '')):
    digest.update(part.encode('utf-8'))
    digest.update(b'\0')
  return digest.hexdigest()


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return ''


def out_of_memory_message(error: str) -> str:
  """The compiler's one-line refusal in `error` when a program does not fit
  its device's memory ('Ran out of memory on HBM, the total memory
  required for HLO temporaries (22.34G) exceeds available HBM (15.75G).');
  '' for any other error."""
  match = _OUT_OF_MEMORY.search(error)
  return match.group(0).strip() if match else ''


def measure(program: Program, cache_dir: str | None = None) -> CompiledCost:
  """`program` compiled (timed) and what it costs; a program too large for
  its device's memory is a cost with the compiler's `out_of_memory`
  message (libtpu refuses it after its buffer assignment). With
  `cache_dir`, a program compiled before (same program, devices, compiler
  and flags: `_cache_key`) is not compiled again: its numbers, compile
  time included, are read from `cache_dir/<key>.json`."""
  path = cache_dir and os.path.join(cache_dir, f'{_cache_key(program)}.json')
  if path and os.path.exists(path):
    return dataclasses.replace(CompiledCost(**workdir.read_json(path)),
                               cached=True)
  start = time.perf_counter()
  try:
    compiled = program.compile()
  except jax.errors.JaxRuntimeError as e:
    refusal = out_of_memory_message(str(e))
    if not refusal:
      raise
    cost = CompiledCost(0, 0.0, {}, time.perf_counter() - start,
                        out_of_memory=refusal)
  else:
    cost = CompiledCost(peak_bytes(compiled), flops(compiled),
                        collective_bytes(compiled),
                        time.perf_counter() - start)
  if path:
    workdir.write_json(path, dataclasses.asdict(cost))
  return cost
