r"""Segments image files with a finished training stage of a workdir.

  python -m spcl_jax.predict --workdir=DIR [--stage=NAME]
      [--checkpoint=final|best] --input=PATH_OR_GLOB --output=OUT
      [--cityscapes_ids] [--flip] [--scales=0.75,1.0,1.25]

--input is an image file, a directory (every file in it) or a glob
(quote it: 'photos/*.jpg'). Each image, of any size, is resized to the
workdir's `data.eval_size` and normalised as in evaluation; the logits are
upsampled back to the file's size. Images are batched over the devices
(`data.eval_batch_size`, images of the same size together). For every
input OUT gets
  <stem>_trainid.png   uint8 Cityscapes trainIds
  <stem>_color.png     the Cityscapes palette of those trainIds
  <stem>_overlay.png   the image blended with the colours
  <stem>_labelid.png   with --cityscapes_ids: Cityscapes label ids (what
                       the Cityscapes test server takes)
The pass over the inputs shows its progress (a bar on a terminal, else a
line every 30 s, and `<stage>: predict N files in ...` at the end).
A file that cannot be read as an image is named on stderr and skipped; the
others are processed and the exit status is 1 at the end. Other errors (no
such stage: the stages that exist are listed; an output directory that
cannot be written; two inputs with the same stem) stop the command with
status 1 before any compute.
"""

import glob
import os
import sys

# First: TensorFlow's native log level must be set before it is imported.
from spcl_jax.infra import console  # pylint: disable=g-bad-import-order
console.quiet_native_logs(sys.argv)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
import jax
import ml_collections
import numpy as np
from PIL import Image

from spcl_jax.core import labels as label_table
from spcl_jax.core import pass_steps
from spcl_jax.data import global_batches
from spcl_jax.data import transforms
from spcl_jax.infra import storage
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.report import visualize
from spcl_jax.run import trained_model

OVERLAY_ALPHA = 0.5


def input_files(pattern: str) -> list[str]:
  """The files of `pattern`: a file, a directory's files, or a glob."""
  path = os.path.expanduser(pattern)
  if os.path.isdir(path):
    files = [os.path.join(path, name) for name in sorted(os.listdir(path))]
    files = [f for f in files if os.path.isfile(f)]
  elif os.path.isfile(path):
    files = [path]
  else:
    files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
  if not files:
    raise FileNotFoundError(f'--input {pattern!r} matches no file')
  return files


def check_unique_stems(files) -> None:
  """Outputs are named by stem: two inputs with one stem would collide."""
  by_stem = {}
  for path in files:
    by_stem.setdefault(os.path.splitext(os.path.basename(path))[0],
                       []).append(path)
  clashes = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
  if clashes:
    raise ValueError('inputs with the same name would write the same '
                     f'outputs: {clashes}')


def read_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB; OSError / ValueError if it is not an image."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except Image.DecompressionBombError as e:
    raise ValueError(str(e)) from e


def preprocess(image: np.ndarray, data: ml_collections.ConfigDict
               ) -> np.ndarray:
  """float32 [h, w, 3]: resized to `data.eval_size` and normalised, by the
  evaluation pipeline's own transforms."""
  element = {'image': image, 'label': np.zeros((0, 0), np.uint8)}
  for op in (transforms.Resize(tuple(data.eval_size), False,
                               data.image_interpolation),
             transforms.Normalize(tuple(data.mean), tuple(data.std))):
    element = op.map(element)
  return element['image']


def output_images(image: np.ndarray, classes: np.ndarray, label_space: str,
                  cityscapes_ids: bool) -> dict:
  """{file suffix: uint8 array} of one image and its class-index map."""
  trainids = label_table.classes_to_trainids(classes, label_space)
  colors = visualize.colorize(trainids)
  images = {'trainid': trainids, 'color': colors,
            'overlay': visualize.overlay(image, colors, OVERLAY_ALPHA)}
  if cityscapes_ids:
    images['labelid'] = label_table.trainids_to_label_ids(trainids)
  return images


def write_pngs(output: str, stem: str, images: dict) -> None:
  """`output`/<stem>_<suffix>.png, each written atomically."""
  for suffix, array in images.items():
    workdir_lib.write_atomically(
        os.path.join(output, f'{stem}_{suffix}.png'),
        lambda f, array=array: Image.fromarray(array).save(f, format='PNG'),
        binary=True)


class Predictor:
  """Batches images of one size over the devices and writes their outputs."""

  def __init__(self, ctx, model, variables, output, cityscapes_ids, scales,
               flip):
    self.ctx, self.variables, self.output = ctx, variables, output
    self.cityscapes_ids = cityscapes_ids
    self.batch = trained_model.batch_size(ctx.config)
    self.step = jax.jit(pass_steps.make_predict_step(model, scales, flip),
                        static_argnums=2)
    self.pending = {}   # (height, width) -> [(path, image)]
    self.written = 0

  def add(self, path: str, image: np.ndarray) -> None:
    group = self.pending.setdefault(image.shape[:2], [])
    group.append((path, image))
    if len(group) == self.batch:
      self._run(self.pending.pop(image.shape[:2]))

  def flush(self) -> None:
    for size in list(self.pending):
      self._run(self.pending.pop(size))

  def _run(self, group) -> None:
    data = self.ctx.config.data
    x = np.stack([preprocess(image, data) for _, image in group])
    x = np.concatenate([x, np.zeros((self.batch - len(x), *x.shape[1:]),
                                    x.dtype)])
    images = global_batches.to_global({'image': x}, self.ctx.mesh, ('image',))['image']
    classes = np.asarray(self.step(self.variables, images,
                                   group[0][1].shape[:2]))
    for (path, image), predicted in zip(group, classes):
      stem = os.path.splitext(os.path.basename(path))[0]
      write_pngs(self.output, stem, output_images(
          image, predicted, data.label_space, self.cityscapes_ids))
    self.written += len(group)


def predict(workdir: str, pattern: str, output: str, stage: str | None = None,
            checkpoint: str = 'final', cityscapes_ids: bool = False,
            flip: bool = False, scales=(1.0,)):
  """Segments the files of `pattern` into `output`; returns (stage, number
  of images written, [(path, reason)] of the files that could not be
  read). Every check comes before the model is loaded."""
  workdir = storage.resolve(workdir)
  config = trained_model.read_config(workdir)
  stage = trained_model.choose_stage(workdir, stage)
  scales = pass_steps.check_scales(scales)
  files = input_files(pattern)
  check_unique_stems(files)
  ctx = trained_model.context(config, workdir, checkpoint)
  trained_model.model_directory(ctx, stage)
  output = trained_model.check_output_dir(output)
  if jax.process_count() > 1:
    raise ValueError('spcl_jax.predict runs in one process (it uses every '
                     'local device)')

  model, variables = trained_model.load(ctx, stage)
  predictor = Predictor(ctx, model, variables, output, cityscapes_ids,
                        scales, flip)
  failures = []
  console.set_stage(stage)
  for index, path in enumerate(console.progress(
      files, 'predict', len(files), unit='files', items='files')):
    try:
      image = read_image(path)
    except (OSError, ValueError) as e:
      failures.append((path, f'{type(e).__name__}: {e}'))
      print(f'error: cannot read {path} as an image ({failures[-1][1]}); '
            'skipped', file=sys.stderr)
    else:
      predictor.add(path, image)
    if index == len(files) - 1:   # the last batches, timed with the pass
      predictor.flush()
  predictor.flush()
  return stage, predictor.written, failures


def _command(f) -> None:
  stage, written, failures = predict(
      f.workdir, f.input, f.output, f.stage, f.checkpoint, f.cityscapes_ids,
      f.flip, trained_model.parse_numbers(f.scales, float, 'scales'))
  print(f'{stage}: segmented {written} images into '
        f'{storage.resolve(f.output)}')
  if failures:
    print(f'error: {len(failures)} files could not be read: '
          + ', '.join(path for path, _ in failures), file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  trained_model.define_model_flags()
  flags.DEFINE_string('input', None, 'image file, directory or glob')
  flags.DEFINE_string('output', None, 'output directory')
  flags.DEFINE_bool('cityscapes_ids', False,
                    'also write <stem>_labelid.png in Cityscapes label ids')
  flags.mark_flags_as_required(['input', 'output'])
  app.run(trained_model.command_main(_command))
