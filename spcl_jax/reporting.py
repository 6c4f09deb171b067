"""What the pipeline tells about its stages: one line per finished stage
saying what the stage made (a training stage its mIoU, a prototype stage its
prototypes, a pseudo-label stage its thresholds, coverage and precision),
the per-class IoU table of a training stage (DIR/<stage>/table.md,
table.csv) and the table of every evaluated stage at the end of a run."""

import numpy as np

from spcl_jax import tables

ROW_TITLE = 'stage'


def _train_line(name: str, result: dict) -> str:
  line = (f'{name}: mIoU {result["miou"]:.2f}, tail mIoU '
          f'{result["tail_miou"]:.2f} ({result["class_set"]} classes)')
  if result.get('best_step') is not None:
    line += (f', best {result["best_miou"]:.2f} at step '
             f'{result["best_step"]}')
  return line


def _prototypes_line(name: str, result: dict) -> str:
  return (f'{name}: prototypes of {result["classes_with_prototype"]} of '
          f'{len(result["images_per_class"])} classes, from the '
          f'{result["model_from"]} model')


def _pseudo_labels_line(name: str, result: dict) -> str:
  thresholds = np.asarray(result['class_thresholds'], np.float64)
  line = (f'{name}: {result["labels_from"]} pseudo labels from the '
          f'{result["model_from"]} model on '
          f'{100 * result["pseudo_label_coverage"]:.1f} % of the target '
          f'pixels, class thresholds {thresholds.min():.3f}..'
          f'{thresholds.max():.3f} (median {np.median(thresholds):.3f})')
  has_labels = any(v is not None for v in result.get(
      'pseudo_label_class_coverage', {}).values())
  if has_labels:
    line += (f'; pixel precision {result["pseudo_label_pixel_precision"]:.1f}'
             ' % against the split\'s stored labels')
  return line


LINES = {'train': _train_line, 'prototypes': _prototypes_line,
         'pseudo_labels': _pseudo_labels_line}


def stage_line(kind: str, name: str, result: dict) -> str:
  """One line of what a finished stage of `kind` made."""
  return LINES[kind](name, result)


def write_stage_tables(stage_dir: str, name: str, result: dict) -> tuple:
  """DIR/<stage>/table.md and table.csv of a training stage's evaluation."""
  return tables.write(stage_dir, {name: result}, ROW_TITLE)


def evaluated_stages_table(results: dict, kinds: dict) -> str | None:
  """Markdown table with a row per training stage of `results` (stage name
  -> result; `kinds`: stage name -> kind), None if there is none."""
  rows = {name: result for name, result in results.items()
          if kinds[name] == 'train'}
  return tables.markdown(rows, ROW_TITLE) if rows else None
