"""The figures of the feature-space analysis: per-class Class Center
Distance bars (the paper's Figure 5) and t-SNE panels (its Figure 4)."""

import io

import numpy as np

from spcl_jax.core import labels as label_table
from spcl_jax.infra import workdir as workdir_lib

# the marker of each domain's points in the t-SNE panels
MARKERS = {'source': 'o', 'target': '^'}
DOMAINS = tuple(MARKERS)


def _write_figure(path: str, figure) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
  workdir_lib.write_atomically(path, lambda f: f.write(buffer.getvalue()),
                               binary=True)


def class_colors(label_space: str) -> np.ndarray:
  """[C, 3] floats in [0, 1]: each class's Cityscapes palette colour."""
  trainids = label_table.space_to_trainids(label_space)
  return label_table.PALETTE[trainids].astype(np.float64) / 255.0


def plot_ccd(path: str, result: dict, class_names) -> None:
  """Figure 5: per domain, the per-class CCD as grouped bars, one per
  model, and the mean over the classes present; the classes without pixels
  in either domain are left out."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  models = list(result)
  class_names = [n for n in class_names if any(
      result[m][d]['per_class'][n] is not None for m in models
      for d in DOMAINS)]
  names = list(class_names) + ['mean']
  figure = Figure(figsize=(max(8.0, 0.6 * len(names) * max(1, len(models))
                               / 2), 7))
  axes = figure.subplots(len(DOMAINS), 1, squeeze=False)[:, 0]
  width = 0.8 / max(1, len(models))
  x = np.arange(len(names))
  for ax, domain in zip(axes, DOMAINS):
    for i, model in enumerate(models):
      entry = result[model][domain]
      values = [entry['per_class'][n] for n in class_names] + [entry['mean']]
      values = [np.nan if v is None else v for v in values]
      ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=model)
    ax.set_xticks(x, names, rotation=60, ha='right')
    ax.set_ylabel('class center distance')
    ax.set_title(f'{domain} (lower: more compact, better separated)')
    ax.legend()
  figure.tight_layout()
  _write_figure(path, figure)


def plot_tsne(path: str, embeddings: dict, label_space: str) -> None:
  """Figure 4: one panel per model; points coloured by class, source and
  target by marker. `embeddings`: model -> domain -> (points [M, 2],
  classes [M])."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  names = label_table.class_names(label_space)
  colors = class_colors(label_space)
  models = list(embeddings)
  figure = Figure(figsize=(6 * len(models) + 2.5, 6))
  axes = figure.subplots(1, len(models), squeeze=False)[0]
  present = set()
  for ax, model in zip(axes, models):
    for domain in DOMAINS:
      points, classes = embeddings[model][domain]
      present.update(int(c) for c in classes)
      ax.scatter(points[:, 0], points[:, 1], c=colors[classes], s=8,
                 marker=MARKERS[domain], linewidths=0, alpha=0.8)
    ax.set_title(model)
    ax.set_xticks([])
    ax.set_yticks([])
  handles = [Line2D([], [], linestyle='', marker='s', color=colors[c],
                    label=names[c]) for c in sorted(present)]
  handles += [Line2D([], [], linestyle='', marker=MARKERS[d], color='grey',
                     label=d) for d in DOMAINS]
  figure.legend(handles=handles, loc='center right', fontsize='small')
  figure.tight_layout(rect=(0, 0, 1 - 2.3 / (6 * len(models) + 2.5), 1))
  _write_figure(path, figure)


# ------------------------------------------------------------ the command --
