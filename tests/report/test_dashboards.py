"""The dashboards of a training stage's evaluations: the composed
input | prediction | ground-truth picture (label space -> palette), the
fixed choice of images, what reaches the TensorBoard event files, and the
dashboards of the shared smoke run."""

import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from spcl_jax.core import labels as label_table
from spcl_jax.core import mesh as mesh_lib
from spcl_jax.data import resize
from spcl_jax.data import sources
from spcl_jax.report import dashboards
from spcl_jax.report import visualize
from spcl_jax.run import config_checks

PALETTE = {tuple(c) for c in label_table.PALETTE}
BLACK = tuple(visualize.IGNORE_COLOR)


def read_events(directory) -> dict:
  """{tag: {step: value}} of every scalar and image summary in the event
  files under `directory` (images: a list of uint8 [H, W, 3] arrays)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = {}
  for root, _, names in os.walk(directory):
    for name in names:
      if 'tfevents' not in name:
        continue
      accumulator = event_accumulator.EventAccumulator(
          os.path.join(root, name), size_guidance={'tensors': 0})
      accumulator.Reload()
      for tag in accumulator.Tags()['tensors']:
        for event in accumulator.Tensors(tag):
          value = tf.make_ndarray(event.tensor_proto)
          metadata = accumulator.SummaryMetadata(tag)
          if metadata.plugin_data.plugin_name == 'images':
            value = [np.asarray(Image.open(io.BytesIO(png)))
                     for png in value[2:]]   # [width, height, png...]
          events.setdefault(tag, {})[event.step] = value
  return events


def test_image_indices_are_fixed_and_spread_over_the_split():
  assert dashboards.image_indices(16, 4) == [0, 5, 10, 15]
  assert dashboards.image_indices(16, 4) == dashboards.image_indices(16, 4)
  assert dashboards.image_indices(3, 4) == [0, 1, 2]
  assert dashboards.image_indices(1, 1) == [0]
  assert dashboards.image_indices(10, 0) == []


def test_compose_colours_classes_of_the_label_space_not_trainids():
  # synthia16: class index i is trainId space[i] (index 9 is 'sky', trainId
  # 10; trainIds 9, 14 and 16 are not in the space)
  space = label_table.LABEL_SPACES['synthia16']
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  predicted = np.array([[0, 9, 15], [3, 9, 1]], np.uint8)
  label = np.array([[9, 255, 15], [0, 0, 1]], np.uint8)
  picture = dashboards.compose(image, predicted, label, 'synthia16')
  assert picture.shape == (2, 9, 3) and picture.dtype == np.uint8
  np.testing.assert_array_equal(picture[:, :3], image)
  np.testing.assert_array_equal(
      picture[:, 3:6], label_table.PALETTE[np.array(space)[predicted]])
  assert tuple(picture[0, 4]) == tuple(label_table.PALETTE[10])   # sky
  assert tuple(picture[0, 6]) == tuple(label_table.PALETTE[10])
  assert tuple(picture[0, 7]) == BLACK                            # ignored
  np.testing.assert_array_equal(picture[1, 6:], label_table.PALETTE[[0, 0, 1]])
  with pytest.raises(ValueError, match='differ in size'):
    dashboards.compose(image, predicted[:, :2], label, 'synthia16')


def test_iou_scalars_leave_out_classes_without_iou():
  result = {'per_class_iou': {'road': 50.0, 'sidewalk': float('nan'),
                              'traffic light': 0.0}}
  assert dashboards.iou_scalars('spcl', result) == {
      'spcl/iou/road': 50.0, 'spcl/iou/traffic light': 0.0}


class _RedIsCar(nn.Module):
  """Logits at the input resolution: 'car' where the normalised red channel
  is above 0 (red > 255 * mean), 'road' elsewhere."""
  num_classes: int = 16

  @nn.compact
  def __call__(self, x, train=False):
    car = label_table.LABEL_SPACES['synthia16'].index(13)
    classes = jnp.where(x[..., 0] > 0, car, 0)
    return {'logits': 10.0 * jax.nn.one_hot(classes, self.num_classes)}


def _records(count=5, size=(20, 30)):
  rng = np.random.default_rng(0)
  records = []
  for i in range(count):
    label = rng.choice([0, 1, 9, 10, 13, 255], size).astype(np.uint8)
    records.append({'image': rng.integers(0, 256, (*size, 3), np.uint8),
                    'label': label[..., None], 'image_id': f'val_{i}'})
  return records


def _config(label_space, num_classes, dashboard_images):
  return ml_collections.ConfigDict({
      'data': {'label_space': label_space, 'val_split': 'target_val',
               'target': 'unused', 'eval_size': (10, 16),
               'image_interpolation': 'bilinear',
               'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)},
      'model': {'num_classes': num_classes},
      'evaluation': {'dashboard_images': dashboard_images}})


def test_dashboard_writes_images_and_iou_scalars_to_tensorboard(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  config = _config('synthia16', 16, dashboard_images=3)
  records = _records()
  dashboard = dashboards.Dashboard(config, '', mesh_lib.make_mesh(),
                                   _RedIsCar(), 'spcl', source=records)
  writer = metric_writers.SummaryWriter(str(tmp_path))
  result = {'per_class_iou': {'road': 61.5, 'terrain': float('nan')}}
  for step in (4, 8):
    dashboard.write(writer, step, {}, result)
  writer.flush()
  events = read_events(tmp_path)
  assert {step: float(v) for step, v in events['spcl/iou/road'].items()} == {
      4: 61.5, 8: 61.5}
  assert 'spcl/iou/terrain' not in events
  pictures = events['spcl/target_val']
  assert sorted(pictures) == [4, 8]
  assert [p.shape for p in pictures[4]] == [(10, 48, 3)] * 3
  for index, picture in zip([0, 2, 4], pictures[4]):   # evenly spaced
    image, stored = resize.resize_pair(records[index]['image'],
                                       records[index]['label'][..., 0], (10, 16))
    np.testing.assert_array_equal(picture[:, :16], image)
    predicted = picture[:, 16:32]
    assert {tuple(c) for c in predicted.reshape(-1, 3)} <= PALETTE
    car = np.where(image[..., 0] > 255 * 0.485, 13, 0)   # trainIds
    np.testing.assert_array_equal(predicted, visualize.colorize(car))
    # trainId 9 (terrain) is outside synthia16: ignored, black like 255
    truth = np.where(stored == 9, 255, stored)
    np.testing.assert_array_equal(picture[:, 32:], visualize.colorize(truth))
  for a, b in zip(pictures[4], pictures[8]):   # the same images each time
    np.testing.assert_array_equal(a, b)


def test_no_dashboard_images_when_disabled(tmp_path):
  config = _config('cityscapes19', 19, dashboard_images=0)
  dashboard = dashboards.Dashboard(config, '', mesh_lib.make_mesh(), None,
                                   'warmup', source=_records(2))
  assert dashboard.images({}) is None


def test_negative_dashboard_images_are_refused():
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.evaluation.dashboard_images = -1
  with pytest.raises(ValueError, match=r'evaluation.dashboard_images = -1 '
                     'must be an integer >= 0'):
    config_checks.validate(config, num_devices=1)


@pytest.mark.slow
def test_smoke_run_dashboards(smoke_reference, tiny_demo):
  """Every training stage of the shared smoke run wrote its per-class IoU
  and the same 4 target_val images (input and ground truth as the records
  give them, a prediction in palette colours) at its evaluation."""
  workdir, run = smoke_reference
  assert run.returncode == 0, run.stderr[-6000:]
  report = json.loads((workdir / 'report.json').read_text())
  data = report['config']['data']
  assert report['config']['evaluation']['dashboard_images'] == 4
  events = read_events(workdir / 'tensorboard')
  source = sources.open_source(data['target'], data['val_split'], tiny_demo)
  indices = dashboards.image_indices(len(source), 4)
  height, width = data['eval_size']
  for stage in ('warmup', 'spcl', 'self_training'):
    result = report['stages'][stage]
    for name, iou in result['per_class_iou'].items():
      if np.isfinite(iou):
        assert float(events[f'{stage}/iou/{name}'][4]) == pytest.approx(
            iou, rel=1e-6)
    pictures = events[f'{stage}/{data["val_split"]}'][4]
    assert len(pictures) == len(indices) == 4
    for index, picture in zip(indices, pictures):
      assert picture.shape == (height, 3 * width, 3)
      record = source[index]
      image, stored = resize.resize_pair(np.asarray(record['image']),
                                         np.asarray(record['label']).squeeze(),
                                         (height, width))
      np.testing.assert_array_equal(picture[:, :width], image)
      predicted = picture[:, width:2 * width]
      assert {tuple(c) for c in predicted.reshape(-1, 3)} <= PALETTE
      np.testing.assert_array_equal(picture[:, 2 * width:],
                                    visualize.colorize(stored))
