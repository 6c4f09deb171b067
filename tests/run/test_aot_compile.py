"""The training steps compiled by libtpu's compiler for TPU topologies that
are not attached (issue 27, parts 3 and 4): sharded as a multi-host run
shards them, on pod slices of 16 and 8 chips; `model.remat=blocks` lowers
the per-chip peak where activations dominate. Small networks (narrow
ResNet-18) keep each compile to seconds."""

import dataclasses
import math

import jax
import pytest

from configs import demo
from spcl_jax.core import mesh as mesh_lib
from spcl_jax.infra import platforms
from spcl_jax.run import aot_compile
from spcl_jax.run import stage_graph

pytestmark = pytest.mark.skipif(
    not platforms.libtpu_installed(),
    reason='libtpu is not installed (pip install -r '
           'requirements-tpu-compile.txt; CI installs it)')


def _config(size, batch_per_chip: int, chips: int, base_width: int,
            remat: str = 'none'):
  """The demo's smoke config, narrowed, at `size` for every stream, each
  global batch `batch_per_chip` images per chip."""
  config = demo.get_config('smoke')
  config.unlock()
  config.model.base_width = base_width
  config.model.remat = remat
  config.discriminator.widths = (8, 8, 8, 8)
  config.data.source_size = config.data.target_size = size
  config.stages.self_training.crop_size = size
  for name in stage_graph.TRAINING_STAGES:
    stage = config.stages[name]
    stage.target_batch_size = batch_per_chip * chips
    stage.source_batch_size = (0 if name == 'self_training'
                               else batch_per_chip * chips)
  return config


@pytest.mark.parametrize('topology, chips', [('v5e:4x4', 16),
                                             ('v4:2x2x2', 8)])
def test_the_three_steps_compile_for_a_pod_slice(topology, chips):
  """At 16x32, one image per chip: a v4 chip is one device (megacore), as
  in a run."""
  mesh = aot_compile.topology_mesh(topology)
  assert mesh.size == chips and mesh.axis_names == (mesh_lib.DATA_AXIS,)
  config = _config((16, 32), 1, chips, base_width=8)
  for name in stage_graph.TRAINING_STAGES:
    program = aot_compile.lower_for_mesh(config, name, mesh)
    assert program.compile_only
    compiled = program.compile()
    # every batch split over all chips, one image each; the state whole
    state_sharding, *batch_shardings = compiled.input_shardings[0]
    for sharding, batch in zip(batch_shardings,
                               aot_compile.batch_shapes(config, name)):
      image = sharding['image']
      assert image.mesh.size == chips, (name, image)
      assert image.shard_shape(batch['image'].shape)[0] == 1, (name, image)
    assert all(s.is_fully_replicated
               for s in jax.tree.leaves(state_sharding))
    peak = aot_compile.peak_bytes(compiled)
    assert 0 < peak < 2**30 and math.isfinite(peak), (name, peak)
    assert aot_compile.flops(compiled) > 0, name
    # the gradients (and BN statistics) are summed over the chips
    assert aot_compile.collective_bytes(compiled).get('all-reduce', 0) > 0


def test_remat_blocks_lowers_the_per_chip_peak_where_activations_dominate():
  """Self-training (trainable BN), one 128x256 crop per chip of v5p:2x2x1,
  base width 8: 62.6 -> 52.3 MiB with libtpu 0.0.42.1. Smaller steps do
  not show it: at the demo's size 0.05 -> 0.06 GiB; at 128x256, two crops
  per chip of v5e:2x2, 5.7 -> 23.1 MiB (there the compiler places many
  tensors in on-chip memory, S(1) in its HLO, outside the HBM peak)."""
  mesh = aot_compile.topology_mesh('v5p:2x2x1')
  peaks = {}
  for remat in ('none', 'blocks'):
    config = _config((128, 256), 1, mesh.size, base_width=8, remat=remat)
    peaks[remat] = aot_compile.peak_bytes(aot_compile.compile_for_mesh(
        config, 'self_training', mesh))
  assert peaks['blocks'] < 0.95 * peaks['none'], peaks


def test_a_measured_program_is_read_back_from_the_cache(tmp_path):
  """(A small program on this machine's backend: the cache is the same for
  any.)"""
  def program(fn):
    lowered = jax.jit(fn).lower(jax.ShapeDtypeStruct((64, 64), 'float32'))
    return aot_compile.Program(lowered, (jax.devices()[0],))

  square = program(lambda x: x @ x)
  assert not square.compile_only
  cost = aot_compile.measure(square, str(tmp_path))
  again = aot_compile.measure(program(lambda x: x @ x), str(tmp_path))
  assert not cost.cached and again.cached
  assert again == dataclasses.replace(cost, cached=True)
  assert cost.flops > 0 and cost.peak_bytes > 0
  assert not aot_compile.measure(program(lambda x: x @ x.T),
                                 str(tmp_path)).cached
  assert len(list(tmp_path.iterdir())) == 2


def test_a_topology_libtpu_does_not_know_is_one_line_naming_what_works():
  for name in ('v9:2x2', 'v5e:1x1', 'v5e'):
    with pytest.raises(aot_compile.TopologyError) as e:
      aot_compile.topology_devices(name)
    message = str(e.value)
    assert '\n' not in message and 'v5e:2x2' in message, message


def test_a_batch_that_does_not_split_over_the_chips_is_named():
  config = _config((32, 64), 1, 4, base_width=8)
  assert aot_compile.unsplit_batches(
      config, stage_graph.TRAINING_STAGES, 4) == []
  config.stages.spcl.target_batch_size = 6
  assert aot_compile.unsplit_batches(
      config, stage_graph.TRAINING_STAGES, 4) == [
          'stages.spcl.target_batch_size = 6']


def test_a_program_too_large_for_the_chip_is_measured_as_out_of_memory(
    tmp_path):
  """libtpu refuses a program whose buffers exceed a v5e chip's 16 GiB
  (here one 20 GiB temporary); `measure` returns the refusal, and keeps it
  in its cache like any measurement."""
  mesh = aot_compile.topology_mesh('v5e:2x2')
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def huge(x):   # a 2**20 x 5 * 2**10 float32 outer product (20 GiB), sorted
    return jax.numpy.sort(jax.numpy.outer(x, x[:5 * 2**10]), axis=0)[0].sum()

  lowered = jax.jit(huge, out_shardings=replicated).lower(
      jax.ShapeDtypeStruct((2**20,), 'float32', sharding=replicated))
  program = aot_compile.Program(lowered, tuple(mesh.devices.flat))
  cost = aot_compile.measure(program, str(tmp_path))
  assert cost.out_of_memory.startswith('Ran out of memory'), cost
  assert 'HBM' in cost.out_of_memory or 'hbm' in cost.out_of_memory, cost
  assert cost.peak_bytes == 0
  assert aot_compile.measure(program, str(tmp_path)) == dataclasses.replace(
      cost, cached=True)
  assert aot_compile.out_of_memory_message('INTERNAL: something else') == ''
