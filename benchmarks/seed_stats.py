"""Statistics over seeds shared by the benchmarks that compare rows of runs
(benchmarks.ablation, benchmarks.self_training_rounds)."""

import math

import numpy as np


def mean_std(values) -> tuple:
  """Mean and sample standard deviation (None for one value)."""
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if len(values) > 1 else None
  return float(values.mean()), std


def paired_difference(values, baseline) -> dict:
  """Mean of per-seed differences and its standard error (None for 1 seed)."""
  d = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
  return {'mean': float(d.mean()), 'se': se}


def fmt(value, digits=1) -> str:
  """`value` to `digits` decimals; '–' for None."""
  return '–' if value is None else f'{value:.{digits}f}'


def fmt_difference(d) -> str:
  """A paired difference as '+m ± se'; '–' for none."""
  return '–' if d is None else f'{d["mean"]:+.1f} ± {fmt(d["se"])}'
