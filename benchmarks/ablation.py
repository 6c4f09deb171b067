r"""The paper's ablation (Tables 4 / 5) at mini scale, every row at the same
segmenter-step budget, over several seeds.

  python -m benchmarks.ablation --config=configs/demo.py --seeds=3 --workdir=DIR
  python -m benchmarks.ablation --config=configs/demo.py --seeds=3 \
      --workdir=DIR --rows=source_only,full_spcl,self_training_no_cl,oracle
  python -m benchmarks.ablation ... --sweeps        # + the SPCL-stage sweeps

Writes `DIR/ablation.json` ({"rows": {name: {"mious": [...], "miou_mean",
"miou_std", "per_class_iou_mean", "steps", ...}}, ...}), `DIR/ablation.md`
and `DIR/curves.png` (target mIoU over steps of the main rows).

The budget B is the full pipeline's: warm-up + SPCL + self-training steps of
the config. Rows that stop early continue their last stage through the
steps they skip (its poly schedule stretched in proportion), so every row
trains the segmenter for B steps:
  source_only          source cross-entropy for B steps (the baseline of all)
  warmup_only          adversarial warm-up for B steps
  spcl_source_cl       warm-up, then the SPCL stage with L_cl^s only
  spcl_stage           warm-up, then the SPCL stage (L_cl^s + L_cl^t)
  spcl_stage_no_cl     warm-up, then the SPCL stage with λ = 0 (source CE)
  full_spcl            the whole pipeline
  self_training_no_cl  the whole pipeline with λ = 0 (standard self-training)
  full_spcl_class_balanced  the whole pipeline, self-training reading
                       class-balanced pseudo labels (each class's top 20 %)
  full_spcl_released_labels  the whole pipeline, self-training reading the
                       released pseudo labels (median capped at 0.9); one of
                       these two rows is `full_spcl` itself (configs/demo.py
                       defaults to class-balanced labels, the paper's configs
                       to the released ones), and shares its stages
  oracle               cross-entropy on the labelled target split for B steps
  self_training_true_labels  full SPCL whose self-training reads the stored
                       target labels instead of pseudo labels (a diagnostic
                       of the self-training path: it should near the oracle)
  self_training_kept_true_labels  the stored labels on the pixels the model's
                       thresholds kept (its coverage, no wrong label)
  self_training_correct_pseudo_labels  the model's pseudo labels where they
                       are right (its errors dropped, its coverage shrunk)
                       — with the row above and full_spcl, how much of
                       self-training's shortfall is wrong labels, how much
                       missing ones (diagnostics, never the method)
Sweeps (`--sweeps`) vary one field of `spcl_stage`: τ, α, λ, the target mask
and the order of the prototype update.

Stages are shared between rows only where they are identical: a stage's
identity is its config and the seed, with those of every stage it reads
from. Finished stages live once under `DIR/stages/` and rows link to them,
so an interrupted ablation reruns only what had not finished.
"""

import ast
import dataclasses
import hashlib
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from benchmarks import seed_stats
from configs import default
from spcl_jax.core import labels as label_table
from spcl_jax.data import sources
from spcl_jax.infra import flag_errors
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.run import config_checks
from spcl_jax.run import pipeline
from spcl_jax.run import stage_graph

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'ablation directory')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'seeds 0 .. N-1 (added to '
                              'config.seed)')
_ROWS = flags.DEFINE_list('rows', None, 'rows to run (default: all main '
                          'rows, plus the sweeps with --sweeps)')
_SWEEPS = flags.DEFINE_bool('sweeps', False, 'add the SPCL-stage sweeps')
_EXTRA = flags.DEFINE_multi_string(
    'extra_row', [], 'NAME=BASE_ROW:FIELD=VALUE[;FIELD=VALUE...], e.g. '
    'tau_10=spcl_stage:stages.spcl.temperature=10.0')

TRAIN_STAGES = stage_graph.TRAINING_STAGES
ALL_STAGES = tuple(s.name for s in stage_graph.STAGES)
THROUGH_SPCL = ALL_STAGES[:ALL_STAGES.index('spcl') + 1]


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  description: str
  stages: tuple[str, ...]            # run in order; the last one is scored
  overrides: dict                    # dotted config field -> value
  baseline: str = 'source_only'      # the row it is compared with, paired
  oracle: bool = False


def main_rows() -> list[Row]:
  return [
      Row('source_only', 'source CE for the whole budget', ('warmup',),
          {'stages.warmup.adversarial_weight': 0.0}, baseline=''),
      Row('warmup_only', 'adversarial warm-up for the whole budget',
          ('warmup',), {}),
      Row('spcl_source_cl', '+ L_cl^s', THROUGH_SPCL,
          {'stages.spcl.target_contrastive_weight': 0.0},
          baseline='spcl_stage_no_cl'),
      Row('spcl_stage', '+ L_cl^s + L_cl^t (the SPCL stage)', THROUGH_SPCL,
          {}, baseline='spcl_stage_no_cl'),
      Row('spcl_stage_no_cl', 'warm-up + SPCL stage at λ = 0 (source CE)',
          THROUGH_SPCL, {'stages.spcl.contrastive_weight': 0.0}),
      Row('full_spcl', '+ self-training (full SPCL)', ALL_STAGES, {},
          baseline='self_training_no_cl'),
      Row('self_training_no_cl', 'warm-up + self-training without L_cl',
          ALL_STAGES, {'stages.spcl.contrastive_weight': 0.0}),
      Row('full_spcl_class_balanced', 'full SPCL, self-training on '
          'class-balanced pseudo labels (top 20 % of each class; '
          'configs/default.py class_balanced)', ALL_STAGES,
          {'stages.pseudo_labels_2.threshold_quantile': 0.8,
           'stages.pseudo_labels_2.threshold_cap': 1.0},
          baseline='full_spcl'),
      Row('full_spcl_released_labels', 'full SPCL, self-training on the '
          'released pseudo labels (median confidence capped at 0.9)',
          ALL_STAGES,
          {'stages.pseudo_labels_2.threshold_quantile': 0.5,
           'stages.pseudo_labels_2.threshold_cap': 0.9},
          baseline='full_spcl'),
      Row('oracle', 'trained on labelled target data', ('warmup',), {},
          oracle=True),
      Row('self_training_true_labels', 'full SPCL, self-training fed the '
          'stored target labels (diagnostic)', ALL_STAGES,
          {'stages.pseudo_labels_2.labels_from': 'stored'},
          baseline='oracle'),
      Row('self_training_kept_true_labels', 'full SPCL, self-training fed '
          'the stored labels on the pixels the thresholds kept (diagnostic)',
          ALL_STAGES,
          {'stages.pseudo_labels_2.labels_from': 'stored_where_kept'},
          baseline='full_spcl'),
      Row('self_training_correct_pseudo_labels', 'full SPCL, self-training '
          'fed only its right pseudo labels (diagnostic)', ALL_STAGES,
          {'stages.pseudo_labels_2.labels_from': 'model_where_correct'},
          baseline='full_spcl'),
  ]


SWEEPS = {  # name: overrides of the `spcl_stage` row
    'tau_1': {'stages.spcl.temperature': 1.0},
    'tau_0.1': {'stages.spcl.temperature': 0.1},
    'alpha_1.0': {'stages.spcl.alpha': 1.0},
    'lambda_0.1': {'stages.spcl.contrastive_weight': 0.1},
    'lambda_10': {'stages.spcl.contrastive_weight': 10.0},
    'online_mask': {'stages.spcl.target_mask': 'online'},
    'update_before_loss': {'stages.spcl.prototype_update': 'before_loss'},
}


def sweep_rows(base: Row) -> list[Row]:
  def describe(overrides):
    return 'SPCL stage, ' + ', '.join(
        f'{field.rsplit(".", 1)[-1]} = {value}'
        for field, value in overrides.items())
  return [Row(name, describe(o), base.stages, {**base.overrides, **o},
              baseline='spcl_stage_no_cl')
          for name, o in SWEEPS.items()]


def parse_extra_row(spec: str, rows: dict) -> Row:
  """NAME=BASE_ROW:FIELD=VALUE[;FIELD=VALUE...]."""
  name, _, rest = spec.partition('=')
  base_name, _, assignments = rest.partition(':')
  if not name or base_name not in rows or not assignments:
    raise ValueError(f'--extra_row {spec!r}: expected NAME=BASE_ROW:FIELD='
                     f'VALUE[;FIELD=VALUE...] with BASE_ROW one of '
                     f'{sorted(rows)}')
  base, overrides = rows[base_name], dict(rows[base_name].overrides)
  for assignment in assignments.split(';'):
    field, eq, value = assignment.partition('=')
    if not eq:
      raise ValueError(f'--extra_row {name}: {assignment!r} is not '
                       'FIELD=VALUE')
    overrides[field.strip()] = _literal(value.strip())
  return dataclasses.replace(base, name=name, overrides=overrides,
                             description=f'{base.description}; {assignments}')


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


# ------------------------------------------------------------- row configs --

def budget(config) -> int:
  return sum(config.stages[s].steps for s in TRAIN_STAGES)


def _set(config, field: str, value) -> None:
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    if part not in node or not isinstance(node[part],
                                          ml_collections.ConfigDict):
      raise KeyError(field)
    node = node[part]
  if leaf not in node:
    raise KeyError(field)
  node[leaf] = type(node[leaf])(value) if isinstance(
      node[leaf], (tuple, list)) else value


def _stretch(stage, steps: int) -> None:
  """`steps` steps with the stage's poly schedule stretched in proportion."""
  stage.schedule_steps = max(steps, int(round(
      stage.schedule_steps * steps / stage.steps)))
  stage.steps = steps


def row_config(base, row: Row, seed: int) -> ml_collections.ConfigDict:
  """The config of one row and seed; raises ValueError naming the row."""
  config = base.copy_and_resolve_references()
  total = budget(base)
  with config.unlocked():
    config.seed = base.seed + seed
    config.stages_to_run = row.stages
  try:
    for field, value in row.overrides.items():
      _set(config, field, value)
  except KeyError as e:
    raise ValueError(f'row {row.name!r}: no config field {e.args[0]!r}') from e
  except (TypeError, ValueError) as e:
    raise ValueError(f'row {row.name!r}: {e}') from e
  if row.oracle:
    default.oracle(config)
  # the last training stage of the row takes the steps of the ones it skips
  trained = [s for s in TRAIN_STAGES if s in row.stages]
  last = trained[-1]
  skipped = sum(base.stages[s].steps for s in TRAIN_STAGES
                if s not in row.stages)
  _stretch(config.stages[last], config.stages[last].steps + skipped)
  if row_steps(config, row) != total:
    raise ValueError(f'row {row.name!r}: {row_steps(config, row)} segmenter '
                     f'steps, the budget is {total}')
  return config


def row_steps(config, row: Row) -> int:
  return sum(config.stages[s].steps for s in TRAIN_STAGES if s in row.stages)


def _without_added_defaults(tree: dict, prefix: str = '') -> dict:
  return {k: _without_added_defaults(v, f'{prefix}{k}.')
          if isinstance(v, dict) else v for k, v in tree.items()
          if isinstance(v, dict)
          or not config_checks.is_added_default(f'{prefix}{k}', v)}


def stage_key(config, stage_name: str) -> str:
  """Identity of a stage's output: the seed, everything outside `stages`
  that can change it, its own stage config and its inputs' keys."""
  stage = stage_graph.STAGE_BY_NAME[stage_name]
  flat = config_checks.config_to_json(config)
  identity = {
      'seed': flat['seed'],
      **{k: flat[k] for k in ('model', 'discriminator', 'data', 'evaluation')},
      'stage': flat['stages'][stage_name],
      'inputs': [stage_key(config, name) for name in (
          stage.model_from, stage.prototypes_from, stage.pseudo_labels_from)
                 if name],
  }
  identity['data'] = {k: v for k, v in identity['data'].items()
                      if k != 'worker_count'}
  # a field added later, at the value that computes what its absence did,
  # is left out: adding a field changes no stage's key (keys made before
  # this rule, 2026-12-07, differ once)
  identity = _without_added_defaults(identity)
  text = json.dumps(identity, sort_keys=True, default=str)
  return f'{stage_name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}'


# --------------------------------------------------------------- checking --

def check_rows(base, rows: list[Row], seeds: int) -> dict:
  """Every row's config for every seed, validated (config checks and the
  data each row reads) before any training."""
  configs, problems = {}, []
  for row in rows:
    unknown = [s for s in row.stages if s not in ALL_STAGES]
    if unknown:
      problems.append(f'row {row.name!r}: unknown stages {unknown}')
      continue
    for seed in range(seeds):
      try:
        config = row_config(base, row, seed)
        config_checks.validate(config)
      except ValueError as e:
        problems.append(str(e) if str(e).startswith('row ') else
                        f'row {row.name!r}: {e}')
        break
      configs[row.name, seed] = config
  problems += _check_data({row.name: configs[row.name, 0] for row in rows
                           if (row.name, 0) in configs})
  if problems:
    raise ValueError('ablation cannot run:\n  ' + '\n  '.join(problems))
  return configs


def _splits_read(config) -> set:
  """(dataset, split) pairs that a row's stages read."""
  data, stages = config.data, config.stages_to_run
  needed = {(data.source, data.source_split), (data.target, data.val_split)}
  if len(stages) > 1 or config.stages.warmup.adversarial_weight > 0:
    needed.add((data.target, data.target_split))
  return needed


def _check_data(configs: dict) -> list[str]:
  readers = {}
  for name, config in configs.items():
    for pair in _splits_read(config):
      readers.setdefault(pair, []).append(name)
  problems = []
  for (dataset, split), names in sorted(readers.items()):
    config = configs[names[0]]
    if config.data.build_if_missing and dataset.startswith('sim2real_demo'):
      continue  # the pipeline builds it
    try:
      sources.open_source(dataset, split, os.path.expanduser(config.data.data_dir))
    except (FileNotFoundError, ValueError) as e:
      problems.append(f'rows {names} read {dataset} {split}: {e}')
  return problems


# ---------------------------------------------------------------- running --

def link_stages(config, row_dir: str, store: str) -> None:
  """`row_dir/<stage>` -> `store/<stage key>` for every stage of the row."""
  os.makedirs(row_dir, exist_ok=True)
  for name in config.stages_to_run:
    # absolute: a link's relative target would resolve from `row_dir`
    target = os.path.abspath(os.path.join(store, stage_key(config, name)))
    os.makedirs(target, exist_ok=True)
    link = os.path.join(row_dir, name)
    if os.path.islink(link) and os.readlink(link) == target:
      continue
    if os.path.lexists(link):
      raise FileExistsError(f'{link} exists and is not the link to {target}'
                            '; remove it to rerun this row')
    os.symlink(target, link)


def run_row(config, row: Row, seed: int, workdir: str) -> dict:
  row_dir = os.path.join(workdir, 'rows', row.name, f'seed{seed}')
  link_stages(config, row_dir, os.path.join(workdir, 'stages'))
  results = pipeline.run(config, row_dir, allow_config_change=False)
  scored = results[row.stages[-1]]
  curve, offset = [], 0
  for name in row.stages:
    if name in TRAIN_STAGES:
      curve += [(offset + h['step'], h['miou'])
                for h in results[name]['eval_history']]
      offset += results[name]['steps']
  return {'miou': scored['miou'], 'tail_miou': scored['tail_miou'],
          'per_class_iou': scored['per_class_iou'], 'curve': curve}


# --------------------------------------------------------------- summaries --

def summarize(rows: list[Row], results: dict, steps: dict) -> dict:
  table = {}
  for row in rows:
    runs = [results[row.name, s] for s in sorted(
        s for (name, s) in results if name == row.name)]
    if not runs:
      continue
    mious = [r['miou'] for r in runs]
    mean, std = seed_stats.mean_std(mious)
    classes = runs[0]['per_class_iou']
    table[row.name] = {
        'description': row.description, 'stages': list(row.stages),
        'mious': mious, 'miou_mean': mean, 'miou_std': std,
        'tail_miou_mean': seed_stats.mean_std(
            [r['tail_miou'] for r in runs])[0],
        'per_class_iou_mean': {c: float(np.mean([r['per_class_iou'][c]
                                                 for r in runs]))
                               for c in classes},
        'steps': steps[row.name], 'seeds': len(runs),
        'curves': [r['curve'] for r in runs],
        'baseline': row.baseline,
    }
  for name, entry in table.items():
    for key, other in (('vs_source_only', 'source_only'),
                       ('vs_baseline', entry['baseline'])):
      if other and other in table and other != name:
        n = min(len(entry['mious']), len(table[other]['mious']))
        entry[key] = seed_stats.paired_difference(entry['mious'][:n],
                                                  table[other]['mious'][:n])
  if 'source_only' in table and 'oracle' in table:
    gap = table['oracle']['miou_mean'] - table['source_only']['miou_mean']
    for entry in table.values():
      entry['gap_closed'] = ((entry['miou_mean'] -
                              table['source_only']['miou_mean']) / gap
                             if gap > 0 else None)
  return table


def markdown(table: dict, meta: dict) -> str:
  lines = [f'# Ablation on `{meta["config"]}`', '',
           f'{meta["seeds"]} seeds; every row {meta["budget"]} segmenter '
           f'steps; target mIoU (%) on the validation split, mean ± std '
           'over seeds; Δ = paired mean difference ± its standard error.',
           '', '| row | what | mIoU | tail mIoU | Δ vs source only | '
           'baseline | Δ vs baseline | gap closed |',
           '|---|---|---|---|---|---|---|---|']
  for name, e in table.items():
    def delta(key):
      return seed_stats.fmt_difference(e.get(key))
    lines.append(
        f'| {name} | {e["description"]} | {e["miou_mean"]:.1f} ± '
        f'{seed_stats.fmt(e["miou_std"])} | {e["tail_miou_mean"]:.1f} | '
        f'{delta("vs_source_only")} | {e["baseline"] or "–"} | '
        f'{delta("vs_baseline")} | '
        f'{seed_stats.fmt(e.get("gap_closed") and 100 * e["gap_closed"], 0)}'
        f'{"%" if e.get("gap_closed") is not None else ""} |')
  classes = [c for c in label_table.CLASS_NAMES
             if any(c in e['per_class_iou_mean'] for e in table.values())]
  classes = [c for c in classes if any(
      e['per_class_iou_mean'].get(c, 0) > 0 for e in table.values())]
  lines += ['', '## Per-class IoU (mean over seeds)', '',
            '| row | ' + ' | '.join(classes) + ' |',
            '|---|' + '---|' * len(classes)]
  for name, e in table.items():
    lines.append(f'| {name} | ' + ' | '.join(
        seed_stats.fmt(e['per_class_iou_mean'].get(c)) for c in classes)
                 + ' |')
  lines += ['', f'Wall time: {meta["wall_time_s"] / 60:.1f} min on '
            f'{meta["machine"]}.', '']
  return '\n'.join(lines)


def plot_curves(table: dict, path: str, rows=('source_only', 'warmup_only',
                                              'spcl_stage', 'full_spcl',
                                              'self_training_no_cl',
                                              'oracle')) -> bool:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('matplotlib missing: no %s', path)
    return False
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in rows:
    if name not in table:
      continue
    curves = table[name]['curves']
    steps = sorted({s for c in curves for s, _ in c})
    mean = [np.mean([m for c in curves for s2, m in c if s2 == s])
            for s in steps]
    ax.plot(steps, mean, marker='.', label=name)
  ax.set_xlabel('segmenter step')
  ax.set_ylabel('target mIoU (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return True


def select_rows(names, sweeps: bool, extra: list[str]) -> list[Row]:
  rows = main_rows()
  by_name = {r.name: r for r in rows}
  everything = rows + sweep_rows(by_name['spcl_stage'])
  for spec in extra:
    row = parse_extra_row(spec, {r.name: r for r in everything})
    everything.append(row)
    rows.append(row)
  by_name = {r.name: r for r in everything}
  if names:
    unknown = [n for n in names if n not in by_name]
    if unknown:
      raise ValueError(f'--rows: unknown rows {unknown}; known: '
                       f'{sorted(by_name)}')
    # the --extra_row rows run too, after the named ones
    chosen = [by_name[n] for n in names] + [
        row for row in rows[len(main_rows()):] if row.name not in names]
  else:
    chosen = rows + (sweep_rows(by_name['spcl_stage']) if sweeps else [])
  return chosen


def run_ablation(base, workdir: str, seeds: int, rows: list[Row],
                 config_name: str = '') -> dict:
  configs = check_rows(base, rows, seeds)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  results, steps = {}, {}
  meta = {'config': config_name, 'seeds': seeds, 'budget': budget(base),
          'machine': f'{os.cpu_count()} CPU cores' if
                     _platform() == 'cpu' else _platform()}
  timing_path = os.path.join(workdir, 'wall_time.json')
  previous = (workdir_lib.read_json(timing_path)['seconds']
              if os.path.exists(timing_path) else 0.0)
  for seed in range(seeds):   # seed-major: early results cover every row
    for row in rows:
      logging.info('ablation: row %s, seed %d', row.name, seed)
      config = configs[row.name, seed]
      results[row.name, seed] = run_row(config, row, seed, workdir)
      steps[row.name] = row_steps(config, row)
      meta['wall_time_s'] = previous + time.time() - start
      workdir_lib.write_json(timing_path, {'seconds': meta['wall_time_s']})
      table = summarize(rows, results, steps)
      workdir_lib.write_json(os.path.join(workdir, 'ablation.json'),
                             {'rows': table, **meta}, sort_keys=False)
      with open(os.path.join(workdir, 'ablation.md.tmp'), 'w') as f:
        f.write(markdown(table, meta))
      os.replace(os.path.join(workdir, 'ablation.md.tmp'),
                 os.path.join(workdir, 'ablation.md'))
  plot_curves(table, os.path.join(workdir, 'curves.png'))
  return table


def _platform() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0].platform


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  try:
    rows = select_rows(_ROWS.value, _SWEEPS.value, _EXTRA.value)
    table = run_ablation(_CONFIG.value, _WORKDIR.value, _SEEDS.value, rows,
                         flags.FLAGS['config'].serialize().partition('=')[2])
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(markdown(table, workdir_lib.read_json(os.path.join(
      _WORKDIR.value, 'ablation.json'))))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=flag_errors.parse_flags)
