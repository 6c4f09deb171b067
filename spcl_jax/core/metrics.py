"""Segmentation metrics: confusion matrices summed over a whole split, IoU,
mIoU over the 19 / 16 / 13-class sets, tail mIoU, Class Center Distance.

Agrees with cityscapesscripts' `evalPixelLevelSemanticLabeling` (IoU = TP /
(TP + FP + FN) over non-ignored ground-truth pixels, classes with an empty
denominator are NaN and left out of the mean)."""

import jax
import jax.numpy as jnp
import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.core.spcl import l2_normalize
from spcl_jax.core.spcl import valid_mask


def confusion_matrix(labels: jax.Array, predictions: jax.Array,
                     num_classes: int) -> jax.Array:
  """int32 [C, C], rows = ground truth, columns = prediction, of one batch.

  Pixels whose label (or prediction) is outside [0, C) — the ignore label 255
  included — are not counted. Jit-able; on a sharded batch it is the global
  matrix. Sum successive results (on the host in int64 for a whole split)."""
  if labels.shape != predictions.shape:
    raise ValueError(f'labels {labels.shape} and predictions '
                     f'{predictions.shape} differ in shape')
  for name, x in (('labels', labels), ('predictions', predictions)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'{name} must be integer class ids, got {x.dtype}')
  labels = labels.astype(jnp.int32)
  predictions = predictions.astype(jnp.int32)
  valid = valid_mask(labels, num_classes) & valid_mask(predictions,
                                                       num_classes)
  index = jnp.where(valid, labels * num_classes + predictions,
                    num_classes * num_classes)
  counts = jnp.bincount(index.ravel(), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def iou_from_confusion(confusion) -> np.ndarray:
  """Per-class IoU [C] (fractions) from a [C, C] confusion matrix; NaN for a
  class that is neither in the ground truth nor predicted."""
  confusion = np.asarray(confusion, np.int64)
  true_positive = np.diag(confusion)
  denominator = confusion.sum(0) + confusion.sum(1) - true_positive
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denominator > 0, true_positive / np.maximum(denominator, 1),
                    np.nan)


def mean_iou(iou: np.ndarray, classes) -> float:
  """Mean of the defined IoUs of `classes`, in percent (NaN if none)."""
  values = np.asarray(iou)[list(classes)]
  values = values[~np.isnan(values)]
  return float(values.mean() * 100) if values.size else float('nan')


def summarize(confusion, class_set: int = 19,
              label_space: str = 'cityscapes19') -> dict:
  """The report entry of an evaluation: mIoU and tail mIoU in percent over
  the class set (19, 16 or 13 classes), per-class IoU in percent by name;
  `confusion` is over the classes of `label_space` (labels.LABEL_SPACES)."""
  classes = label_table.class_set_indices(class_set, label_space)
  names = label_table.class_names(label_space)
  if np.shape(confusion) != (len(names),) * 2:
    raise ValueError(f'confusion of shape {np.shape(confusion)} for the '
                     f'{len(names)} classes of label space {label_space!r}')
  iou = iou_from_confusion(confusion)
  tail = [c for c in label_table.tail_indices(label_space) if c in classes]
  return {
      'miou': mean_iou(iou, classes),
      'tail_miou': mean_iou(iou, tail),
      'per_class_iou': {names[c]: float(iou[c] * 100) for c in classes},
      'class_set': class_set,
      'num_pixels': int(np.asarray(confusion, np.int64).sum()),
  }


def summarize_sets(confusion, class_sets,
                   label_space: str = 'cityscapes19') -> dict:
  """`summarize` over the first of `class_sets`, plus `miou_<n>` and
  `tail_miou_<n>` of each other set (the report entry of an evaluation)."""
  class_sets = list(class_sets)
  result = summarize(confusion, class_sets[0], label_space)
  for other in class_sets[1:]:
    extra = summarize(confusion, other, label_space)
    result[f'miou_{other}'] = extra['miou']
    result[f'tail_miou_{other}'] = extra['tail_miou']
  return result


def class_distance_sums(features: jax.Array, labels: jax.Array,
                        prototypes: jax.Array):
  """Mergeable sums for the Class Center Distance: per class, the sum of
  squared distances of its L2-normalised features to its prototype [C] and
  the number of its pixels [C]. features [..., N], labels [...]."""
  num_classes = prototypes.shape[0]
  if features.shape[:-1] != labels.shape:
    raise ValueError(f'features {features.shape} and labels {labels.shape} '
                     'differ in their pixel dimensions')
  f = l2_normalize(features.astype(jnp.float32)).reshape(-1, features.shape[-1])
  y = labels.reshape(-1)
  valid = valid_mask(y, num_classes)
  safe = jnp.where(valid, y, 0)
  squared = jnp.sum(jnp.square(f - prototypes[safe]), axis=-1)
  one_hot = jax.nn.one_hot(jnp.where(valid, y, -1), num_classes)
  return one_hot.T @ squared, jnp.sum(one_hot, axis=0)


def class_center_distance(squared_distance_sums, counts, prototypes,
                          classes=None) -> np.ndarray:
  """Appendix Eq. 10: CCD(c) = mean over k != c of
  (mean_{x in c} ||x - μ_c||²) / ||μ_c - μ_k||², over `classes` (default
  all); NaN for a class without pixels."""
  prototypes = np.asarray(prototypes, np.float64)
  classes = list(range(prototypes.shape[0]) if classes is None else classes)
  sums = np.asarray(squared_distance_sums, np.float64)
  counts = np.asarray(counts, np.float64)
  result = np.full(prototypes.shape[0], np.nan)
  for c in classes:
    if counts[c] == 0:
      continue
    intra = sums[c] / counts[c]
    others = [k for k in classes if k != c]
    between = np.sum((prototypes[others] - prototypes[c]) ** 2, axis=-1)
    result[c] = np.mean(intra / between)
  return result


def pseudo_label_quality(agreement, truth_pixels,
                         label_space: str = 'cityscapes19') -> dict:
  """Per-class quality of pseudo labels against the split's stored labels.

  `agreement` [C, C]: rows = stored label, columns = pseudo label, over the
  pixels that have both (an ignored pseudo label is not counted);
  `truth_pixels` [C]: stored-label pixels of each class, pseudo-labelled or
  not. Per class name, in percent (None where undefined):
    precision  correct / pixels pseudo-labelled as the class,
    coverage   pixels of the class that got any pseudo label / its pixels,
    recall     pixels of the class pseudo-labelled correctly / its pixels;
  plus the overall pixel precision of the kept pseudo labels. Classes are
  those of `label_space` (labels.LABEL_SPACES)."""
  agreement = np.asarray(agreement, np.int64)
  truth_pixels = np.asarray(truth_pixels, np.int64)
  correct = np.diag(agreement)
  labelled_as, labelled_truth = agreement.sum(0), agreement.sum(1)

  names = label_table.class_names(label_space)

  def percent(num, den):
    return {names[c]: (float(100 * num[c] / den[c]) if den[c] else None)
            for c in range(min(len(den), len(names)))}

  return {
      'pseudo_label_precision': percent(correct, labelled_as),
      'pseudo_label_class_coverage': percent(labelled_truth, truth_pixels),
      'pseudo_label_recall': percent(correct, truth_pixels),
      'pseudo_label_pixel_precision': float(
          100 * correct.sum() / max(agreement.sum(), 1)),
  }


def colour_only_miou(images, labels, levels: int = 32, seed: int = 0,
                     num_classes: int = label_table.NUM_CLASSES) -> dict:
  """How far colour alone solves a split: the majority class of each
  quantised RGB colour (`levels` per channel), fitted on a random half of
  the labelled pixels and scored on the other half. `summarize` of that
  classifier's confusion (class set 19: mean over the classes present)."""
  images = np.asarray(images).reshape(-1, 3).astype(np.int64)
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  if len(images) != len(labels):
    raise ValueError(f'{len(images)} pixels in images, {len(labels)} in '
                     'labels')
  q = images * levels // 256
  colour = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
  fit = np.random.default_rng(seed).random(len(colour)) < 0.5
  valid = labels < num_classes
  votes = np.zeros((levels ** 3, num_classes), np.int64)
  np.add.at(votes, (colour[fit & valid], labels[fit & valid]), 1)
  predicted = votes.argmax(1)[colour]
  scored = ~fit & valid
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels[scored], predicted[scored]), 1)
  return summarize(confusion, 19)
