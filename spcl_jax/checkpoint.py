"""The checkpoint layout: orbax managers for a stage's train state and data
iterators, and atomic single-tree outputs (models, prototype banks).

  DIR/<stage>/checkpoints/<step>/{state, source_iterator, target_iterator}
  DIR/<stage>/best/<step>/state      best-mIoU model of the stage
  DIR/<stage>/<output>/              final model / prototype bank
Orbax writes every checkpoint under a temporary name and renames it when
complete, so an interrupted save never looks like a checkpoint.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp

from spcl_jax import sharding as sharding_lib


def abstract_like(tree, mesh):
  """ShapeDtypeStructs of `tree`, replicated on `mesh` (restore target)."""
  replicated = sharding_lib.replicated(mesh)
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
        os.path.abspath(directory), item_names=tuple(handlers),
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self):
    return self.manager.latest_step()

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


class BestCheckpoint:
  """Keeps the model with the best evaluation mIoU of a stage."""

  def __init__(self, directory: str):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), item_names=('state',),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics['miou'],
            best_mode='max', create=True))

  def offer(self, step: int, variables, miou: float) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(variables)), metrics={'miou': miou},
                      force=True)
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def save_tree(directory: str, tree) -> None:
  """Writes one pytree atomically (temporary directory, then rename)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), tree)
  checkpointer.wait_until_finished()


def load_tree(directory: str, abstract):
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory),
                                            abstract)
