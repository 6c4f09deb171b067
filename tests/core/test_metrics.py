"""Metrics against numpy, cityscapesscripts and hand-computed values."""

import jax
import numpy as np
import pytest
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
from PIL import Image

from spcl_jax.core import labels as label_table
from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import metrics

RNG = np.random.RandomState(0)


def np_confusion(labels, predictions, c):
  matrix = np.zeros((c, c), np.int64)
  for y, p in zip(labels.ravel(), predictions.ravel()):
    if 0 <= y < c and 0 <= p < c:
      matrix[y, p] += 1
  return matrix


def test_confusion_matrix_matches_numpy_and_ignores_out_of_range():
  labels = RNG.randint(0, 6, (3, 17, 19))
  labels[RNG.rand(*labels.shape) < 0.2] = 255
  labels[0, 0, :2] = [6, 200]  # out of range: ignored
  predictions = RNG.randint(0, 6, labels.shape)
  ours = metrics.confusion_matrix(labels, predictions, 6)
  np.testing.assert_array_equal(ours, np_confusion(labels, predictions, 6))


def test_confusion_matrix_sharded_over_8_devices_equals_single():
  labels = RNG.randint(0, 19, (8, 24, 20))
  labels[RNG.rand(*labels.shape) < 0.1] = 255
  predictions = RNG.randint(0, 19, labels.shape)
  single = jax.jit(metrics.confusion_matrix, static_argnums=2)(
      labels, predictions, 19)
  batch = mesh_lib.batch_sharding(mesh_lib.make_mesh())
  sharded = jax.jit(metrics.confusion_matrix, static_argnums=2)(
      jax.device_put(labels, batch), jax.device_put(predictions, batch), 19)
  np.testing.assert_array_equal(sharded, single)


def test_iou_hand_computed():
  confusion = np.array([[3, 1, 0],
                        [2, 4, 0],
                        [0, 0, 0]])
  iou = metrics.iou_from_confusion(confusion)
  np.testing.assert_allclose(iou[:2], [3 / 6, 4 / 7])
  assert np.isnan(iou[2])  # neither labelled nor predicted
  assert metrics.mean_iou(iou, [0, 1, 2]) == pytest.approx(
      100 * (3 / 6 + 4 / 7) / 2)


def test_miou_agrees_with_cityscapesscripts(tmp_path):
  args = cs_eval.args
  args.evalInstLevelScore = False
  args.quiet = True
  confusion_cs = cs_eval.generateMatrix(args)
  ours = np.zeros((19, 19), np.int64)
  for i in range(3):
    # ground truth in Cityscapes label ids (ignored ids included),
    # predictions as trainIds written back as label ids
    gt_ids = RNG.randint(0, 34, (40, 60)).astype(np.uint8)
    gt_ids[:5] = 26  # a big car region so classes differ in frequency
    pred_train = RNG.randint(0, 19, (40, 60))
    pred_train[RNG.rand(40, 60) < 0.5] = 13
    gt_path, pred_path = tmp_path / f'gt{i}.png', tmp_path / f'pred{i}.png'
    Image.fromarray(gt_ids).save(gt_path)
    Image.fromarray(label_table.TRAINID_TO_ID[pred_train]).save(pred_path)
    cs_eval.evaluatePair(str(pred_path), str(gt_path), confusion_cs, {}, {},
                         args)
    ours += np.asarray(metrics.confusion_matrix(
        label_table.ID_TO_TRAINID[gt_ids], pred_train, 19))
  cs_scores = {label_id: cs_eval.getIouScoreForLabel(label_id, confusion_cs,
                                                     args)
               for label_id in label_table.TRAINID_TO_ID}
  iou = metrics.iou_from_confusion(ours)
  for train_id, label_id in enumerate(label_table.TRAINID_TO_ID):
    assert iou[train_id] == pytest.approx(cs_scores[label_id], abs=1e-6)
  summary = metrics.summarize(ours, 19)
  assert summary['miou'] / 100 == pytest.approx(
      cs_eval.getScoreAverage(cs_scores, args), abs=1e-6)


def test_summary_class_sets_and_tail():
  confusion = np.diag(np.arange(1, 20)).astype(np.int64)
  confusion[0, 1] = 10  # road partly predicted as sidewalk
  summary = metrics.summarize(confusion, 13)
  assert set(summary['per_class_iou']) == {
      label_table.CLASS_NAMES[c] for c in label_table.CLASS_SETS[13]}
  assert 'wall' not in summary['per_class_iou']
  iou = metrics.iou_from_confusion(confusion)
  expected = np.mean(iou[list(label_table.CLASS_SETS[13])]) * 100
  assert summary['miou'] == pytest.approx(expected)
  tail13 = [c for c in label_table.TAIL_CLASSES
            if c in label_table.CLASS_SETS[13]]
  assert summary['tail_miou'] == pytest.approx(np.mean(iou[tail13]) * 100)
  with pytest.raises(ValueError, match='class set 20'):
    metrics.summarize(confusion, 20)


def test_class_center_distance_matches_numpy():
  c, n = 4, 5
  features = RNG.randn(2, 6, 7, n).astype(np.float32)
  labels = RNG.randint(0, c, (2, 6, 7))
  labels[0, 0] = 255
  prototypes = RNG.randn(c, n).astype(np.float32) * 0.3
  sums = np.zeros(c)
  counts = np.zeros(c)
  for half in (slice(0, 1), slice(1, 2)):  # mergeable by addition
    s, k = metrics.class_distance_sums(features[half], labels[half],
                                       prototypes)
    sums += np.asarray(s)
    counts += np.asarray(k)
  ours = metrics.class_center_distance(sums, counts, prototypes)
  f = features / np.linalg.norm(features, axis=-1, keepdims=True)
  for k in range(c):
    intra = np.mean(np.sum((f[labels == k] - prototypes[k]) ** 2, -1))
    expected = np.mean([intra / np.sum((prototypes[k] - prototypes[j]) ** 2)
                        for j in range(c) if j != k])
    assert ours[k] == pytest.approx(expected, rel=1e-5)


def test_pseudo_label_quality_by_hand():
  # rows = stored label, columns = pseudo label (ignored pseudo not counted)
  agreement = np.zeros((19, 19), np.int64)
  agreement[0, 0], agreement[0, 1] = 80, 20   # road: 80 right, 20 as sidewalk
  agreement[1, 1] = 30                         # sidewalk: 30 right
  truth_pixels = np.zeros(19, np.int64)
  truth_pixels[0], truth_pixels[1] = 200, 60   # half of each left unlabelled
  q = metrics.pseudo_label_quality(agreement, truth_pixels)
  assert q['pseudo_label_precision']['road'] == pytest.approx(100.0)
  assert q['pseudo_label_precision']['sidewalk'] == pytest.approx(60.0)
  assert q['pseudo_label_class_coverage']['road'] == pytest.approx(50.0)
  assert q['pseudo_label_class_coverage']['sidewalk'] == pytest.approx(50.0)
  assert q['pseudo_label_recall']['road'] == pytest.approx(40.0)
  assert q['pseudo_label_recall']['sidewalk'] == pytest.approx(50.0)
  assert q['pseudo_label_precision']['car'] is None
  assert q['pseudo_label_pixel_precision'] == pytest.approx(100 * 110 / 130)


def test_synthia_protocol_16_classes_and_13_subset_by_hand():
  """The released SYNTHIA protocol: a 16 x 16 confusion over SYNTHIA's
  classes (terrain, truck, train absent); the 13-class mIoU is its subset
  without wall, fence and pole."""
  confusion = np.diag(np.full(16, 10)).astype(np.int64)
  confusion[3, 3], confusion[3, 2] = 5, 5   # wall: half predicted building
  confusion[9, 9], confusion[9, 0] = 6, 4   # sky: 4 predicted road
  # IoU: wall 5/10, building 10/15, sky 6/10, road 10/14, 12 others 1
  hand16 = (12 + 5 / 10 + 10 / 15 + 6 / 10 + 10 / 14) / 16 * 100
  hand13 = (10 + 10 / 15 + 6 / 10 + 10 / 14) / 13 * 100  # no wall/fence/pole
  s16 = metrics.summarize(confusion, 16, 'synthia16')
  s13 = metrics.summarize(confusion, 13, 'synthia16')
  assert s16['miou'] == pytest.approx(hand16)
  assert s13['miou'] == pytest.approx(hand13)
  assert s16['per_class_iou']['sky'] == pytest.approx(60.0)
  assert s16['per_class_iou']['wall'] == pytest.approx(50.0)
  assert not {'terrain', 'truck', 'train'} & set(s16['per_class_iou'])
  assert not {'wall', 'fence', 'pole'} & set(s13['per_class_iou'])
  assert len(s13['per_class_iou']) == 13
  with pytest.raises(ValueError, match='16 classes of label space'):
    metrics.summarize(np.eye(19), 16, 'synthia16')
  with pytest.raises(ValueError, match=r"outside the label space 'synthia16'"
                     r".*'terrain', 'truck', 'train'"):
    metrics.summarize(confusion, 19, 'synthia16')
