"""Gradient accumulation: a step's global batch in k micro-batches.

With `stages.<stage>.micro_batches = k` a step computes its global batch in
k micro-batches one after the other (`jax.lax.scan`) and applies one update.
Every loss is a mean over the pixels (or discriminator outputs) of the
global batch, so each micro-batch contributes its mean weighted by its share
of those pixels; with per-image loss weights (`images_per_loss_mean` > 0)
the weights are computed from the whole global batch and travel with their
images into the micro-batches. Prototype class sums and counts are summed
over the micro-batches. With frozen BatchNorm the step therefore equals the
k = 1 step up to float rounding. With trainable BatchNorm each
micro-batch is normalised by its own batch statistics (not the global
batch's), so the gradients differ from k = 1; the BN running statistics
after the step are the mean over the micro-batches of those each
micro-batch's forward passes would leave (`split_micro_batches` says which
images form a micro-batch).
"""

import jax
import jax.numpy as jnp

from spcl_jax.core import spcl


def micro_batch_count(stage) -> int:
  """`stage.micro_batches` (1 for a stage config without the field)."""
  return int(stage.get('micro_batches', 1))


def split_micro_batches(batch, k: int):
  """Every leaf [B, ...] -> [k, B / k, ...]: micro-batch j holds images j,
  j + k, j + 2k, ... of the global batch. A batch sharded over D devices in
  equal blocks of B / D images (k dividing B / D) thus gives every
  micro-batch B / (D k) images of each device's block: no image changes
  device and every device works on every micro-batch."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f'micro_batches = {k} does not divide the batch of '
                       f'{x.shape[0]} images')
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def merge_micro_batches(micro_batches):
  """The inverse of `split_micro_batches`: every leaf [k, B / k, ...] ->
  [B, ...] in the global batch's order."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]),
      micro_batches)


def micro_batch_rng(rng, index, k: int):
  """The random key micro-batch `index` of k draws its dropout and
  stochastic depth from: `rng` itself at k = 1 (so an unaccumulated step is
  unchanged), else `rng` folded with the index, so that no two micro-batches
  of a step share a mask."""
  return rng if k == 1 else jax.random.fold_in(rng, index)


def sum_over_micro_batches(fn, micro_batches):
  """Σ_j fn(micro-batch j, j) for a pytree-valued `fn`, the micro-batches
  (the leading axis of `micro_batches`' leaves) computed one after the
  other; j is an int32 scalar."""
  k = jax.tree.leaves(micro_batches)[0].shape[0]
  indices = jnp.arange(k, dtype=jnp.int32)
  first = jax.tree.map(lambda x: x[0], micro_batches)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(fn, first, indices[0]))

  def body(total, indexed):
    index, batch = indexed
    return jax.tree.map(jnp.add, total, fn(batch, index)), None

  return jax.lax.scan(body, zeros, (indices, micro_batches))[0]


def accumulate(fn, batches, k: int):
  """fn(batches, 0) for k = 1, else the sum of fn(micro-batch j, j) over the
  k micro-batches."""
  if k == 1:
    return fn(batches, 0)
  return sum_over_micro_batches(fn, split_micro_batches(batches, k))


def num_valid(labels, num_classes: int) -> jax.Array:
  """float32 number of the pixels a masked cross-entropy averages over."""
  return jnp.sum(spcl.valid_mask(labels, num_classes)
                 & (labels != spcl.IGNORE_INDEX)).astype(jnp.float32)


def share(labels, total, num_classes: int) -> jax.Array:
  """The weight of a micro-batch's masked mean in the global batch's mean:
  its valid pixels over the global batch's `total` (1 when k = 1)."""
  return num_valid(labels, num_classes) / jnp.maximum(total, 1.0)


def stats_share(stats, k: int):
  """A micro-batch's 1/k of the BN statistics the step leaves."""
  return jax.tree.map(lambda s: s / k, stats)

