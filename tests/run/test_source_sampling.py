"""`data.source_sampling` in a run (spcl_jax/run/source_sampling.py and
config_checks): the configs' defaults, bad values, resuming, a source
without labels, the statistics made before training, and the report's
sampled class shares."""

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import default
from configs import demo
from configs import gta5
from configs import synscapes
from configs import synthia
from spcl_jax.data import class_statistics
from spcl_jax.data import loaders
from spcl_jax.data import sources
from spcl_jax.run import config_checks
from spcl_jax.run import context
from spcl_jax.run import source_sampling
from spcl_jax.run import stage_graph
from tests.data import fake_records


@pytest.fixture(scope='module')
def rare_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('rare_manual')
  data_dir = str(tmp_path_factory.mktemp('rare_tfds'))
  return data_dir, fake_records.build_rare_class_folder(str(root), data_dir)


def _smoke(data_dir, **data):
  config = demo.get_config('smoke')
  config.data.data_dir = str(data_dir)
  config.data.update(data)
  return config


def test_gta5_and_synthia_sample_class_balanced_and_the_rest_uniform():
  for module in (gta5, synthia):
    config = module.get_config()
    assert config.data.source_sampling == 'class_balanced'
    assert module.get_config('released').data.source_sampling == (
        'class_balanced')
  for config in (default.get_config(), synscapes.get_config(),
                 demo.get_config()):
    assert config.data.source_sampling == 'uniform'
  oracle = default.get_config()
  oracle.data.source_sampling = 'class_balanced'
  default.oracle(oracle)   # the target's own frequencies
  assert oracle.data.source_sampling == 'uniform'
  data = default.get_config().data
  assert (data.source_sampling_sub_epoch,
          data.source_sampling_log_offset) == (3000, 1.01)


@pytest.mark.parametrize('field,value,expected', [
    ('source_sampling', 'balanced',
     "data.source_sampling: 'balanced', expected one of ('uniform', "
     "'class_balanced')"),
    ('source_sampling_sub_epoch', 0,
     'data.source_sampling_sub_epoch = 0 must be an integer >= 1'),
    ('source_sampling_sub_epoch', -5,
     'data.source_sampling_sub_epoch = -5 must be an integer >= 1'),
    ('source_sampling_log_offset', 1.0,
     'data.source_sampling_log_offset = 1.0 must be a number > 1'),
    ('source_sampling_log_offset', float('nan'),
     'data.source_sampling_log_offset = nan must be a number > 1'),
])
def test_bad_values_are_refused_naming_the_field(field, value, expected):
  config = gta5.get_config()
  config.data[field] = value
  with pytest.raises(ValueError) as e:
    config_checks.validate(config, num_devices=4)
  assert expected in str(e.value)


def test_resuming_with_another_sampling_is_refused(tmp_path):
  """The sampling changes which source images a stage reads: a workdir
  started with one resumes with it only. A workdir written before the
  field existed read uniformly: that is no change."""
  config = _smoke(tmp_path)
  config_checks.check_workdir_config(config, str(tmp_path), False)
  config.data.source_sampling = 'class_balanced'
  with pytest.raises(config_checks.ConfigMismatchError,
                     match="data.source_sampling: 'uniform' -> "
                           "'class_balanced'"):
    config_checks.check_workdir_config(config, str(tmp_path), False)
  config_checks.check_workdir_config(config, str(tmp_path), True)  # allowed
  older = config_checks.config_to_json(_smoke(tmp_path))
  for field in ('source_sampling', 'source_sampling_sub_epoch',
                'source_sampling_log_offset'):
    del older['data'][field]
  (tmp_path / 'config.json').write_text(json.dumps(older))
  config_checks.check_workdir_config(_smoke(tmp_path), str(tmp_path), False)
  (tmp_path / 'config.json').write_text(json.dumps(older))
  with pytest.raises(config_checks.ConfigMismatchError,
                     match="data.source_sampling: '<absent>' -> "
                           "'class_balanced'"):
    config_checks.check_workdir_config(config, str(tmp_path), False)
  # an older workdir's config builds its source spec as it ran: uniform
  ctx = context.Context(ml_collections.ConfigDict(older), '/nowhere',
                        mesh=None, writer=None)
  spec = context.train_specs(ctx, ctx.stage('warmup'))['source_iterator']
  assert spec.sampling == 'uniform'


def test_an_images_only_source_is_refused_before_anything_runs(rare_folder,
                                                               tmp_path):
  data_dir, name = rare_folder
  config = _smoke(data_dir, source=name, source_split='bare',
                  source_sampling='class_balanced')
  config.stages_to_run = ('warmup',)
  with pytest.raises(ValueError) as e:
    config_checks.check_datasets(config, str(tmp_path / 'w'))
  assert str(e.value) == (
      "data.source_sampling = 'class_balanced' needs the source's labels, "
      f"but split 'bare' of dataset '{name}' (data.source) was built without "
      "labels (images only); use data.source_sampling = 'uniform' or a "
      'labelled source')
  assert not (tmp_path / 'w').exists()
  config.data.source_sampling = 'uniform'   # not this check's business
  config_checks.check_datasets(config, str(tmp_path / 'w'))
  config.data.source_sampling = 'class_balanced'
  config.stages_to_run = ('prototypes', 'pseudo_labels')   # no training
  config_checks.check_datasets(config, str(tmp_path / 'w'))


def test_which_stages_sample_the_source_class_balanced():
  config = _smoke('/nowhere', source_sampling='class_balanced')
  stages = stage_graph.STAGES
  assert source_sampling.samples_class_balanced(config, stages)
  config.stages_to_run = ('prototypes', 'pseudo_labels', 'self_training')
  assert not source_sampling.samples_class_balanced(config, stages)
  config.stages.self_training.source_batch_size = 2   # joint self-training
  assert source_sampling.samples_class_balanced(config, stages)
  config.data.source_sampling = 'uniform'
  assert not source_sampling.samples_class_balanced(config, stages)


def _ctx(config, workdir):
  return context.Context(config, str(workdir), mesh=None, writer=None)


def test_missing_statistics_are_made_before_training(rare_folder, tmp_path):
  data_dir, name = rare_folder
  path = class_statistics.statistics_path(
      sources.dataset_directory(name, data_dir), 'train')
  if os.path.exists(path):
    os.remove(path)
  config = _smoke(data_dir, source=name, source_split='train')
  source_sampling.ensure_statistics(_ctx(config, tmp_path))   # uniform
  assert not os.path.exists(path)
  config.data.source_sampling = 'class_balanced'
  config.stages_to_run = ('warmup',)
  (tmp_path / 'warmup').mkdir()
  (tmp_path / 'warmup' / 'done.json').write_text('{}')   # finished
  source_sampling.ensure_statistics(_ctx(config, tmp_path))
  assert not os.path.exists(path)
  os.remove(tmp_path / 'warmup' / 'done.json')
  source_sampling.ensure_statistics(_ctx(config, tmp_path))
  assert os.path.isfile(path)


@pytest.mark.parametrize('sampling', ['class_balanced', 'uniform'])
def test_the_report_shares_are_those_of_the_images_read(rare_folder,
                                                        sampling):
  """The report's class shares, computed from the statistics and the
  sampled keys, equal those of the images a stage's loader read."""
  data_dir, name = rare_folder
  class_statistics.load_or_compute(name, 'train', data_dir)
  spec = loaders.PipelineSpec(name, 'train', data_dir, 4, seed=5,
                              sampling=sampling, sub_epoch_draws=7)
  steps = 6
  report = source_sampling.stage_report(spec, steps)
  iterator = iter(loaders.train_loader(spec))
  read = [int(i) for _ in range(steps) for i in next(iterator)['image_id']]
  contains = np.array([np.isin(np.arange(19),
                               fake_records.rare_class_trainids(i))
                       for i in read])
  expected = 100 * contains.mean(axis=0)
  assert report['rule'] == sampling and report['images'] == 24
  shares = report['class_shares']
  assert list(shares)[:2] == ['road', 'sidewalk'] and shares['road'] == 100
  np.testing.assert_allclose(list(shares.values()), expected, atol=1e-3)
  assert source_sampling.stage_report(None, steps) == {}


def test_a_uniform_report_without_statistics_has_no_shares(tiny_demo):
  spec = loaders.PipelineSpec('sim2real_demo/tiny', 'target_train',
                              tiny_demo, 4, seed=5)
  path = class_statistics.statistics_path(
      sources.dataset_directory(spec.dataset, tiny_demo), 'target_train')
  assert not os.path.exists(path)
  assert source_sampling.stage_report(spec, 3) == {'rule': 'uniform',
                                                   'images': 12}
