"""What the pipeline tells about its stages: one line per finished stage
saying what the stage made (a training stage its mIoU, a prototype stage its
prototypes, a pseudo-label stage its thresholds, coverage and precision),
the per-class IoU table of a training stage (DIR/<stage>/table.md,
table.csv) and the table of every evaluated stage at the end of a run."""

import numpy as np

from spcl_jax.report import tables

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


def _thresholds_summary(result: dict) -> str:
  """Range and median of the thresholds of the classes the model predicted
  (a class never predicted has threshold 0: counted, not summarised)."""
  thresholds = np.asarray(result['class_thresholds'], np.float64)
  pixels = result.get('predicted_pixels')
  if pixels is not None:
    predicted = np.array([n > 0 for n in pixels.values()], bool)
  else:   # written before the pixel counts: 0 means never predicted
    predicted = thresholds > 0
  kept = thresholds[predicted]
  if kept.size:
    text = (f'class thresholds {kept.min():.3f}..{kept.max():.3f} (median '
            f'{np.median(kept):.3f}) of the {kept.size} classes predicted')
  else:
    text = 'no class predicted'
  never = thresholds.size - kept.size
  if never and kept.size:
    text += f', {never} never predicted'
  return text


def _pseudo_labels_line(name: str, result: dict) -> str:
  line = (f'{name}: {result["labels_from"]} pseudo labels from the '
          f'{result["model_from"]} model on '
          f'{100 * result["pseudo_label_coverage"]:.1f} % of the target '
          f'pixels, {_thresholds_summary(result)}')
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
