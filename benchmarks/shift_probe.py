r"""Which part of the demo's domain shift does a trained model fail on?

Renders the scenes of `sim2real_demo`'s `target_val` split again (same
seeds, so the `base` variant is the split itself), each time with one factor
of the real-like style replaced by the synthetic one, and evaluates a
trained model on every variant:

  python -m benchmarks.shift_probe --config=configs/demo.py \
      --model_dir=WORKDIR/warmup/model [--num_images=100] [--output=P.json]

Prints, per variant, target mIoU, per-class IoU and the *sink*: the class
most often predicted on pixels of other classes, with the share of those
pixels it takes. A factor whose replacement raises mIoU a lot is one the
model cannot bridge; a sink is where self-training's confident wrong
pseudo labels come from.
"""

import json
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from data_prep import sim2real_demo
from data_prep import sim2real_render as render_lib
from spcl_jax.core import labels as label_table
from spcl_jax.core import mesh as mesh_lib
from spcl_jax.core import metrics
from spcl_jax.core import pass_steps
from spcl_jax.data import resize
from spcl_jax.data import transforms
from spcl_jax.infra import flag_errors
from spcl_jax.models import from_config
from spcl_jax.run import stage_outputs


def _define_flags():
  """Only when run as a program: `benchmarks.ablation` defines `--config`
  too, and both are imported by the tests."""
  config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                  lock_config=True)
  flags.DEFINE_string('model_dir', None, 'a finished stage\'s `model` '
                      'directory')
  flags.DEFINE_integer('num_images', 100, 'target_val scenes')
  flags.DEFINE_list('variants', None, 'variants (default: all)')
  flags.DEFINE_string('output', None, 'also write the results here')
  flags.mark_flags_as_required(['config', 'model_dir'])


# The fields of render_lib.Style that each variant takes from the synthetic
# style; everything else stays real-like.
VARIANTS = {
    'base': (),
    'lossless': ('jpeg_quality',),
    'clean_sensor': ('jpeg_quality', 'noise', 'blur'),
    'no_haze': ('haze',),
    'saturated': ('saturation',),
    'source_colour_cast': ('colour_cast',),
    'source_light': ('shadow', 'illumination', 'brightness'),
    'source_texture': ('texture',),
    'source_materials': ('materials', 'material_jitter'),
    'source_camera': ('camera',),
    'source_objects': ('car_model', 'frequencies'),
    'all_photometric': ('jpeg_quality', 'noise', 'blur', 'haze', 'saturation',
                        'colour_cast', 'shadow', 'illumination', 'brightness',
                        'texture'),
}


def variant_style(name: str) -> render_lib.Style:
  if name not in VARIANTS:
    raise ValueError(f'unknown variant {name!r}; known: {sorted(VARIANTS)}')
  synthetic = render_lib.STYLES['synthetic']
  return render_lib.STYLES['real']._replace(
      **{field: getattr(synthetic, field) for field in VARIANTS[name]})


def demo_config(dataset: str) -> sim2real_demo.Sim2RealDemoConfig:
  name, _, config_name = dataset.partition('/')
  configs = {c.name: c for c in sim2real_demo.Sim2RealDemo.BUILDER_CONFIGS}
  if name != 'sim2real_demo' or (config_name or 'default') not in configs:
    raise ValueError(f'data.target = {dataset!r}: the probe re-renders '
                     f'sim2real_demo only (configs {sorted(configs)})')
  return configs[config_name or 'default']


def render_val(demo: sim2real_demo.Sim2RealDemoConfig, style, indices):
  """The `target_val` scenes `indices`, rendered with `style`."""
  split_index = list(sim2real_demo.SPLITS).index('target_val')
  pairs = [render_lib.render([demo.seed, split_index, i], 'real', demo.height,
                             demo.width, style=style) for i in indices]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def sink(confusion: np.ndarray) -> tuple[int, float]:
  """The class most predicted on other classes' pixels, and the share (%)
  of all other-class pixels it takes."""
  wrong = confusion.sum(0) - np.diag(confusion)
  c = int(np.argmax(wrong))
  others = confusion.sum() - confusion[c].sum()
  return c, float(100.0 * wrong[c] / max(others, 1))


def probe(config, variables, variants, num_images: int,
          batch_size: int = 20) -> dict:
  demo = demo_config(config.data.target)
  if num_images > demo.counts['target_val']:
    raise ValueError(f'--num_images={num_images}: target_val has '
                     f'{demo.counts["target_val"]} scenes')
  model = from_config.model_for_stage(config, False)
  eval_step = jax.jit(pass_steps.make_eval_step(model))
  normalize = transforms.Normalize(tuple(config.data.mean), tuple(config.data.std))
  results = {}
  for name in variants:
    style = variant_style(name)
    confusion = np.zeros((model.num_classes,) * 2, np.int64)
    for start in range(0, num_images, batch_size):
      images, labels = render_val(
          demo, style, range(start, min(num_images, start + batch_size)))
      resized = np.stack([resize.resize_image(image, config.data.eval_size)
                          for image in images])
      batch = normalize.map({'image': resized, 'label': labels})
      confusion += np.asarray(eval_step(variables, batch))
    summary = metrics.summarize(confusion, config.evaluation.class_sets[0])
    sink_class, sink_share = sink(confusion)
    results[name] = {'miou': summary['miou'],
                     'per_class_iou': summary['per_class_iou'],
                     'sink': label_table.CLASS_NAMES[sink_class],
                     'sink_share': sink_share}
  return results


def format_table(results: dict) -> str:
  base = results.get('base', {}).get('miou')
  lines = ['| variant | mIoU | Δ vs base | sink (share of other pixels) |',
           '|---|---|---|---|']
  for name, r in results.items():
    delta = f'{r["miou"] - base:+.1f}' if base is not None else '–'
    lines.append(f'| {name} | {r["miou"]:.1f} | {delta} | {r["sink"]} '
                 f'({r["sink_share"]:.1f} %) |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  try:
    variants = args.variants or list(VARIANTS)
    for name in variants:
      variant_style(name)
    model = from_config.model_for_stage(args.config, False)
    variables = stage_outputs.load_variables(
        args.model_dir, model, mesh_lib.make_mesh(jax.devices()))
    results = probe(args.config, variables, variants, args.num_images)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(format_table(results))
  if args.output:
    with open(args.output, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=flag_errors.parse_flags)
