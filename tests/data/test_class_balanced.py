"""The class-balanced source sampler (spcl_jax/data/class_balanced.py)
against an independent implementation of the released code's procedure;
its determinism, exact resume and process slicing."""

import math

import grain
import numpy as np
import pytest

from spcl_jax.data import class_balanced
from spcl_jax.data import class_statistics
from spcl_jax.data import loaders
from tests.data import fake_records

SUB_EPOCH = 3000


def release_list(label_to_file, file_to_label, max_iters, num_classes,
                 random_state):
  """The training list of `core/datasets/gta5.py` (and `synthia.py`) of
  BinhuiXie/SPCL, step for step, with `random_state` (a numpy RandomState)
  in place of numpy's global generator. `label_to_file[c]`: the files that
  contain class c (shuffled in place, as the release does);
  `file_to_label[f]`: the classes file f contains."""
  img_ids = []
  ind = dict()
  for i in range(num_classes):
    ind[i] = 0
  for _ in range(int(max_iters / SUB_EPOCH) + 1):
    cur_class_dist = np.zeros(num_classes)
    for _ in range(SUB_EPOCH):
      if cur_class_dist.sum() == 0:
        dist1 = cur_class_dist.copy()
      else:
        dist1 = cur_class_dist / cur_class_dist.sum()
      w = 1 / np.log(1 + 1e-2 + dist1)
      w = w / w.sum()
      c = random_state.choice(num_classes, p=w)
      if ind[c] > (len(label_to_file[c]) - 1):
        random_state.shuffle(label_to_file[c])
        ind[c] = ind[c] % (len(label_to_file[c]) - 1)
      c_file = label_to_file[c][ind[c]]
      img_ids.append(c_file)
      ind[c] = ind[c] + 1
      cur_class_dist[file_to_label[c_file]] += 1
  return img_ids


def rare_class_presence(num_records=400, seed=0) -> np.ndarray:
  """bool [records, 19]: a source whose classes range from every record
  to 2 of 400 (the release needs at least 2 files per class: with one it
  divides by zero when the list is used up)."""
  rng = np.random.RandomState(seed)
  frequency = np.array([1.0, 0.9, 0.95, 0.3, 0.25, 0.8, 0.2, 0.4, 0.9, 0.3,
                        0.9, 0.5, 0.05, 0.9, 0.06, 0.04, 0.01, 0.08, 0.02])
  presence = rng.rand(num_records, 19) < frequency
  presence[:, 16] = False
  presence[[5, num_records - 3], 16] = True   # 'train': 2 records
  presence[:, 18] = False
  # 'bicycle': 3 records (a reshuffled list is read from its index 1)
  presence[[9, num_records // 2, num_records - 1], 18] = True
  return presence


def release_shares(presence, sub_epochs, seed) -> np.ndarray:
  label_to_file = [list(np.flatnonzero(presence[:, c]))
                   for c in range(presence.shape[1])]
  file_to_label = {f: list(np.flatnonzero(row))
                   for f, row in enumerate(presence)}
  files = release_list(label_to_file, file_to_label,
                       (sub_epochs - 1) * SUB_EPOCH, presence.shape[1],
                       np.random.RandomState(seed))
  return presence[files].mean(axis=0)


def our_shares(presence, sub_epochs, seed, **rule) -> np.ndarray:
  sampler = class_balanced.ClassBalancedSampler(
      presence, seed, class_balanced.BalancingRule(SUB_EPOCH, **rule))
  keys = sampler.record_keys(np.arange(sub_epochs * SUB_EPOCH))
  return class_statistics.sampled_shares(presence, keys)


def test_shares_of_sampled_images_match_the_released_procedure():
  """The share of sampled images that contain each class, ours against the
  release's procedure (different generators, same rule), over 8 sub-epochs
  (24,000 draws) of each.

  Tolerance: 5 standard errors of a difference of two binomial shares,
  5 sqrt(2 p (1 - p) / n) with n = 24,000 draws (at most 0.032 at
  p = 0.5, 0.006 at p = 0.01). Draws within a sub-epoch are not
  independent, but the rule's feedback pulls every share back toward its
  target, which makes the spread smaller than that of independent draws,
  not larger: over 8 pairs of seeds the largest difference was 0.30 of
  this bound. It still has the power to catch a wrong rule: a log offset
  of 1.1 instead of 1.01 exceeds it (2.7 times, checked below), and no
  balancing at all by far more (the rare classes' shares grow tenfold)."""
  presence = rare_class_presence()
  sub_epochs = 8
  n = sub_epochs * SUB_EPOCH
  reference = release_shares(presence, sub_epochs, seed=1)
  ours = our_shares(presence, sub_epochs, seed=1)
  p = (reference + ours) / 2
  tolerance = 5 * np.sqrt(2 * p * (1 - p) / n) + 1e-9   # road: p = 1
  np.testing.assert_array_less(np.abs(ours - reference), tolerance)
  uniform = presence.mean(axis=0)
  # the balancing took: 'train' (2 of 400 records) and 'bicycle' (3)
  for c in (16, 18):
    assert ours[c] > 10 * uniform[c] and reference[c] > 10 * uniform[c]
  other_rule = our_shares(presence, sub_epochs, seed=1, log_offset=1.1)
  assert np.max(np.abs(other_rule - reference) / tolerance) > 2


def test_the_rule_pieces_follow_the_release():
  # a used-up list restarts at ind % (len - 1), ind == len
  assert [class_balanced.restart_index(n) for n in (1, 2, 3, 10)] == [
      0, 0, 1, 1]
  # nothing counted yet: every class equally likely
  assert class_balanced.class_weights([0, 0, 0], 0, 1.01) == [
      1 / math.log(1.01)] * 3
  weights = class_balanced.class_weights([3, 1, 0], 4, 1.01)
  assert weights == [1 / math.log(1.01 + 0.75), 1 / math.log(1.01 + 0.25),
                     1 / math.log(1.01)]


def test_the_first_order_is_one_order_of_all_records_per_class():
  """Before any reshuffle every class list follows one seeded order of all
  records (the release: its index file's order, one for every class)."""
  presence = rare_class_presence(50)
  files = [np.flatnonzero(presence[:, c]) for c in range(19)]
  lists = class_balanced.first_lists(files, 50, seed=3)
  everything = lists.orders[0]   # road: every record
  assert sorted(everything) == list(range(50))
  rank = np.argsort(everything)
  for order, own in zip(lists.orders, files):
    assert sorted(order) == sorted(own)
    assert list(np.diff(rank[order]) > 0) == [True] * (len(order) - 1)
  assert lists.next_index == (0,) * 19
  other = class_balanced.first_lists(files, 50, seed=4)
  assert not np.array_equal(other.orders[0], everything)


def test_the_same_seed_gives_the_same_stream_without_numpy_global_rng():
  presence = rare_class_presence(60)
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  rule = class_balanced.BalancingRule(sub_epoch_draws=500)
  a = class_balanced.ClassBalancedSampler(presence, 7, rule)
  b = class_balanced.ClassBalancedSampler(presence, 7, rule)
  c = class_balanced.ClassBalancedSampler(presence, 8, rule)
  positions = np.arange(2000)
  assert np.array_equal(a.record_keys(positions), b.record_keys(positions))
  assert not np.array_equal(a.record_keys(positions),
                            c.record_keys(positions))
  assert np.array_equal(np.random.get_state()[1], before)
  assert 'seed=7' in repr(a) and '0x' not in repr(a)
  assert repr(a) == repr(b) != repr(c)


def test_any_position_is_a_pure_function_of_seed_and_position():
  """A sampler asked first for a late position (a resumed run), or for the
  positions out of order, gives what one read from the start gives; each
  record's random generator is IndexSampler's for that position."""
  presence = rare_class_presence(60)
  rule = class_balanced.BalancingRule(sub_epoch_draws=300)
  start = class_balanced.ClassBalancedSampler(presence, 5, rule)
  stream = [start[j].record_key for j in range(3000)]
  resumed = class_balanced.ClassBalancedSampler(presence, 5, rule)
  assert [resumed[j].record_key for j in range(1777, 3000)] == stream[1777:]
  shuffled = np.random.default_rng(0).permutation(3000)
  assert [resumed[int(j)].record_key for j in shuffled] == [
      stream[j] for j in shuffled]   # older sub-epochs computed again
  index_sampler = grain.samplers.IndexSampler(
      60, shuffle=True, num_epochs=None, seed=5)
  assert (start[42].rng.random() == index_sampler[42].rng.random())
  with pytest.raises(IndexError):
    start[-1]   # pylint: disable=pointless-statement


def test_degenerate_classes_are_handled():
  """A class no record contains is never drawn (the release fails on it);
  a class of one record gives that record again; no class at all is
  refused."""
  presence = np.zeros((6, 4), bool)
  presence[:, 0] = True
  presence[2, 1] = True    # one record
  rule = class_balanced.BalancingRule(sub_epoch_draws=100)
  sampler = class_balanced.ClassBalancedSampler(presence, 0, rule)
  keys = sampler.record_keys(np.arange(400))
  assert set(keys) == set(range(6))
  share = class_statistics.sampled_shares(presence, keys)
  assert share[2] == share[3] == 0 and share[1] > 0.3
  with pytest.raises(ValueError, match='no record contains any'):
    class_balanced.ClassBalancedSampler(np.zeros((6, 4), bool), 0, rule)


def test_the_numbers_of_the_rule_come_from_the_spec(rare_folder):
  """`PipelineSpec`'s sub-epoch and offset reach the sampler."""
  data_dir, name = rare_folder
  spec = loaders.PipelineSpec(name, 'train', data_dir, 4,
                              sampling='class_balanced', seed=3,
                              sub_epoch_draws=17, log_offset=1.2)
  from spcl_jax.data import sources  # pylint: disable=g-import-not-at-top
  sampler = loaders.record_sampler(spec, sources.open_source(
      name, 'train', data_dir))
  assert 'sub_epoch_draws=17, log_offset=1.2' in repr(sampler)
  with pytest.raises(ValueError, match=r"sampling = 'balanced', expected"):
    loaders.record_sampler(spec.__class__(
        name, 'train', data_dir, 4, sampling='balanced'), None)


# ------------------------------------------------------ through the loader --

@pytest.fixture(scope='module')
def rare_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('rare_manual')
  data_dir = str(tmp_path_factory.mktemp('rare_tfds'))
  return data_dir, fake_records.build_rare_class_folder(str(root), data_dir)


def _balanced_spec(data_dir, name, **kw):
  base = dict(dataset=name, split='train', data_dir=data_dir,
              global_batch_size=4, flip=True, crop=(6, 6), seed=11,
              sampling='class_balanced', sub_epoch_draws=10)
  base.update(kw)
  return loaders.PipelineSpec(**base)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_loader_state_resumes_the_class_balanced_stream(rare_folder):
  """A fresh loader given the iterator state after 3 batches reads the
  batches that followed them (across sub-epoch boundaries)."""
  data_dir, name = rare_folder
  spec = _balanced_spec(data_dir, name)
  first = iter(loaders.train_loader(spec))
  _take(first, 3)
  state = first.get_state()
  expected = _take(first, 5)
  resumed = iter(loaders.train_loader(spec))
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 5)):
    for key in ('image_id', 'image', 'label'):
      assert np.array_equal(want[key], got[key])


def test_processes_read_slices_of_the_one_process_batches(rare_folder):
  """Two processes' local batches side by side are one process's global
  batches: records, and every record's random transform."""
  data_dir, name = rare_folder
  spec = _balanced_spec(data_dir, name)
  one = _take(iter(loaders.train_loader(spec, process_index=0,
                                        process_count=1)), 6)
  parts = [_take(iter(loaders.train_loader(spec, process_index=p,
                                           process_count=2)), 6)
           for p in range(2)]
  for n, batch in enumerate(one):
    for key in ('image_id', 'image', 'label'):
      side_by_side = np.concatenate([part[n][key] for part in parts])
      assert np.array_equal(side_by_side, batch[key]), (n, key)


def test_the_loader_reads_the_records_of_its_stream_positions(rare_folder):
  """`stream_positions` are the positions the loader's batches hold: their
  records are the sampler's at those positions."""
  data_dir, name = rare_folder
  from spcl_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.open_source(name, 'train', data_dir)
  spec = _balanced_spec(data_dir, name)
  sampler = loaders.record_sampler(spec, source)
  positions = loaders.stream_positions(4, 4, worker_count=0)
  batches = _take(iter(loaders.train_loader(spec)), 4)
  for batch, row in zip(batches, positions):
    assert [str(i) for i in batch['image_id']] == [
        source[int(k)]['image_id'].decode()
        for k in sampler.record_keys(row)]


class _Positions:
  def __getitem__(self, j):
    return grain.RecordMetadata(index=j, record_key=j)


@pytest.mark.parametrize('workers,processes', [(0, 1), (3, 1), (2, 2),
                                               (3, 4)])
def test_stream_positions_are_the_process_slices_side_by_side(workers,
                                                              processes):
  global_batch = 8
  local = global_batch // processes
  slices = [loaders.ProcessSliceSampler(
      _Positions(), local_batch_size=local, process_index=p,
      process_count=processes, worker_count=workers) for p in range(processes)]
  expected = loaders.stream_positions(7, global_batch, workers)
  w = max(workers, 1)
  for n in range(7):   # loader batch n = k W + w of every process
    k, worker = divmod(n, w)
    read = []
    for part in slices:
      # the loader's batch n is worker `worker`'s k-th local batch
      read += [part[worker + w * (k * local + i)].index
               for i in range(local)]
    assert read == list(expected[n]), n
