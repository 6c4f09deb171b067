"""grain loaders: determinism, process sharding, resumable state, worker
shared memory, evaluation passes, the pseudo-label join, global arrays."""

import hashlib
import os
import subprocess
import sys

import jax
import grain
import numpy as np
import pytest

from spcl_jax.core import mesh as mesh_lib
from spcl_jax.data import global_batches
from spcl_jax.data import loaders
from spcl_jax.data import pseudo_labels as pseudo_labels_lib
from tests.data import fake_records

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


_RESUME = '''
import sys, hashlib, numpy as np
from spcl_jax.data import loaders
spec = loaders.PipelineSpec(dataset='sim2real_demo/tiny', split='source_train',
    data_dir=sys.argv[1], global_batch_size=4,
    color_jitter=(0.5, 0.5, 0.5, 0.2), scale_range=(0.5, 1.5), crop=(48, 96),
    flip=True, seed=7, worker_count=int(sys.argv[3]))
it = iter(loaders.train_loader(spec))
it.set_state(open(sys.argv[2], 'rb').read())
h = hashlib.sha256()
for _ in range(3):
  b = next(it)
  h.update(b['image'].tobytes()); h.update(b['label'].tobytes())
print('DIGEST', h.hexdigest())
del it
'''


_WORKER_BATCHES = '''
import sys
from spcl_jax.core import mesh
from spcl_jax.data import global_batches
from spcl_jax.data import loaders
if sys.argv[2] == 'uncopied':   # what the iterator did before
  global_batches.copy_out_of_shared_memory = lambda batch: batch
spec = loaders.PipelineSpec(dataset='sim2real_demo/tiny', split='source_train',
    data_dir=sys.argv[1], global_batch_size=4, seed=7, worker_count=2)
iterator = global_batches.GlobalBatchIterator(loaders.train_loader(spec),
                                              mesh.make_mesh())
for _ in range(3):
  batch = next(iterator)
iterator.close()
print('LABEL SUM', int(batch['label'].sum()))
'''


def _spec(data_dir, **kw):
  base = dict(dataset='sim2real_demo/tiny', split='source_train',
              data_dir=data_dir, global_batch_size=4,
              color_jitter=(0.5, 0.5, 0.5, 0.2), scale_range=(0.5, 1.5),
              crop=(48, 96), flip=True, seed=7)
  base.update(kw)
  return loaders.PipelineSpec(**base)


def _take(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def _digest(batches):
  h = hashlib.sha256()
  for b in batches:
    h.update(b['image'].tobytes())
    h.update(b['label'].tobytes())
  return h.hexdigest()


def test_same_seed_same_batches_other_seed_other_batches(tiny_demo):
  a = _take(loaders.train_loader(_spec(tiny_demo)), 3)
  b = _take(loaders.train_loader(_spec(tiny_demo)), 3)
  c = _take(loaders.train_loader(_spec(tiny_demo, seed=8)), 3)
  assert _digest(a) == _digest(b) != _digest(c)
  assert a[0]['image'].shape == (4, 48, 96, 3)
  assert a[0]['image'].dtype == np.float32 and a[0]['label'].dtype == np.int32


@pytest.mark.parametrize('workers', [0, 2])
def test_processes_read_slices_of_the_one_process_batches(tiny_demo,
                                                          workers):
  """Two or four processes' local batches, side by side, are the global
  batches of one process: the same records with the same random
  transforms, whatever the number of processes (and, for a given worker
  count, exactly the one-process stream)."""
  spec = _spec(tiny_demo, global_batch_size=4, worker_count=workers)
  one = _take(loaders.train_loader(spec, process_index=0, process_count=1), 6)
  for count in (2, 4):
    parts = [_take(loaders.train_loader(spec, process_index=p,
                                        process_count=count), 6)
             for p in range(count)]
    for n, batch in enumerate(one):
      for key in ('image_id', 'image', 'label'):
        side_by_side = np.concatenate([part[n][key] for part in parts])
        assert np.array_equal(side_by_side, batch[key]), (count, n, key)


def test_one_process_reads_grain_stream_positions_in_order():
  inner = grain.samplers.IndexSampler(
      10, shard_options=grain.sharding.ShardOptions(0, 1, True),
      shuffle=True, num_epochs=None, seed=3)
  for workers in (0, 3):
    one = loaders.ProcessSliceSampler(inner, local_batch_size=4, process_index=0,
                                      process_count=1, worker_count=workers)
    assert [one[j].index for j in range(40)] == list(range(40))
  # two processes, two workers, local batch 2: worker w's k-th batch of
  # process p holds positions w + 2 (4 k + 2 p + i)
  second = loaders.ProcessSliceSampler(inner, local_batch_size=2, process_index=1,
                                       process_count=2, worker_count=2)
  assert [second[j].index for j in range(8)] == [4, 5, 6, 7, 12, 13, 14, 15]
  assert 'process_index=1' in repr(second) and '0x' not in repr(second)


def test_eval_batches_cover_the_split_once_over_processes(tiny_demo):
  """Every record exactly once over the processes, in padded batches."""
  eval_spec = _spec(tiny_demo, split='target_val', global_batch_size=6,
                    shuffle=False)
  ids, lengths = [], set()
  for process in range(2):
    batches = list(loaders.eval_batches(eval_spec, process_index=process,
                                        process_count=2))
    lengths.add(len(batches))
    for b in batches:
      assert (b['label'][~b['valid']] == 255).all()
      ids += [str(i) for i, v in zip(b['image_id'], b['valid']) if v]
  assert lengths == {3}
  assert sorted(ids) == [f'target_val_{i:06d}' for i in range(16)]


@pytest.mark.parametrize('workers', [0, 2])
def test_iterator_state_restores_in_a_fresh_process(tiny_demo, tmp_path,
                                                    workers):
  # grain ties a state to the worker count: save and restore with the same
  it = iter(loaders.train_loader(_spec(tiny_demo, worker_count=workers)))
  for _ in range(13):  # past the first epoch of 12 batches
    next(it)
  (tmp_path / 'state').write_bytes(it.get_state())
  expected = _digest([next(it) for _ in range(3)])
  del it
  result = subprocess.run([sys.executable, '-c', _RESUME, tiny_demo,
                           str(tmp_path / 'state'), str(workers)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
  assert f'DIGEST {expected}' in result.stdout


def test_worker_batches_leave_no_shared_memory_behind(tiny_demo):
  """Batches from grain's worker processes arrive in shared memory; a run
  that used them (and closed its iterator) leaves no block behind at exit.
  Without the copy, the last global batch kept its blocks alive past the
  end of the interpreter and Python's resource tracker reported them."""
  def run(mode):
    return subprocess.run([sys.executable, '-c', _WORKER_BATCHES, tiny_demo,
                           mode], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, 'XLA_FLAGS': ''})
  fixed = run('copied')
  assert 'LABEL SUM' in fixed.stdout
  assert 'leaked shared_memory' not in fixed.stderr, fixed.stderr[-3000:]
  # the check sees the failure it is there for
  assert 'leaked shared_memory' in run('uncopied').stderr


def test_pseudo_labels_join_by_image_id(tiny_demo, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source('sim2real_demo/tiny', split='target_val',
                            data_dir=tiny_demo)
  ids = sorted(r['image_id'].decode() for r in source)
  fake = {i: np.full((64, 128), n % 19, np.uint8) for n, i in enumerate(ids)}
  for shard in range(2):
    with pseudo_labels_lib.PseudoLabelWriter(str(tmp_path / 'pl'), shard, 2) as writer:
      for image_id in ids[shard::2]:
        writer.add(image_id, fake[image_id])
  store = pseudo_labels_lib.PseudoLabelStore(str(tmp_path / 'pl'))
  assert len(store) == 16 and store.image_ids() == ids
  spec = _spec(tiny_demo, split='target_val', pseudo_labels=str(tmp_path / 'pl'),
               color_jitter=None, scale_range=None, crop=None, flip=False,
               shuffle=False, global_batch_size=16)
  batch = next(iter(loaders.train_loader(spec)))
  for image_id, label in zip(batch['image_id'], batch['label']):
    np.testing.assert_array_equal(label, fake[str(image_id)])
  # a shard without its index (interrupted write) is not accepted
  os.remove(tmp_path / 'pl' / 'pseudo_labels-00001-of-00002.json')
  with pytest.raises(FileNotFoundError, match='missing'):
    pseudo_labels_lib.PseudoLabelStore(str(tmp_path / 'pl'))
  assert not [f for f in os.listdir(tmp_path / 'pl') if 'tmp' in f]


def test_an_eval_pass_names_its_purpose(caplog):
  """A stage that reads a split twice (pseudo labels: the confidences, then
  the labels) says which pass a progress line is about."""
  from spcl_jax.infra import console  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  records = [fake_records.palette_record(i) for i in range(3)]
  spec = loaders.PipelineSpec(dataset='x', split='target_train', data_dir='',
                              global_batch_size=2, shuffle=False)
  console.set_stage('pseudo_labels')
  try:
    with caplog.at_level(logging.INFO):
      for purpose in ('confidences', 'labels', ''):
        list(loaders.eval_batches(spec, source=records, process_index=0,
                                  process_count=1, purpose=purpose))
  finally:
    console.set_stage('')
  lines = [r.getMessage() for r in caplog.records]
  assert [line.split(' in ')[0] for line in lines] == [
      'pseudo_labels: target_train confidences 3 images',
      'pseudo_labels: target_train labels 3 images',
      'pseudo_labels: target_train 3 images']


def test_global_batches_are_sharded_over_the_mesh(tiny_demo):
  mesh = mesh_lib.make_mesh()
  loader = loaders.train_loader(_spec(tiny_demo, global_batch_size=8))
  iterator = global_batches.GlobalBatchIterator(loader, mesh)
  local = next(iter(loaders.train_loader(_spec(tiny_demo, global_batch_size=8))))
  batch = next(iterator)
  assert isinstance(batch['image'], jax.Array)
  assert batch['image'].sharding.spec == jax.sharding.PartitionSpec('data')
  assert len(batch['image'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch['label']), local['label'])
  assert isinstance(batch['image_id'], np.ndarray)


@pytest.mark.parametrize('process_count,batch', [(1, 4), (2, 4), (3, 6)])
def test_threaded_eval_batches_equal_single_threaded(process_count, batch):
  """Decoding in threads changes nothing: the same records, order, padding
  and per-process slices as reading in one thread."""
  records = [fake_records.palette_record(s) for s in range(11)]
  spec = loaders.PipelineSpec('unused', 'val', '.', global_batch_size=batch,
                              size=(20, 30), shuffle=False)

  def read(process, threads):
    return list(loaders.eval_batches(spec, source=records, process_index=process,
                                     process_count=process_count, threads=threads))

  per_process = -(-11 // process_count)
  for process in range(process_count):
    one, threaded = read(process, 0), read(process, 3)
    assert len(one) == len(threaded) == -(-per_process //
                                          (batch // process_count))
    for a, b in zip(one, threaded):
      assert a.keys() == b.keys()
      for key in a:
        assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype
        np.testing.assert_array_equal(a[key], b[key])
  # one process: exactly grain's plain batching of the transformed records
  dataset = grain.MapDataset.source(records)
  for op in loaders.transforms_of(spec):
    dataset = dataset.map(op)
  plain = [dataset[i:i + batch] for i in range(0, 11, batch)]
  got = list(loaders.eval_batches(spec, source=records, process_index=0,
                                  process_count=1, threads=2))
  for elements, b in zip(plain, got):
    np.testing.assert_array_equal(b['image'][:len(elements)],
                                  np.stack([e['image'] for e in elements]))
    assert [str(i) for i in b['image_id'][:len(elements)]] == [
        e['image_id'] for e in elements]
  assert sum(int(b['valid'].sum()) for b in got) == 11
  assert not got[-1]['valid'][-1] and (got[-1]['label'][-1] == 255).all()
  with pytest.raises(ValueError, match='threads must be >= 0'):
    loaders.eval_batches(spec, source=records, threads=-1)
  with pytest.raises(ValueError, match='fewer than one image per process'):
    loaders.eval_batches(spec, source=records, process_index=0, process_count=7)
