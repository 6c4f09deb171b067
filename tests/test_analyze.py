"""`python -m spcl_jax.analyze`: the Class Center Distance of its
feature-sampling path against a direct numpy reading of SPEC §4, the pixel
sample, bad input, and the command end to end on the finished smoke workdir
(read only)."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from configs import demo
from spcl_jax.core import labels as label_table
from spcl_jax.run import config_checks
from spcl_jax.run import feature_analysis
from spcl_jax.run import trained_model

ROOT = os.path.dirname(os.path.dirname(__file__))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

NUM_CLASSES = 6
ABSENT = 4          # a class no pixel has


def _random_batches(seed=0, num_batches=3, batch=2, grid=(4, 6), depth=5):
  """(features [B, h, w, N], labels [B, 2h, 2w], priorities [B, h, w]) per
  batch; class ABSENT never occurs, some pixels are ignored (255)."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(num_batches):
    features = rng.normal(size=(batch, *grid, depth)).astype(np.float32)
    features[..., 0] += 2.0   # classes overlap: distances of either sign
    labels = rng.choice([0, 1, 2, 3, 5, 255], size=(batch, 2 * grid[0],
                                                    2 * grid[1]))
    priorities = rng.random((batch, *grid)).astype(np.float32)
    batches.append((features, labels.astype(np.int32), priorities))
  return batches


def _accumulate(batches, pixels_per_class):
  stats = feature_analysis.DomainStatistics(NUM_CLASSES, pixels_per_class)
  step = jax.jit(feature_analysis.batch_statistics, static_argnums=(3, 4))
  for features, labels, priorities in batches:
    stats.add(step(features, labels, priorities, NUM_CLASSES,
                   pixels_per_class))
  return stats


def _numpy_pixels(batches):
  """Every labelled pixel: (normalised features [M, N], classes [M],
  priorities [M]); labels nearest-downsampled by 2 (PyTorch's rule: output
  index i reads input index floor(i * H / h) = 2 i)."""
  features, classes, priorities = [], [], []
  for f, labels, p in batches:
    small = labels[:, ::2, ::2]
    keep = small < NUM_CLASSES
    x = f[keep].astype(np.float64)
    features.append(x / np.maximum(np.linalg.norm(x, axis=-1,
                                                  keepdims=True), 1e-12))
    classes.append(small[keep])
    priorities.append(p[keep])
  return (np.concatenate(features), np.concatenate(classes),
          np.concatenate(priorities))


def _numpy_ccd(features, classes):
  """SPEC §4 / appendix Eq. 10, directly: for class c, the mean squared
  distance of its features to μ_c over ||μ_c - μ_k||², averaged over the
  other classes k present."""
  present = sorted(set(classes.tolist()))
  mu = {c: features[classes == c].mean(0) for c in present}
  result = np.full(NUM_CLASSES, np.nan)
  for c in present:
    intra = np.mean(np.sum((features[classes == c] - mu[c]) ** 2, -1))
    result[c] = np.mean([intra / np.sum((mu[c] - mu[k]) ** 2)
                         for k in present if k != c])
  return result


def test_ccd_of_the_sampling_path_matches_numpy():
  batches = _random_batches()
  stats = _accumulate(batches, pixels_per_class=3)
  features, classes, _ = _numpy_pixels(batches)
  expected = _numpy_ccd(features, classes)
  got = stats.class_center_distance()
  assert np.isnan(got[ABSENT]) and np.isnan(expected[ABSENT])
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.all(np.isfinite(np.delete(got, ABSENT)))
  np.testing.assert_array_equal(
      stats.counts, np.bincount(classes, minlength=NUM_CLASSES))
  # the accumulation does not depend on how the pixels are batched
  one_batch = [tuple(np.concatenate(parts) for parts in zip(*batches))]
  np.testing.assert_allclose(
      _accumulate(one_batch, 3).class_center_distance(), got, rtol=1e-5)


def test_pixel_sample_is_the_lowest_priorities_of_each_class():
  batches = _random_batches(seed=1)
  per_class = 4
  stats = _accumulate(batches, per_class)
  features, classes, priorities = _numpy_pixels(batches)
  got_features, got_classes, got_priorities = stats.sample()
  for c in range(NUM_CLASSES):
    mine = np.nonzero(classes == c)[0]
    chosen = mine[np.argsort(priorities[mine], kind='stable')[:per_class]]
    assert len(chosen) == min(per_class, np.sum(classes == c))
    np.testing.assert_array_equal(got_classes[got_classes == c],
                                  np.full(len(chosen), c))
    np.testing.assert_array_equal(got_priorities[got_classes == c],
                                  priorities[chosen])
    np.testing.assert_allclose(got_features[got_classes == c],
                               features[chosen], rtol=1e-6, atol=1e-6)
  # fewer pixels than asked: every pixel of the class
  everything = _accumulate(batches, 10_000).sample()
  assert len(everything[1]) == len(classes)
  # the t-SNE points: as many as asked, the same for the same seed
  pools = {'source': got_priorities, 'target': got_priorities[:5]}
  chosen = feature_analysis.tsne_selection(pools, 7, seed=3)
  assert sum(len(v) for v in chosen.values()) == 7
  assert all(np.all(v < len(pools[d])) for d, v in chosen.items())
  again = feature_analysis.tsne_selection(pools, 7, seed=3)
  assert all(np.array_equal(chosen[d], again[d]) for d in feature_analysis.DOMAINS)


def _partial_workdir(tmp_path, finished):
  workdir = tmp_path / 'partial'
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps(
      config_checks.config_to_json(demo.get_config('smoke'))))
  for stage in finished:
    (workdir / stage).mkdir()
    (workdir / stage / 'done.json').write_text('{}')
  return workdir


def test_a_missing_stage_lists_the_stages_that_exist(tmp_path):
  workdir = _partial_workdir(tmp_path, ['warmup', 'prototypes'])
  out = tmp_path / 'out'
  with pytest.raises(trained_model.StageNotAvailableError,
                     match=r"'spcl' is not finished.*\['warmup', "
                           r"'prototypes'\].*\['warmup'\]"):
    feature_analysis.analyze(str(workdir), str(out), stages=['spcl'])
  with pytest.raises(trained_model.StageNotAvailableError,
                     match=r"'prototypes' is a prototypes stage"):
    feature_analysis.analyze(str(workdir), str(out),
                             stages=['warmup', 'prototypes'])
  empty = _partial_workdir(tmp_path / 'e', [])
  with pytest.raises(trained_model.StageNotAvailableError,
                     match=r"none of the default stages \['warmup', 'spcl'\]"
                           r".*finished stages in .*: none"):
    feature_analysis.analyze(str(empty), str(out))
  with pytest.raises(ValueError, match='--tsne_iterations'):
    feature_analysis.analyze(str(workdir), str(out), stages=['warmup'],
                             tsne_iterations=10)
  assert not out.exists()


# ------------------------------------------------------------ end to end --

@pytest.fixture
def reference(smoke_workdir):
  return smoke_workdir


def _run(*args):
  return subprocess.run(
      [sys.executable, '-m', 'spcl_jax.analyze', *args], cwd=ROOT,
      capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': ''})


def _check_png(path):
  data = path.read_bytes()
  assert len(data) > 1000 and data.startswith(PNG_MAGIC), path
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == 'PNG' and min(image.size) > 100


@pytest.mark.slow
def test_analyze_end_to_end(reference, tmp_path):
  out = tmp_path / 'out'
  result = _run(f'--workdir={reference}', f'--output={out}',
                '--num_images=4', '--pixels_per_class=4',
                '--tsne_points=40', '--tsne_iterations=250')
  assert result.returncode == 0, result.stderr[-6000:]
  assert 'warmup: mean class center distance' in result.stdout
  for name in ('ccd.png', 'tsne.png'):
    _check_png(out / name)
  report = json.loads((out / 'ccd.json').read_text())
  names = list(label_table.class_names('cityscapes19'))
  assert report['classes'] == names
  assert list(report['models']) == ['spcl', 'warmup']   # sorted keys
  for domain in feature_analysis.DOMAINS:
    assert report[domain]['num_images'] == 4
    assert len(set(report[domain]['image_indices'])) == 4
  for stage, entry in report['models'].items():
    assert entry['stage'] == stage
    assert entry['model_directory'] == str(reference / stage / 'model')
    for domain in feature_analysis.DOMAINS:
      ccd, pixels = entry[domain]['per_class'], entry[domain]['pixels']
      assert list(ccd) == sorted(names) and list(pixels) == sorted(names)
      present = [n for n in names if pixels[n] > 0]
      assert len(present) >= 2
      assert all((ccd[n] is None) == (pixels[n] == 0) for n in names)
      # >= 0: a class of one pixel has no spread
      assert all(ccd[n] >= 0 and math.isfinite(ccd[n]) for n in present)
      assert entry[domain]['mean'] > 0
      assert entry[domain]['mean'] == pytest.approx(
          np.mean([ccd[n] for n in present]))
  # the same pixels for both models, different features
  assert (report['models']['warmup']['target']['pixels'] ==
          report['models']['spcl']['target']['pixels'])
  assert (report['models']['warmup']['target']['per_class'] !=
          report['models']['spcl']['target']['per_class'])
  assert not (reference / 'analysis').exists()

  # deterministic: in-process, on the 8 simulated devices, the same result
  again, _ = feature_analysis.analyze(str(reference), str(tmp_path / 'again'),
                                      num_images=4, pixels_per_class=4,
                                      tsne_points=0)
  assert not (tmp_path / 'again' / 'tsne.png').exists()
  for stage, entry in report['models'].items():
    for domain in feature_analysis.DOMAINS:
      assert again['models'][stage][domain]['pixels'] == entry[domain][
          'pixels']
      for name, value in entry[domain]['per_class'].items():
        other = again['models'][stage][domain]['per_class'][name]
        # float32 sums, summed in another order on 8 devices
        assert (value is None and other is None) or other == pytest.approx(
            value, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_analyze_bad_input(reference, tmp_path, monkeypatch):
  result = _run(f'--workdir={reference}', f'--output={tmp_path / "o"}',
                '--stage=warmup,pseudo_labels')
  assert result.returncode == 1
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith('error: ') and 'no model' in error
  assert "['warmup', 'spcl', 'self_training']" in error
  assert not (tmp_path / 'o').exists()
  # an output directory that cannot be written: refused before any model
  # is loaded
  def no_compute(*args, **kwargs):
    raise AssertionError('a model was loaded')
  monkeypatch.setattr(trained_model, 'load', no_compute)
  blocked = tmp_path / 'a_file'
  blocked.write_text('')
  with pytest.raises(PermissionError,
                     match='cannot write to the output directory'):
    feature_analysis.analyze(str(reference), str(blocked / 'out'))


def test_stages_of_an_experiment_that_extends_the_pipeline_are_found(
    tmp_path):
  """A workdir of benchmarks/self_training_rounds.py: its extra stages are
  chosen by name, a training one (it saved a model) by default, the
  pseudo-label one refused as having no model."""
  workdir = _partial_workdir(tmp_path, ['warmup', 'self_training',
                                        'pseudo_labels_round2_q80',
                                        'self_training_round2_q80'])
  (workdir / 'self_training_round2_q80' / 'model').mkdir()
  (workdir / 'pseudo_labels_round2_q80' / 'labels').mkdir()
  (workdir / 'notes').mkdir()   # no done.json: not a stage
  assert trained_model.finished_stage_kinds(str(workdir)) == {
      'warmup': 'train', 'self_training': 'train',
      'pseudo_labels_round2_q80': 'pseudo_labels',
      'self_training_round2_q80': 'train'}
  assert trained_model.choose_stage(str(workdir)) == (
      'self_training_round2_q80')
  assert trained_model.choose_stage(
      str(workdir), 'self_training_round2_q80') == 'self_training_round2_q80'
  with pytest.raises(trained_model.StageNotAvailableError,
                     match="'pseudo_labels_round2_q80' is a pseudo_labels "
                           'stage and has no model'):
    trained_model.choose_stage(str(workdir), 'pseudo_labels_round2_q80')
  with pytest.raises(trained_model.StageNotAvailableError,
                     match="unknown stage 'self_training_round3'"):
    trained_model.choose_stage(str(workdir), 'self_training_round3')
