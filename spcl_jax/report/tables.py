"""Per-class IoU tables laid out like the paper's Table 1: one row per model,
the classes as columns in the paper's order (the Cityscapes trainId order),
then mIoU and tail mIoU of each evaluated class set; as markdown and CSV.

A row is built from an evaluation's report entry (`metrics.summarize` /
`metrics.summarize_sets`: `per_class_iou` by class name, `miou`,
`tail_miou` of `class_set`, and `miou_<n>` / `tail_miou_<n>` of the other
sets), so report.json, done.json and metrics.json all tabulate alike.
"""

import csv
import io
import math
import os

from spcl_jax.core import labels as label_table
from spcl_jax.infra import workdir as workdir_lib

MISSING_MARKDOWN = '-'   # a class or set an entry has no value for


def class_sets_of(entry: dict) -> list[int]:
  """The class sets an entry holds, its main one first."""
  sets = [int(entry['class_set'])]
  for key in entry:
    if key.startswith('miou_') and key[len('miou_'):].isdigit():
      size = int(key[len('miou_'):])
      if size not in sets:
        sets.append(size)
  return sets


def _union(lists) -> list:
  seen = []
  for items in lists:
    seen += [x for x in items if x not in seen]
  return seen


def class_columns(entries: dict) -> list[str]:
  """Names of the classes of any entry, in the paper's (trainId) order."""
  names = _union(entry['per_class_iou'] for entry in entries.values())
  unknown = [n for n in names if n not in label_table.CLASS_NAMES]
  if unknown:
    raise ValueError(f'per_class_iou has unknown class names {unknown}')
  return sorted(names, key=label_table.CLASS_NAMES.index)


def _set_columns(class_sets: list[int]) -> list[tuple[str, int, str]]:
  """(header, class set, entry key suffix) of the mean columns."""
  if len(class_sets) == 1:
    return [('mIoU', class_sets[0], 'miou'),
            ('tail mIoU', class_sets[0], 'tail_miou')]
  columns = []
  for size in class_sets:
    columns += [(f'mIoU ({size})', size, 'miou'),
                (f'tail mIoU ({size})', size, 'tail_miou')]
  return columns


def _mean(entry: dict, size: int, key: str):
  if int(entry['class_set']) == size:
    return entry.get(key)
  return entry.get(f'{key}_{size}')


def table(entries: dict, row_title: str = 'model'):
  """(header, rows): `entries` maps a row name to a report entry; a row is
  its name then floats in percent, None where the entry has no value (or it
  is NaN: a class absent from both the labels and the predictions)."""
  classes = class_columns(entries)
  means = _set_columns(_union(class_sets_of(e) for e in entries.values()))
  header = [row_title, *classes, *(name for name, _, _ in means)]
  rows = []
  for name, entry in entries.items():
    values = [entry['per_class_iou'].get(c) for c in classes]
    values += [_mean(entry, size, key) for _, size, key in means]
    rows.append([name, *(None if v is None or math.isnan(v) else float(v)
                         for v in values)])
  return header, rows


def markdown(entries: dict, row_title: str = 'model', digits: int = 1) -> str:
  """A markdown table (values in percent, `digits` decimals)."""
  header, rows = table(entries, row_title)
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|']
  for name, *values in rows:
    cells = [MISSING_MARKDOWN if v is None else f'{v:.{digits}f}'
             for v in values]
    lines.append('| ' + ' | '.join([name, *cells]) + ' |')
  return '\n'.join(lines) + '\n'


def csv_text(entries: dict, row_title: str = 'model', digits: int = 2) -> str:
  """The same table as CSV (empty cells where there is no value)."""
  header, rows = table(entries, row_title)
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  for name, *values in rows:
    writer.writerow([name, *('' if v is None else f'{v:.{digits}f}'
                             for v in values)])
  return buffer.getvalue()


def write(directory: str, entries: dict, row_title: str = 'model') -> tuple:
  """Writes `directory`/table.md and table.csv (each atomically); returns
  their paths."""
  paths = (os.path.join(directory, 'table.md'),
           os.path.join(directory, 'table.csv'))
  for path, text in zip(paths, (markdown(entries, row_title),
                                csv_text(entries, row_title))):
    workdir_lib.write_text(path, text)
  return paths
