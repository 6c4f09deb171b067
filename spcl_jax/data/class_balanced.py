"""The released code's class-balanced source sampling (GTA5, SYNTHIA), as a
grain sampler whose record at stream position j is a pure function of
(seed, j).

The rule (`core/datasets/gta5.py`, `synthia.py` of BinhuiXie/SPCL): the
stream is made in sub-epochs of `sub_epoch_draws` draws. Each draw

1. picks a class c with probability proportional to
   1 / log(log_offset + share_c), share_c being c's share of the class
   occurrences among the files drawn so far in this sub-epoch (all shares 0
   at its start: every class equally likely);
2. takes the next file of c's list; a list that is used up is reshuffled
   and read again from its index `n % (n - 1)` (n files: 1 for n >= 3,
   the release's index arithmetic);
3. adds one occurrence for every class the file contains.

The class lists and their read positions carry over from one sub-epoch to
the next, as in the release; the shares start again from 0.

Where we differ, and why:
* Randomness: the release draws from numpy's global generator. Here each
  sub-epoch has its own `np.random.Generator`, seeded from (seed, sub-epoch
  index), and the first order of the class lists comes from one seeded
  permutation of all records restricted to each class (the release's
  first order is its index file's, `os.listdir`'s order of the labels).
* Order of reading: the release reads its whole list through a shuffling
  loader (`shuffle=True` / `DistributedSampler`). Our stream has no end, so
  each sub-epoch's draws are read in a seeded random order of their own.
* Degenerate classes: a class no record contains is never drawn (the
  release fails with an IndexError on it); a class of one record gives
  that record again (the release fails dividing by zero).

The sub-epochs depend on each other (the carried lists), so reaching
sub-epoch e computes those before it (about 5 ms per 1000 draws: a second
for a 40k-step GTA5 stage), once per process and worker; the sampler
keeps the last few and the state after the newest. A position is thus
still a pure function of (seed, j): a run resumed from grain's iterator
state (a position) reads what the uninterrupted run read, and
`loaders.ProcessSliceSampler` gives every process its slice of the same
global batches.
"""

import bisect
import collections
import dataclasses
import hashlib
import itertools
import math
import sys
import threading

import grain
import numpy as np

# Tags of the seed sequences (seed, tag[, sub-epoch]).
_FIRST_ORDER_TAG = 0
_SUB_EPOCH_TAG = 1
# Sub-epoch lists kept (a loader reads ahead across at most a couple of
# sub-epoch boundaries; an older one is computed again from the start).
_KEPT_SUB_EPOCHS = 4


@dataclasses.dataclass(frozen=True)
class BalancingRule:
  """The release's numbers (`data.source_sampling_sub_epoch`,
  `data.source_sampling_log_offset`)."""
  sub_epoch_draws: int = 3000
  log_offset: float = 1.01


@dataclasses.dataclass(frozen=True)
class ClassLists:
  """What carries from one sub-epoch to the next: every class's records in
  their current order, and the index of the next one to take."""
  orders: tuple
  next_index: tuple


def restart_index(size: int) -> int:
  """Where the release reads a reshuffled list of `size` files from:
  `ind % (len - 1)` with `ind == len`; 0 for a single file."""
  return size % (size - 1) if size > 1 else 0


def class_weights(counts, total: float, log_offset: float) -> list:
  """1 / log(log_offset + share) of each class (shares 0 when nothing has
  been counted yet)."""
  if not total:
    return [1.0 / math.log(log_offset)] * len(counts)
  return [1.0 / math.log(log_offset + n / total) for n in counts]


def first_lists(files_of_class, num_records: int, seed: int) -> ClassLists:
  """Each class's records in one seeded order of all records (restricted
  to the class), read from the start."""
  rng = np.random.default_rng([seed, _FIRST_ORDER_TAG])
  rank = np.empty(num_records, np.int64)
  rank[rng.permutation(num_records)] = np.arange(num_records)
  orders = tuple(files[np.argsort(rank[files], kind='stable')]
                 for files in files_of_class)
  return ClassLists(orders, (0,) * len(orders))


def draw_sub_epoch(lists: ClassLists, classes_of_record, drawable,
                   rng: np.random.Generator,
                   rule: BalancingRule) -> tuple:
  """(record keys of one sub-epoch in reading order, the lists after it).
  `classes_of_record[k]`: the classes record k contains; `drawable`: the
  classes with at least one record, in order."""
  orders, next_index = list(lists.orders), list(lists.next_index)
  counts = [0.0] * len(orders)
  total = 0.0
  keys = []
  for u in rng.random(rule.sub_epoch_draws):
    weights = class_weights([counts[c] for c in drawable], total,
                            rule.log_offset)
    cumulative = list(itertools.accumulate(weights))
    pick = bisect.bisect_right(cumulative, u * cumulative[-1])
    c = drawable[min(pick, len(drawable) - 1)]
    if next_index[c] >= len(orders[c]):
      orders[c] = rng.permutation(orders[c])
      next_index[c] = restart_index(len(orders[c]))
    key = int(orders[c][next_index[c]])
    next_index[c] += 1
    keys.append(key)
    for k in classes_of_record[key]:
      counts[k] += 1
    total += len(classes_of_record[key])
  keys = np.asarray(keys, np.int64)[rng.permutation(rule.sub_epoch_draws)]
  return keys, ClassLists(tuple(orders), tuple(next_index))


def presence_digest(presence: np.ndarray) -> str:
  """A short digest of a presence matrix (part of the sampler's repr, which
  grain's iterator state records)."""
  digest = hashlib.sha256(np.asarray(presence.shape, np.int64).tobytes())
  digest.update(np.packbits(presence.astype(bool)).tobytes())
  return digest.hexdigest()[:16]


class ClassBalancedSampler:
  """An endless grain sampler of the release's class-balanced rule over a
  split whose records contain the classes `presence` says (bool
  [records, C]). Each record's `rng` is the one `grain.samplers.
  IndexSampler` gives the same position (Philox keyed by seed + j)."""

  def __init__(self, presence: np.ndarray, seed: int,
               rule: BalancingRule = BalancingRule()):
    presence = np.asarray(presence, bool)
    if presence.ndim != 2:
      raise ValueError(f'presence must be [records, classes], got shape '
                       f'{presence.shape}')
    self._num_records, num_classes = presence.shape
    self._seed = int(seed)
    self._rule = rule
    self._digest = presence_digest(presence)
    self._files_of_class = tuple(np.flatnonzero(presence[:, c])
                                 for c in range(num_classes))
    self._drawable = tuple(c for c, files in enumerate(self._files_of_class)
                           if len(files))
    if not self._drawable:
      raise ValueError('class-balanced sampling needs a record that contains '
                       'a class; no record contains any')
    self._classes_of_record = tuple(tuple(int(c) for c in np.flatnonzero(row))
                                    for row in presence)
    self._reset_cache()

  def _reset_cache(self) -> None:
    self._lock = threading.Lock()
    self._kept = collections.OrderedDict()   # sub-epoch -> keys
    self._next_sub_epoch = 0
    self._lists = None   # the class lists at the start of _next_sub_epoch

  def __getstate__(self):   # grain's workers get a copy without the cache
    state = self.__dict__.copy()
    for name in ('_lock', '_kept', '_next_sub_epoch', '_lists'):
      del state[name]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset_cache()

  def __len__(self) -> int:
    return sys.maxsize   # endless, as IndexSampler with num_epochs=None

  def __repr__(self) -> str:   # stored in grain's iterator state
    return (f'ClassBalancedSampler(records={self._num_records}, presence='
            f'{self._digest}, seed={self._seed}, sub_epoch_draws='
            f'{self._rule.sub_epoch_draws}, log_offset='
            f'{self._rule.log_offset!r})')

  def sub_epoch(self, index: int) -> np.ndarray:
    """The record keys of sub-epoch `index`, in reading order."""
    with self._lock:
      if index in self._kept:
        return self._kept[index]
      if index < self._next_sub_epoch:   # older than those kept: start over
        self._next_sub_epoch, self._lists = 0, None
      if self._lists is None:
        self._lists = first_lists(self._files_of_class, self._num_records,
                                  self._seed)
      while self._next_sub_epoch <= index:
        rng = np.random.default_rng(
            [self._seed, _SUB_EPOCH_TAG, self._next_sub_epoch])
        keys, self._lists = draw_sub_epoch(
            self._lists, self._classes_of_record, self._drawable, rng,
            self._rule)
        self._kept[self._next_sub_epoch] = keys
        self._next_sub_epoch += 1
        while len(self._kept) > _KEPT_SUB_EPOCHS:
          self._kept.popitem(last=False)
      return self._kept[index]

  def record_key(self, position: int) -> int:
    sub_epoch, offset = divmod(position, self._rule.sub_epoch_draws)
    return int(self.sub_epoch(sub_epoch)[offset])

  def record_keys(self, positions) -> np.ndarray:
    """The record keys of stream positions `positions` (any order)."""
    positions = np.asarray(positions, np.int64)
    keys = np.empty(positions.shape, np.int64)
    sub_epochs, offsets = np.divmod(positions, self._rule.sub_epoch_draws)
    for sub_epoch in np.unique(sub_epochs):   # ascending: no recomputing
      where = sub_epochs == sub_epoch
      keys[where] = self.sub_epoch(int(sub_epoch))[offsets[where]]
    return keys

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0:
      raise IndexError(f'stream position {index} < 0')
    return grain.RecordMetadata(
        index=index, record_key=self.record_key(index),
        rng=np.random.Generator(np.random.Philox(key=self._seed + index)))
