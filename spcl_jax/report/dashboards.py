"""What a training stage's evaluations show in DIR/tensorboard, besides
`<stage>/eval_miou`:

  <stage>/iou/<class name>   the per-class IoU (percent) of the split, one
                             scalar per class of the evaluated set (a class
                             absent from the split and never predicted has
                             no IoU and no point)
  <stage>/<val_split>        `evaluation.dashboard_images` images of the
                             split (0: none), one picture each laid out
                             input | prediction | ground truth, at
                             `data.eval_size`, in the Cityscapes palette
                             (spcl_jax.visualize; ignored pixels black)

The images are the same at every evaluation of every stage: records evenly
spaced over the split (`image_indices`). The prediction is the evaluation's
own (the argmax of the logits upsampled to the shown size); the ground truth
is the stored label, in the model's label space, resized (nearest) to it.
"""

import math
from typing import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.core import pass_steps
from spcl_jax.data import global_batches
from spcl_jax.data import sources
from spcl_jax.data import transforms
from spcl_jax.report import visualize


def image_indices(num_records: int, count: int) -> list[int]:
  """`count` record indices (all if fewer) evenly spaced over a split of
  `num_records`, first and last included."""
  count = max(0, min(count, num_records))
  if count == 0:
    return []
  return sorted({int(i) for i in np.linspace(0, num_records - 1, count)
                 .round()})


def class_colors(classes, label_space: str) -> np.ndarray:
  """uint8 [H, W, 3] palette colours of a map of class indices of
  `label_space` (255 and anything outside the space: ignored, black)."""
  return visualize.colorize(label_table.classes_to_trainids(classes,
                                                            label_space))


def compose(image, predicted, label, label_space: str) -> np.ndarray:
  """uint8 [H, 3W, 3]: `image` | colours of `predicted` | colours of
  `label` (class index maps of `label_space`, all [H, W])."""
  image = np.asarray(image, np.uint8)
  if not (image.shape[:2] == np.shape(predicted) == np.shape(label)):
    raise ValueError(f'image {image.shape}, prediction '
                     f'{np.shape(predicted)} and label {np.shape(label)} '
                     'differ in size')
  return np.concatenate([image, class_colors(predicted, label_space),
                         class_colors(label, label_space)], axis=1)


def iou_scalars(stage: str, result: dict) -> dict:
  """{'<stage>/iou/<class>': IoU in percent} of an evaluation's result
  (classes without an IoU are left out)."""
  return {f'{stage}/iou/{name}': value
          for name, value in result['per_class_iou'].items()
          if value is not None and math.isfinite(value)}


class Dashboard:
  """The fixed validation images of a training stage and what its model
  makes of them. Every process builds the same images and takes part in
  the prediction (a collective); the caller's writer decides who writes.
  `compile_step` wraps the jitted prediction step (a training stage's: its
  first call compiles where SIGTERM is heard)."""

  def __init__(self, config, data_dir: str, mesh: jax.sharding.Mesh, model,
               stage: str, source=None,
               compile_step: Callable = lambda jitted: jitted):
    data = config.data
    self.stage, self.label_space = stage, data.label_space
    self.key = f'{stage}/{data.val_split}'
    self.mesh, self.size = mesh, tuple(data.eval_size)
    source = source if source is not None else sources.open_source(
        data.target, data.val_split, data_dir)
    check = transforms.CheckRecord(config.model.num_classes, data.label_space)
    resize = transforms.Resize(self.size, True, data.image_interpolation)
    normalize = transforms.Normalize(tuple(data.mean), tuple(data.std))
    shown, inputs = [], []
    for index in image_indices(len(source),
                               config.evaluation.dashboard_images):
      element = resize.map(check.map(source[index]))
      shown.append((element['image'], element['label']))
      inputs.append(normalize.map(element)['image'])
    self.shown = shown
    if not shown:
      return
    # padded to a multiple of the devices; each process feeds its share
    devices, processes = jax.device_count(), jax.process_count()
    total = -(-len(inputs) // devices) * devices
    batch = np.zeros((total, *inputs[0].shape), np.float32)
    batch[:len(inputs)] = inputs
    local = total // processes
    self.local = batch[jax.process_index() * local:][:local]
    self.step = compile_step(jax.jit(pass_steps.make_predict_step(model),
                                     static_argnums=2))

  def images(self, variables) -> np.ndarray | None:
    """uint8 [N, H, 3W, 3] of the current `variables`; None without
    images. Every process must call it."""
    if not self.shown:
      return None
    images = global_batches.to_global({'image': self.local}, self.mesh, ('image',))
    classes = self.step(variables, images['image'], self.size)
    classes = (multihost_utils.process_allgather(classes, tiled=True)
               if jax.process_count() > 1 else np.asarray(classes))
    return np.stack([compose(image, predicted, label, self.label_space)
                     for (image, label), predicted in zip(self.shown,
                                                          classes)])

  def write(self, writer, step: int, variables, result: dict) -> None:
    """The evaluation `result` at `step`: per-class IoU scalars and the
    images of `variables`."""
    writer.write_scalars(step, iou_scalars(self.stage, result))
    images = self.images(variables)
    if images is not None:
      writer.write_images(step, {self.key: images})
