"""What a stage runs with: its `Context` (config, workdir, mesh, writer,
the run's stages), the multi-process helpers (sync, agreement on SIGTERM,
the testing crash hook), the specs of the data it reads and their seeds,
passes over a split (`pass_batches`, `evaluate`) and the models and
prototypes of earlier stages it starts from."""

import dataclasses
import os
import signal
import threading
from typing import Callable

from clu import metric_writers
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from spcl_jax import checkpoint
from spcl_jax import evaluation
from spcl_jax import input_pipeline as ip
from spcl_jax import models
from spcl_jax import spcl
from spcl_jax import stage_graph
from spcl_jax import storage
from spcl_jax import workdir as workdir_lib


class Preempted(Exception):
  """SIGTERM arrived; the latest state was checkpointed."""


# ------------------------------------------------------------- the context --

@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  writer: metric_writers.MetricWriter
  preempted: bool = False
  pass_batches_done: int = 0   # by `pass_batches`, for the SIGTERM hook
  # the stages of the run: `stage_graph.STAGES`, or them and more
  # (`pipeline.run`'s `stages`)
  stages: tuple = stage_graph.STAGES

  def stage(self, name: str) -> stage_graph.Stage:
    return {s.name: s for s in self.stages}[name]

  def stage_dir(self, name: str, *parts: str) -> str:
    return os.path.join(self.workdir, name, *parts)

  def done_path(self, name: str) -> str:
    return self.stage_dir(name, 'done.json')

  def is_done(self, name: str) -> bool:
    return storage.exists(self.done_path(name))

  def data_dir(self) -> str:
    return ip.data_dir_path(self.config.data.data_dir)


def sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def crash_after(ctx, write: str, wait=None) -> None:
  workdir_lib.crash_after_write(ctx.config, write, wait)


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process: a collective (an all-gather that
  waits for every process) when there are several."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def agree_every(ctx, sync_every: bool = False) -> int:
  """Every how many steps or batches the processes agree on a SIGTERM (a
  collective): 1 with one process (its own flag, no collective) or
  `sync_every`, else `checkpoint.preemption_check_every_steps`."""
  if sync_every or jax.process_count() == 1:
    return 1
  return ctx.config.checkpoint.preemption_check_every_steps


# ------------------------------------------------ waits SIGTERM cuts short --

# How often a wait that SIGTERM may cut short looks at the flag (seconds).
POLL_SECONDS = 0.2
# How long a work that looks at its `stop` event may take to stop.
STOP_GRACE_SECONDS = 10.0
# The name of the thread that does such a wait's work (`abandoned_work`).
WORK_THREAD_PREFIX = 'interruptible: '


def interruptible(ctx, name: str, what: str,
                  work: Callable[[threading.Event], object],
                  stops: bool = False):
  """`work(stop)` done on a daemon thread while this one looks at the
  SIGTERM flag every POLL_SECONDS: its result, or its exception re-raised,
  or `Preempted` once any process got SIGTERM. Then `stop` is set; a work
  that looks at it (`stops`: a dataset build, between records) is given
  STOP_GRACE_SECONDS to end, one that cannot (a compile) is abandoned: its
  thread runs on until the process exits, which main.py does without
  waiting for it. For what cannot stop between batches: compiling a step,
  building a dataset. `name` ('build', '<stage>/compile', ...) is what
  `testing.sigterm_during` names to send SIGTERM as the work starts.

  With several processes, they look at the flags together (an all-gather of
  (SIGTERM, done) per poll) until every process's work is done or one got
  SIGTERM, so all of them stop at the same poll. The work must then not run
  anything on the devices (compile, do not execute; build on process 0
  only): a program of its own running beside the poll's collectives has
  aborted a two-process CPU run."""
  box, stop = {}, threading.Event()

  def target():
    try:
      box['result'] = work(stop)
    except BaseException as e:  # pylint: disable=broad-except
      box['error'] = e

  thread = threading.Thread(target=target, daemon=True,
                            name=WORK_THREAD_PREFIX + name)
  thread.start()
  if ctx.config.testing.sigterm_during == name:
    os.kill(os.getpid(), signal.SIGTERM)
  while True:
    thread.join(POLL_SECONDS)
    done = not thread.is_alive()
    if jax.process_count() == 1:
      preempted, all_done = ctx.preempted, done
    else:
      flags = multihost_utils.process_allgather(
          np.array([ctx.preempted, done]))
      preempted, all_done = bool(np.any(flags[..., 0])), bool(
          np.all(flags[..., 1]))
    if preempted:
      stop.set()
      if stops:
        thread.join(STOP_GRACE_SECONDS)
      raise Preempted(f'preempted while {what}')
    if all_done:
      break
  if 'error' in box:
    raise box['error']
  return box['result']


def abandoned_work() -> list[str]:
  """The names of `interruptible` works still running (abandoned by a
  SIGTERM): the process must exit without waiting for their threads."""
  return [t.name[len(WORK_THREAD_PREFIX):] for t in threading.enumerate()
          if t.name.startswith(WORK_THREAD_PREFIX) and t.is_alive()]


class CompiledInterruptibly:
  """A jitted function whose first call compiles it through `interruptible`
  (SIGTERM stops the run within POLL_SECONDS instead of after a compile of
  minutes at the recipe's sizes), then calls it as usual: JAX keeps the
  compiled executable, so the call does not compile again. The calls after
  the first go straight to the jitted function."""

  def __init__(self, ctx, name: str, what: str, jitted):
    self._ctx, self._name, self._what, self._jitted = ctx, name, what, jitted
    self._compiled = False

  def __call__(self, *args):
    if not self._compiled:
      interruptible(self._ctx, self._name, self._what,
                    lambda stop: self._jitted.lower(*args).compile())
      self._compiled = True
    return self._jitted(*args)


# ------------------------------------------------------------- data specs --

def _spec(ctx, dataset, split, batch, **kw) -> ip.PipelineSpec:
  data = ctx.config.data
  return ip.PipelineSpec(
      dataset=dataset, split=split, data_dir=ctx.data_dir(),
      global_batch_size=batch, num_classes=ctx.config.model.num_classes,
      label_space=data.label_space, interpolation=data.image_interpolation,
      color_jitter_implementation=data.color_jitter_implementation,
      mean=tuple(data.mean), std=tuple(data.std),
      worker_count=data.worker_count, **kw)


# A run's seed and the seeds derived from it: [0, 2**31) (grain's samplers
# take 32-bit seeds, jax.random.PRNGKey any of these).
SEED_LIMIT = 2 ** 31
SEED_STREAMS = ('source', 'target', 'state')


def stream_seed(seed: int, stage_name: str, stream: str,
                stages: tuple = stage_graph.STAGES) -> int:
  """A reproducible seed in [0, 2**31) for one stage and stream ('source',
  'target', 'state': the train state's PRNG key and initialisation) of the
  run `seed`. Seeds below 2**31 // 1000 keep their earlier derivation
  (seed * 1000 + 10 * stage + stream), so recorded runs stay reproducible;
  larger ones, which used to overflow, go through numpy's SeedSequence.
  A stage's number is its place in `stages` (those after
  `stage_graph.STAGES` extend it, so the seeds of `stage_graph.STAGES` stay
  the same)."""
  stage, index = [s.name for s in stages].index(stage_name), (
      SEED_STREAMS.index(stream))
  if seed < SEED_LIMIT // 1000:
    return seed * 1000 + stage * 10 + index
  sequence = np.random.SeedSequence([seed, stage, index])
  return int(sequence.generate_state(1, np.uint32)[0]) % SEED_LIMIT


def stage_seed(ctx, stage_name: str, stream: str) -> int:
  return stream_seed(ctx.config.seed, stage_name, stream, ctx.stages)


def train_specs(ctx, stage: stage_graph.Stage) -> dict:
  cfg, data = ctx.config.stages[stage.name], ctx.config.data
  pseudo = (ctx.stage_dir(stage.pseudo_labels_from, 'labels')
            if stage.pseudo_labels_from else None)

  def source():
    if data.source_crop_size:   # random scale of the original, then crop
      geometry = dict(scale_range=tuple(data.source_scale_range) or None,
                      crop=tuple(data.source_crop_size))
    else:                       # the released recipe: resized, no crop
      geometry = dict(size=tuple(data.source_size))
    return _spec(ctx, data.source, data.source_split, cfg.source_batch_size,
                 color_jitter=tuple(data.source_color_jitter) or None,
                 flip=data.source_flip,
                 seed=stage_seed(ctx, stage.name, 'source'),
                 **geometry)

  if stage.step == 'self_training':   # the step takes (target[, source])
    specs = {'target_iterator': _spec(
        ctx, data.target, data.target_split, cfg.target_batch_size,
        pseudo_labels=pseudo, color_jitter=tuple(cfg.color_jitter),
        scale_range=tuple(cfg.scale_range), crop=tuple(cfg.crop_size),
        flip=cfg.flip, seed=stage_seed(ctx, stage.name, 'target'))}
    if cfg.source_batch_size:
      specs['source_iterator'] = source()
    return specs
  specs = {'source_iterator': source()}
  if stage.step == 'spcl' or cfg.adversarial_weight > 0:
    specs['target_iterator'] = _spec(
        ctx, data.target, data.target_split, cfg.target_batch_size,
        size=tuple(data.target_size),
        pseudo_labels=pseudo if stage.step == 'spcl' else None,
        seed=stage_seed(ctx, stage.name, 'target'))
  return specs


def eval_spec(ctx, dataset, split, size, batch,
              resize_label) -> ip.PipelineSpec:
  return _spec(ctx, dataset, split, batch, size=tuple(size),
               resize_label=resize_label, shuffle=False)


def global_batch(ctx, batch):
  """The device part of a local evaluation batch, as global arrays."""
  keys = ('image', 'label', 'valid')
  return ip.to_global({k: batch[k] for k in keys}, ctx.mesh, keys)


# ---------------------------------------------------------------- evaluate --

def pass_batches(ctx, stage_name: str, spec: ip.PipelineSpec, **kw):
  """The batches of one pass over a split (evaluation, prototypes, pseudo
  labels), stopping between two batches once any process got SIGTERM (with
  several processes, they agree on it every `agree_every` batches): the
  pass is lost (nothing of it is kept) and runs again on the next run. In
  tests, `testing.sigterm_stage` = a pass stage's name sends SIGTERM before
  its batch number `testing.sigterm_at_step` (counted over its passes)."""
  testing = ctx.config.testing
  hooked = (testing.sigterm_stage == stage_name
            and ctx.stage(stage_name).kind != 'train')  # there: steps
  every = agree_every(ctx)
  for i, batch in enumerate(ip.eval_batches(spec, **kw)):
    if hooked:
      if ctx.pass_batches_done == testing.sigterm_at_step:
        os.kill(os.getpid(), signal.SIGTERM)
      ctx.pass_batches_done += 1
    if i % every == 0 and any_process(ctx.preempted):
      raise Preempted(f'{stage_name} preempted during its pass over '
                      f'{spec.dataset} {spec.split}; the pass runs again')
    yield batch


def evaluate(ctx, model, variables, eval_step, stage_name: str = '') -> dict:
  """Target validation split: confusion matrix over the whole split."""
  data = ctx.config.data
  spec = eval_spec(ctx, data.target, data.val_split, data.eval_size,
                    data.eval_batch_size, resize_label=False)
  confusion = np.zeros((model.num_classes,) * 2, np.int64)
  for batch in pass_batches(ctx, stage_name or 'evaluation', spec):
    confusion += np.asarray(eval_step(variables, global_batch(ctx, batch)))
  return summarize_all(ctx, confusion)


def summarize_all(ctx, confusion) -> dict:
  return evaluation.summarize_sets(confusion, ctx.config.evaluation.class_sets,
                                   ctx.config.data.label_space)


# ------------------------------------------------------------------ models --

def load_variables(directory: str, model, mesh):
  """A saved `model` directory's variables, replicated over `mesh`."""
  shapes = jax.eval_shape(lambda: models.init_variables(model,
                                                        jax.random.key(0)))
  return checkpoint.load_tree(directory,
                              checkpoint.abstract_like(shapes, mesh))


# `chain_model`: what a stage starts from (see configs/default.py).
CHAIN_MODELS = ('final', 'best')


def model_directory(ctx, stage_name: str) -> str:
  """The saved model of the finished training stage `stage_name` that a
  later stage starts from: DIR/<stage>/model ('final'), or its best model on
  the validation split, DIR/<stage>/best/<best_step>/state ('best')."""
  if ctx.config.chain_model == 'final':
    return ctx.stage_dir(stage_name, 'model')
  step = workdir_lib.read_json(ctx.done_path(stage_name))['best_step']
  return ctx.stage_dir(stage_name, 'best', str(step), 'state')


def load_model(ctx, stage_name: str, model):
  return load_variables(model_directory(ctx, stage_name), model, ctx.mesh)


def load_prototypes(ctx, stage_name: str, num_features: int):
  c = ctx.config.model.num_classes
  abstract = spcl.PrototypeBank(
      jax.ShapeDtypeStruct((c, num_features), jnp.float32),
      jax.ShapeDtypeStruct((c,), jnp.int32))
  return checkpoint.load_tree(ctx.stage_dir(stage_name, 'prototypes'),
                              checkpoint.abstract_like(abstract, ctx.mesh))


def model_num_features(model) -> int:
  return model.backbone.num_features
