r"""Later self-training rounds (CBST's re-labelling) on top of the pipeline,
against their equal-step control, over several seeds (docs/research_log.md §4, "A
second self-training round does not help").

  python -m benchmarks.self_training_rounds --config=configs/demo.py \
      --seeds=3 --workdir=DIR [--quantiles=0.8,0.5]

For each seed k (config.seed + k) the whole pipeline runs in DIR/seed_<k>
(a finished one is resumed, not redone), then, from its self-trained model
(round 1), each extra row trains `stages.self_training`'s recipe once more
(the same steps, schedule, crops and batch; one more restart of the poly
schedule):
  round2_q<Q>   the self-trained model makes new pseudo labels (class-wise
                quantile Q of the confidences, no cap: the share of each
                class kept is 1 - Q, CBST grows it round by round) and
                self-training reads them;
  more_steps    the same extra training on round 1's own pseudo labels (the
                equal-step control: only the labels differ from round2_*).
Every row is scored on the validation split at its last step. Prints, and
writes DIR/rounds.json and DIR/rounds.md: round 1 and each extra row per
seed, mean ± std, and each round2_* row's paired difference to more_steps
and to round 1 (± standard error).
"""

import os
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from benchmarks import seed_stats
from spcl_jax.infra import flag_errors
from spcl_jax.infra import workdir as workdir_lib
from spcl_jax.run import config_checks
from spcl_jax.run import pipeline
from spcl_jax.run import stage_graph

ROUND1 = 'self_training'
CONTROL = 'self_training_more_steps'


def _tag(quantile: float) -> str:
  return f'q{int(round(quantile * 100)):02d}'


def labels_stage(quantile: float) -> str:
  """The round-2 pseudo-label stage of `quantile`."""
  return f'pseudo_labels_round2_{_tag(quantile)}'


def round2_stage(quantile: float) -> str:
  """The round-2 self-training stage of `quantile`."""
  return f'self_training_round2_{_tag(quantile)}'


def extra_stages(quantiles) -> tuple:
  """The stages after `stage_graph.STAGES`: per quantile a pseudo-label pass of
  the self-trained model and a self-training stage that reads it; and the
  control, self-training again on round 1's labels."""
  stages = []
  for quantile in quantiles:
    labels = labels_stage(quantile)
    stages += [
        stage_graph.Stage(labels, 'pseudo_labels', model_from=ROUND1),
        stage_graph.Stage(round2_stage(quantile), 'train',
                       step='self_training', model_from=ROUND1,
                       pseudo_labels_from=labels)]
  stages.append(stage_graph.Stage(
      CONTROL, 'train', step='self_training',
      model_from=ROUND1, pseudo_labels_from='pseudo_labels_2'))
  return tuple(stages)


def parse_quantiles(values) -> list:
  quantiles = []
  for value in values:
    try:
      quantile = float(value)
    except ValueError:
      quantile = None
    if quantile is None or not 0.0 < quantile < 1.0:
      raise ValueError(f'--quantiles: {value!r} is not a fraction in (0, 1)')
    quantiles.append(quantile)
  if len({_tag(q) for q in quantiles}) != len(quantiles):
    raise ValueError(f'--quantiles: {values} repeats a value (to 0.01)')
  return quantiles


def seed_config(base, quantiles, seed: int) -> ml_collections.ConfigDict:
  """`base` for run seed base.seed + `seed`, with a block for every extra
  stage: round 2's labels are `pseudo_labels_2`'s rule at its quantile
  (no cap), its training `self_training`'s recipe."""
  config = base.copy_and_resolve_references()
  stages = extra_stages(quantiles)
  with config.unlocked():
    config.seed = base.seed + seed
    for stage in stages:
      block = config.stages['pseudo_labels_2' if stage.kind ==
                            'pseudo_labels' else ROUND1]
      config.stages[stage.name] = block.copy_and_resolve_references()
    for quantile in quantiles:
      labels = config.stages[labels_stage(quantile)]
      labels.threshold_quantile, labels.threshold_cap = quantile, 1.0
    config.stages_to_run = tuple(
        s.name for s in stage_graph.STAGES + stages)
  return config


def run_seed(config, quantiles, workdir: str) -> dict:
  """{stage name: mIoU} of round 1 and the extra rows, and round 2's label
  statistics, for one seed."""
  stages = stage_graph.STAGES + extra_stages(quantiles)
  results = pipeline.run(config, workdir, stages=stages)
  scored = {s.name: results[s.name] for s in stages if s.kind == 'train'}
  labels = {s.name: {k: results[s.name].get(k) for k in (
      'pseudo_label_coverage', 'pseudo_label_pixel_precision')}
            for s in stages if s.kind == 'pseudo_labels'}
  return {'miou': {name: r['miou'] for name, r in scored.items()
                   if name not in ('warmup', 'spcl')},
          'per_class_iou': {name: r['per_class_iou']
                            for name, r in scored.items()},
          'labels': labels}


def summarize(per_seed: list, quantiles) -> dict:
  rows = {}
  round2 = [round2_stage(q) for q in quantiles]
  for name in [ROUND1, *round2, CONTROL]:
    mious = [seed['miou'][name] for seed in per_seed]
    mean, std = seed_stats.mean_std(mious)
    rows[name] = {'mious': mious, 'miou_mean': mean, 'miou_std': std}
    if name != ROUND1:
      rows[name]['vs_round1'] = seed_stats.paired_difference(
          mious, rows[ROUND1]['mious'])
    if name in round2:
      rows[name]['vs_more_steps'] = seed_stats.paired_difference(
          mious, [seed['miou'][CONTROL] for seed in per_seed])
  return rows


def markdown(rows: dict) -> str:
  fmt, diff = seed_stats.fmt, seed_stats.fmt_difference
  lines = ['| row | mIoU per seed | mean ± std | vs round 1 | '
           'vs more_steps |', '|---|---|---|---|---|']
  for name, row in rows.items():
    lines.append(
        f'| {name} | {" / ".join(f"{m:.1f}" for m in row["mious"])} | '
        f'{row["miou_mean"]:.1f} ± {fmt(row["miou_std"])} | '
        f'{diff(row.get("vs_round1"))} | {diff(row.get("vs_more_steps"))} |')
  return '\n'.join(lines) + '\n'


def run_rounds(base, workdir: str, seeds: int, quantiles) -> dict:
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}: need at least 1')
  configs = [seed_config(base, quantiles, k) for k in range(seeds)]
  stages = stage_graph.STAGES + extra_stages(quantiles)
  for config in configs:   # every seed's config, before any training
    config_checks.validate(config, stages=stages)
  per_seed = [run_seed(config, quantiles,
                       os.path.join(workdir, f'seed_{k}'))
              for k, config in enumerate(configs)]
  rows = summarize(per_seed, quantiles)
  result = {'rows': rows, 'seeds': seeds, 'quantiles': quantiles,
            'per_seed': per_seed,
            'steps_per_round': base.stages[ROUND1].steps}
  workdir_lib.write_json(os.path.join(workdir, 'rounds.json'), result,
                         sort_keys=False)
  workdir_lib.write_text(os.path.join(workdir, 'rounds.md'), markdown(rows))
  return result


def define_flags() -> None:
  """The command's flags, defined when it runs as a program only (the
  tests import this module beside benchmarks.ablation, which defines a
  `config` flag of its own)."""
  config_flags.DEFINE_config_file('config', None, 'config file[:args]',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'output directory')
  flags.DEFINE_integer('seeds', 3, 'seeds 0 .. N-1 (added to config.seed)')
  flags.DEFINE_list('quantiles', ['0.8', '0.5'], 'class-wise confidence '
                    'quantiles of the round-2 pseudo labels, each in (0, 1)')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  try:
    options = flags.FLAGS
    quantiles = parse_quantiles(options.quantiles)
    result = run_rounds(options.config, options.workdir, options.seeds,
                        quantiles)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(markdown(result['rows']))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=flag_errors.parse_flags)
