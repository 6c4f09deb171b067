"""The one label table: Cityscapes trainIds, palette, class sets, and the
source datasets' id mappings. Built from `cityscapesscripts`' own table."""

import functools

import numpy as np
from cityscapesscripts.helpers import labels as cs_labels

IGNORE_LABEL = 255
NUM_CLASSES = 19

_TRAIN = sorted((l for l in cs_labels.labels if 0 <= l.trainId < NUM_CLASSES),
                key=lambda l: l.trainId)
assert [l.trainId for l in _TRAIN] == list(range(NUM_CLASSES))

# Class names in trainId order ('road', 'sidewalk', ..., 'bicycle').
CLASS_NAMES = tuple(l.name for l in _TRAIN)
# Cityscapes label id of each trainId.
TRAINID_TO_ID = np.array([l.id for l in _TRAIN], np.uint8)
# [19, 3] uint8 colours of the trainIds.
PALETTE = np.array([l.color for l in _TRAIN], np.uint8)
# The Cityscapes label id of the ignore trainId ('unlabeled').
UNLABELED_ID = next(l.id for l in cs_labels.labels if l.name == 'unlabeled')


def trainids_to_label_ids(trainids) -> np.ndarray:
  """uint8 Cityscapes label ids (what the Cityscapes test server takes) of a
  trainId map; the ignore trainId 255 becomes 'unlabeled'. Values that are
  neither a trainId nor 255 are an error."""
  trainids = np.asarray(trainids)
  bad = np.setdiff1d(np.unique(trainids), [*range(NUM_CLASSES), IGNORE_LABEL])
  if bad.size:
    raise ValueError(f'not trainIds: {bad.tolist()} (expected 0..'
                     f'{NUM_CLASSES - 1} or {IGNORE_LABEL})')
  lut = np.full(256, UNLABELED_ID, np.uint8)
  lut[:NUM_CLASSES] = TRAINID_TO_ID
  return lut[trainids.astype(np.uint8)]


def _id_to_trainid() -> np.ndarray:
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  for label in cs_labels.labels:
    if 0 <= label.id < 256 and 0 <= label.trainId < NUM_CLASSES:
      lut[label.id] = label.trainId
  return lut


# Lookup table: Cityscapes / GTA5 / Synscapes label id (0..255) -> trainId.
ID_TO_TRAINID = _id_to_trainid()
# The same as a mapping of the ids that have a trainId, and every id the
# Cityscapes table defines (ids outside it are reported by the builders).
CITYSCAPES_ID_TO_TRAINID = {int(i): int(t) for i, t in enumerate(ID_TO_TRAINID)
                            if t != IGNORE_LABEL}
CITYSCAPES_IDS = frozenset(l.id for l in cs_labels.labels if l.id >= 0)

# SYNTHIA-RAND-CITYSCAPES raw class id -> trainId (its 16 classes).
SYNTHIA_ID_TO_TRAINID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7,
                         6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17,
                         11: 18}
# SYNTHIA's class ids: 0 void ... 22 lane marking.
SYNTHIA_IDS = frozenset(range(23))


def _names_to_ids(names):
  return tuple(CLASS_NAMES.index(n) for n in names)


# Evaluated class sets (trainIds), keyed by their size.
CLASS_SETS = {
    19: tuple(range(NUM_CLASSES)),
    16: tuple(sorted(SYNTHIA_ID_TO_TRAINID.values())),
    13: tuple(sorted(set(SYNTHIA_ID_TO_TRAINID.values())
                     - set(_names_to_ids(('wall', 'fence', 'pole'))))),
}

# Classes with < 1 % of Cityscapes val pixels (paper, appendix B).
TAIL_CLASSES = _names_to_ids((
    'wall', 'fence', 'traffic light', 'traffic sign', 'terrain', 'rider',
    'truck', 'bus', 'train', 'motorcycle', 'bicycle'))


def check_class_set(size: int) -> tuple:
  if size not in CLASS_SETS:
    raise ValueError(f'unknown evaluation class set {size!r}; expected one '
                     f'of {sorted(CLASS_SETS)}')
  return CLASS_SETS[size]


# Label spaces: the classes a model predicts, as trainIds in output order
# (`data.label_space`). 'synthia16' is the released SYNTHIA protocol: a
# 16-way head; Cityscapes pixels of terrain, truck and train are ignored.
LABEL_SPACES = {
    'cityscapes19': CLASS_SETS[19],
    'synthia16': CLASS_SETS[16],
}


def check_label_space(name: str) -> tuple:
  if name not in LABEL_SPACES:
    raise ValueError(f'unknown label space {name!r}; expected one of '
                     f'{sorted(LABEL_SPACES)}')
  return LABEL_SPACES[name]


@functools.lru_cache(maxsize=None)
def trainid_lut(name: str) -> np.ndarray:
  """uint8 [256] lookup table: stored trainId -> class index of the label
  space `name`; trainIds outside the space -> 255; values >= 19 unchanged
  (still reported as invalid by the input pipeline)."""
  lut = np.arange(256, dtype=np.uint8)
  lut[:NUM_CLASSES] = IGNORE_LABEL
  for index, train_id in enumerate(check_label_space(name)):
    lut[train_id] = index
  lut.flags.writeable = False  # shared by every caller (cached)
  return lut


def space_to_trainids(name: str) -> np.ndarray:
  """uint8 [C]: the trainId of each class index of the label space `name`
  (index a model's argmax with it to get a trainId map)."""
  return np.array(check_label_space(name), np.uint8)


def classes_to_trainids(classes, name: str) -> np.ndarray:
  """uint8 trainId map of a map of class indices of the label space `name`
  (255, and any value outside the space, stays ignored: 255)."""
  lut = np.full(256, IGNORE_LABEL, np.uint8)
  trainids = space_to_trainids(name)
  lut[:len(trainids)] = trainids
  return lut[np.asarray(classes).astype(np.uint8)]


def class_names(name: str) -> tuple:
  """Class names of the label space `name`, in output order."""
  return tuple(CLASS_NAMES[t] for t in check_label_space(name))


def class_set_indices(size: int, name: str) -> tuple:
  """Class indices of the label space `name` of the evaluated set `size`
  (a set with classes outside the space is an error)."""
  space = check_label_space(name)
  missing = [CLASS_NAMES[t] for t in check_class_set(size) if t not in space]
  if missing:
    raise ValueError(f'class set {size} has classes outside the label space '
                     f'{name!r}: {missing}')
  return tuple(space.index(t) for t in check_class_set(size))


def tail_indices(name: str) -> tuple:
  """Indices of the label space `name` of the tail classes."""
  space = check_label_space(name)
  return tuple(space.index(t) for t in TAIL_CLASSES if t in space)
