"""A finished pipeline workdir as a source of trained models: its config,
its finished stages, the saved model of a training stage, and the checks
the commands that use it (`spcl_jax.evaluate`, `spcl_jax.predict`) make
before any compute."""

import json
import os
import sys
import tempfile

from absl import app
from absl import flags
import jax
import ml_collections

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.infra import console
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.models import from_config
from spcl_jax.run import context as context_lib
from spcl_jax.run import stage_graph
from spcl_jax.run import stage_outputs

CHECKPOINTS = stage_outputs.CHAIN_MODELS   # 'final' | 'best'


class StageNotAvailableError(FileNotFoundError):
  """The asked stage has no finished model in the workdir."""


def hide_accelerators_from_tensorflow() -> None:
  """clu's writers import TensorFlow: keep it off the accelerators."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')


def define_model_flags() -> None:
  """The flags both commands share: which model of which workdir, and the
  test-time augmentation."""
  flags.DEFINE_string('workdir', None, 'pipeline workdir')
  flags.DEFINE_string('stage', None,
                      'training stage (default: the last finished one)')
  flags.DEFINE_enum('checkpoint', 'final', list(CHECKPOINTS),
                    "the stage's final model or its best one on the "
                    'validation split')
  flags.DEFINE_bool('flip', False, 'average with the flipped image')
  flags.DEFINE_list('scales', ['1.0'], 'input scales to average')
  flags.mark_flags_as_required(['workdir'])


def command_main(body):
  """An absl `main` that takes no positional arguments and runs
  `run_command(body)`."""
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    run_command(body)
  return main


def run_command(body) -> None:
  """Runs `body(flags.FLAGS)` with the calm console (spcl_jax.infra.console) and
  TensorFlow off the accelerators; a bad workdir, stage, file or value ends
  in one line naming it and exit status 1."""
  console.setup(flags.FLAGS.verbosity)
  hide_accelerators_from_tensorflow()
  try:
    body(flags.FLAGS)
  except (FileNotFoundError, PermissionError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def parse_numbers(values, kind, name: str) -> tuple:
  """`--name=a,b,c` (absl list) as a tuple of `kind`, or an error naming
  the flag."""
  try:
    return tuple(kind(v) for v in values)
  except ValueError as e:
    raise ValueError(f'--{name}: {",".join(values)!r} is not a list of '
                     f'{kind.__name__} ({e})') from e


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a pipeline workdir was started with (DIR/config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not storage.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {workdir} is not a pipeline workdir (python '
        '-m spcl_jax.main --workdir=DIR writes it)')
  try:
    return ml_collections.ConfigDict(workdir_lib.read_json(path))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e


def finished_stage_kinds(workdir: str) -> dict[str, str]:
  """{stage: kind} of the stages with a done.json: the pipeline's in their
  order, then those of an experiment that extends it (`pipeline.run`'s
  `stages`, e.g. benchmarks/self_training_rounds.py) by name, whose kind is
  read from what they saved: 'train' with a `model/`, 'pseudo_labels' with
  `labels/`, else 'prototypes'."""
  def done(name):
    return storage.exists(os.path.join(workdir, name, 'done.json'))

  kinds = {s.name: s.kind for s in stage_graph.STAGES if done(s.name)}
  extra = sorted(name for name in (storage.listdir(workdir) if storage.isdir(
      workdir) else []) if name not in stage_graph.STAGE_BY_NAME
                 and done(name))
  for name in extra:
    folder = os.path.join(workdir, name)
    kinds[name] = (
        'train' if storage.isdir(os.path.join(folder, 'model')) else
        'pseudo_labels' if storage.isdir(os.path.join(folder, 'labels')) else
        'prototypes')
  return kinds


def finished_stages(workdir: str) -> list[str]:
  """Stages with a done.json (`finished_stage_kinds`' order)."""
  return list(finished_stage_kinds(workdir))


def finished_training_stages(workdir: str) -> list[str]:
  return [name for name, kind in finished_stage_kinds(workdir).items()
          if kind == 'train']


def choose_stage(workdir: str, stage: str | None = None) -> str:
  """`stage`, or the last finished training stage, checked to have a model;
  else an error listing the stages that exist."""
  finished = finished_stages(workdir)
  trained = finished_training_stages(workdir)
  listing = (f'finished stages in {workdir}: {finished or "none"}; those '
             f'with a model (training stages): {trained or "none"}')
  if stage is None:
    if not trained:
      raise StageNotAvailableError(f'no finished training stage; {listing}')
    return trained[-1]
  if stage not in stage_graph.STAGE_BY_NAME and stage not in finished:
    raise StageNotAvailableError(
        f'unknown stage {stage!r} (stages: '
        f'{[s.name for s in stage_graph.STAGES]}); {listing}')
  if stage not in finished:
    raise StageNotAvailableError(f'stage {stage!r} is not finished; '
                                 f'{listing}')
  if stage not in trained:
    raise StageNotAvailableError(
        f'stage {stage!r} is a {finished_stage_kinds(workdir)[stage]} stage '
        f'and has no model; {listing}')
  return stage


def check_output_dir(path: str) -> str:
  """Creates `path` if needed and checks that a file can be written in it
  (before any compute); returns its absolute path. A `gs://` URL is
  returned as it is: a bucket's permissions show at the first write."""
  path = storage.resolve(path)
  if storage.is_remote(path):
    return path
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise PermissionError(f'cannot write to the output directory {path}: '
                          f'{e.strerror or e}') from e
  return path


def context(config: ml_collections.ConfigDict, workdir: str,
            checkpoint: str = 'final') -> context_lib.Context:
  """A pipeline context over every device that reads `checkpoint` ('final'
  or 'best') models and writes nothing (no metric writer)."""
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f'checkpoint: {checkpoint!r}, expected one of '
                     f'{CHECKPOINTS}')
  config = ml_collections.ConfigDict(config.to_dict())
  config.chain_model = checkpoint
  return context_lib.Context(config, storage.resolve(workdir),
                             mesh_lib.make_mesh(), writer=None)


def model_directory(ctx: context_lib.Context, stage: str) -> str:
  """The saved model `ctx` reads for `stage`, checked to exist."""
  directory = stage_outputs.model_directory(ctx, stage)
  if not storage.isdir(directory):
    raise FileNotFoundError(
        f'the {ctx.config.chain_model} model of stage {stage!r} is missing: '
        f'{directory} does not exist')
  return directory


def load(ctx: context_lib.Context, stage: str):
  """(model, variables replicated over the mesh) of a training stage; the
  model is the one the pipeline evaluated the stage with."""
  model = from_config.model_for_evaluation(ctx.config, stage)
  variables = stage_outputs.load_variables(model_directory(ctx, stage),
                                           model, ctx.mesh)
  return model, variables


def batch_size(config: ml_collections.ConfigDict,
               num_devices: int | None = None) -> int:
  """`data.eval_batch_size` rounded up to a multiple of the devices."""
  devices = jax.device_count() if num_devices is None else num_devices
  return -(-int(config.data.eval_batch_size) // devices) * devices
