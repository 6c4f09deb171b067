r"""Feature-space analysis of finished training stages: the Class Center
Distance per class (the paper's Figure 5, appendix Eq. 10) and a t-SNE of
pixel features (its Figure 4), for several models of one workdir side by
side.

  python -m spcl_jax.analyze --workdir=DIR [--stage=warmup,spcl]
      [--checkpoint=final|best] [--output=OUT] [--num_images=100]
      [--pixels_per_class=100] [--tsne_points=1000]
      [--tsne_iterations=500] [--seed=0]
      [--source_split=SPLIT] [--target_split=SPLIT]

Defaults: the stages `warmup` and `spcl` (those of them that are finished),
their final models, `num_images` images drawn at random (`--seed`) from the
source split (`data.source_split`, at `data.source_size`) and from the
target split (`data.val_split`, at `data.target_size`; labelled), and
OUT = DIR/analysis. Every model sees the same images and the same sampled
pixels.

How: spcl_jax/run/feature_analysis.py.

Writes
  OUT/ccd.json  per model: per-class CCD of source and target (null for a
                class without pixels), their mean over the classes present,
                pixel counts; the images used and the settings
  OUT/ccd.png   bars of the per-class CCD, one bar per model (Figure 5)
  OUT/tsne.png  one panel per model, points coloured by class (Cityscapes
                palette), source ● and target ▲ (Figure 4); not written
                with --tsne_points=0
Exit status 1 on an error, in one line, before any compute (a stage that is
not finished: the stages that exist are listed; an output directory that
cannot be written; a split that is not built; a bad sample size).
"""

import sys

# First: TensorFlow's native log level must be set before it is imported.
from spcl_jax.infra import console  # pylint: disable=g-bad-import-order
console.quiet_native_logs(sys.argv)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags

from spcl_jax.run import feature_analysis
from spcl_jax.run import trained_model


def _command(f) -> None:
  report, output = feature_analysis.analyze(
      f.workdir, f.output, f.stage, f.checkpoint, f.num_images,
      f.pixels_per_class, f.tsne_points, f.seed, f.source_split,
      f.target_split, f.tsne_iterations)
  for stage, entry in report['models'].items():
    means = ', '.join(f'{d} {entry[d]["mean"]:.3f}' if entry[d]['mean']
                      is not None else f'{d} -'
                      for d in feature_analysis.DOMAINS)
    print(f'{stage}: mean class center distance {means}')
  print(f'-> {output}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'pipeline workdir')
  flags.DEFINE_list('stage', None, 'training stages to compare (default: '
                    f'those of {",".join(feature_analysis.DEFAULT_STAGES)} that are finished)')
  flags.DEFINE_enum('checkpoint', 'final', list(trained_model.CHECKPOINTS),
                    "each stage's final model or its best one on the "
                    'validation split')
  flags.DEFINE_string('output', None, 'output directory (default: '
                      'DIR/analysis)')
  flags.DEFINE_integer('num_images', 100, 'images per domain')
  flags.DEFINE_integer('pixels_per_class', 100,
                       'sampled pixels per class and domain (t-SNE pool)')
  flags.DEFINE_integer('tsne_points', 1000,
                       't-SNE points per model, both domains (0: no t-SNE)')
  flags.DEFINE_integer('tsne_iterations', 500, 't-SNE optimisation '
                       f'iterations (>= {feature_analysis.MIN_TSNE_ITERATIONS})')
  flags.DEFINE_integer('seed', 0, 'images, pixels and t-SNE')
  flags.DEFINE_string('source_split', None, 'default: data.source_split')
  flags.DEFINE_string('target_split', None, 'default: data.val_split')
  flags.mark_flags_as_required(['workdir'])
  app.run(trained_model.command_main(_command))
