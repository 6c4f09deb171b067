"""The checkpoint layout: orbax managers for a stage's train state and data
iterators, and atomic single-tree outputs (models, prototype banks).

  DIR/<stage>/checkpoints/<step>/{state, source_iterator, target_iterator}
  DIR/<stage>/best/<step>/state      best-mIoU model of the stage
  DIR/<stage>/<output>/              final model / prototype bank
  DIR/<stage>/unreadable_checkpoints/<step>/  checkpoints found unreadable
Orbax writes every checkpoint under a temporary name and renames it when
complete (in a `gs://` workdir: in place, and `commit_success.txt` last),
so an interrupted save never looks like a checkpoint; the temporary
folders of interrupted saves are removed when a manager opens. A step
written again after a resume (best/<step>, an output) replaces the
earlier write instead of colliding with it.
"""

import os

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.infra import storage


def abstract_like(tree, mesh):
  """ShapeDtypeStructs of `tree`, replicated on `mesh` (restore target)."""
  replicated = mesh_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=replicated),
                      tree)


class StageCheckpoints:
  """Train state + data-iterator states of one training stage."""

  def __init__(self, directory: str, keep: int, iterator_names=()):
    self.iterator_names = tuple(iterator_names)
    handlers = {'state': ocp.StandardCheckpointHandler()}
    handlers.update({name: grain.checkpoint.CheckpointHandler()
                     for name in self.iterator_names})
    self.manager = ocp.CheckpointManager(
        storage.resolve(directory), item_names=tuple(handlers),
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True))

  def latest_step(self):
    return self.manager.latest_step()

  def restore_newest_readable(self, abstract_state, iterators: dict,
                              unreadable_dir: str):
    """(step, state) of the newest checkpoint that restores, or (None,
    None) when there is none. Newer unreadable ones (a truncated file, a
    deleted _METADATA) are moved to `unreadable_dir`/<step>, with a warning
    naming them, so that the resumed run can write those steps again. If
    none restores, raises UnreadableCheckpointError naming each one and
    moves nothing."""
    failures = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, iterators)
      except Exception as e:  # pylint: disable=broad-exception-caught
        failures.append((step, self.step_dir(step), e))
        continue
      for bad_step, path, error in failures:
        moved_to = os.path.join(unreadable_dir, str(bad_step))
        logging.warning(
            'checkpoint of step %d at %s is unreadable (%s: %s); resuming '
            'from step %d instead; moved it to %s (safe to delete)',
            bad_step, path, type(error).__name__, _first_line(error), step,
            moved_to)
        _move_aside(path, moved_to)
      if failures:
        self.manager.reload()
      return step, state
    if failures:
      raise UnreadableCheckpointError(
          'no checkpoint in ' + str(self.manager.directory) + ' can be read:'
          + ''.join(f'\n  step {step} at {path}: {type(error).__name__}: '
                    f'{_first_line(error)}' for step, path, error in failures)
          + '\nMove or delete these folders to restart the stage from its '
          'beginning.')
    return None, None

  def step_dir(self, step: int) -> str:
    return os.path.join(str(self.manager.directory), str(step))

  def save(self, step: int, state, iterators: dict) -> None:
    items = {'state': ocp.args.StandardSave(state)}
    items.update({name: grain.checkpoint.CheckpointSave(
        iterators[name].local_iterator) for name in self.iterator_names})
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, iterators: dict):
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    items.update({name: grain.checkpoint.CheckpointRestore(
        iterators[name].local_iterator) for name in self.iterator_names})
    return self.manager.restore(step, args=ocp.args.Composite(**items))[
        'state']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint of a stage can be restored."""


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [''])[0][:300]


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _move_aside(path: str, destination: str) -> None:
  """Moves `path` to `destination` (replacing an earlier one there)."""
  if _is_primary():
    storage.rmtree(destination, missing_ok=True)
    storage.move_tree(path, destination)
  _sync(f'moved-aside-{destination}')


class BestCheckpoint:
  """Keeps the model with the best evaluation mIoU of a stage."""

  def __init__(self, directory: str):
    self.manager = ocp.CheckpointManager(
        storage.resolve(directory), item_names=('state',),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics['miou'],
            best_mode='max', create=True, cleanup_tmp_directories=True))

  def discard_after(self, step: int) -> list[int]:
    """Deletes the entries of steps after `step`: written by a run that
    stopped before its checkpoint of that step, they are evaluated again by
    the run resuming from `step`. Returns the steps deleted."""
    later = [s for s in self.manager.all_steps() if s > step]
    for s in later:
      logging.info('%s: deleting step %d, written after the checkpoint '
                   'resumed from (step %d); it is evaluated again',
                   self.manager.directory, s, step)
      self.manager.delete(s)
    return later

  def offer(self, step: int, variables, miou: float) -> None:
    if step in self.manager.all_steps():   # evaluated again: replace it
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(variables)), metrics={'miou': miou},
                      force=True)
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_tree(directory: str, tree) -> None:
  """Writes one pytree at `directory`, replacing an earlier finished write
  there (a stage's output written again after a crash before its
  done.json). The tree is written complete at `.<name>.writing` (orbax:
  temporary name, then rename), then swapped in by renames; an interrupted
  write or swap leaves only those names, which `workdir.remove_litter`
  deletes, never a stuck or half-written `directory`. In a bucket, which
  has no rename, the tree is written in place with orbax's commit file
  (`commit_success.txt`, written last): an interrupted write leaves a
  folder without it, which the stage's rerun replaces (the stage is not
  done before its done.json, written after this)."""
  final = storage.resolve(directory)
  if storage.is_remote(final):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(final, tree, force=True)
    checkpointer.wait_until_finished()
    _sync(f'saved-{final}')
    return
  parent, name = os.path.split(final)
  writing = os.path.join(parent, f'.{name}.writing')
  replaced = os.path.join(parent, f'.{name}.replaced')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(writing, tree, force=True)   # force: a crash's leftover
  checkpointer.wait_until_finished()
  if _is_primary():
    storage.rmtree(replaced, missing_ok=True)
    if os.path.exists(final):
      os.rename(final, replaced)
    os.rename(writing, final)
    storage.rmtree(replaced, missing_ok=True)
  _sync(f'saved-{final}')


def load_tree(directory: str, abstract):
  return ocp.StandardCheckpointer().restore(storage.resolve(directory),
                                            abstract)
