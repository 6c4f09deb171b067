"""The training pipeline end to end on the tiny demo data: report, resume
after SIGTERM, two processes, NaN guard, config errors."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from spcl_jax.run import config_checks

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
STAGES = ['warmup', 'prototypes', 'pseudo_labels', 'spcl', 'pseudo_labels_2',
          'self_training']


def _main(workdir, data_dir, *flags, config='configs/demo.py:smoke',
          env=None, check=True):
  result = subprocess.run(
      [sys.executable, '-m', 'spcl_jax.main', f'--config={config}',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *flags],
      cwd=ROOT, capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': '', **(env or {})})
  if check and result.returncode != 0:
    raise AssertionError(f'exit {result.returncode}\n{result.stderr[-6000:]}')
  return result


def _tree(path):
  """A saved tree as arrays on this process's first device, whatever the
  devices and processes that saved it."""
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      checkpointer.metadata(os.path.abspath(path)).item_metadata)
  return checkpointer.restore(os.path.abspath(path), abstract)


def _assert_trees_close(a, b, atol):
  flat_a, flat_b = _flatten(a), _flatten(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_allclose(flat_a[key], flat_b[key], rtol=0, atol=atol,
                               err_msg=key)


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}/{k}'))
    return out
  return {prefix: np.asarray(tree)}


def _copy_stages_before_spcl(reference, workdir):
  for name in ('warmup', 'prototypes', 'pseudo_labels'):
    shutil.copytree(reference / name, workdir / name)
  shutil.copy(reference / 'config.json', workdir / 'config.json')


@pytest.fixture
def reference_run(smoke_reference):
  workdir, result = smoke_reference
  if result.returncode != 0:
    raise AssertionError(f'exit {result.returncode}\n{result.stderr[-6000:]}')
  return workdir, result


@pytest.mark.slow
def test_smoke_pipeline_writes_every_stage_and_rerun_skips(tiny_demo,
                                                           reference_run,
                                                           tmp_path):
  workdir, _ = reference_run
  report = json.loads((workdir / 'report.json').read_text())
  assert list(report['stages']) == STAGES
  for name, stage in report['stages'].items():
    assert 0.0 <= stage['miou'] <= 100.0, name
    assert set(stage['per_class_iou']) == set(
        report['stages']['warmup']['per_class_iou'])
  assert report['config']['model']['name'] == 'deeplabv2_resnet18'
  thresholds = report['stages']['pseudo_labels']['class_thresholds']
  assert len(thresholds) == 19 and all(0 <= t <= 0.9 for t in thresholds)
  assert report['stages']['prototypes']['classes_with_prototype'] >= 1
  # what each training stage's source stream sampled; a pass reads in file
  # order and does not repeat its model's entry
  for name in ('warmup', 'spcl'):
    sampled = report['stages'][name]['source_sampling']
    assert sampled['rule'] == 'uniform', name
    assert sampled['images'] == report['stages'][name]['steps'] * (
        report['config']['stages'][name]['source_batch_size']), name
  for name in ('prototypes', 'pseudo_labels', 'pseudo_labels_2',
               'self_training'):   # self-training reads no source here
    assert 'source_sampling' not in report['stages'][name], name
  assert os.listdir(workdir / 'tensorboard')
  for name in STAGES:
    assert (workdir / name / 'done.json').exists()
  rerun = tmp_path / 'rerun'   # a copy: the shared reference stays as is
  shutil.copytree(workdir, rerun)
  again = _main(rerun, tiny_demo)
  assert again.stderr.count('finished earlier, skipped') == len(STAGES)


@pytest.mark.slow
def test_sigterm_then_rerun_equals_uninterrupted(tiny_demo, reference_run,
                                                 tmp_path):
  reference, _ = reference_run
  _copy_stages_before_spcl(reference, tmp_path)
  # the signal lands while step 2 runs: that step finishes and is saved
  # (step 2 is also a periodic checkpoint step: saved once, not twice)
  first = _main(tmp_path, tiny_demo, '--config.testing.sigterm_stage=spcl',
                '--config.testing.sigterm_at_step=1', check=False)
  assert first.returncode == 75, first.stderr[-4000:]  # preempted: rerun
  assert 'preempted at step 2' in first.stderr
  assert not (tmp_path / 'spcl' / 'done.json').exists()
  assert sorted(os.listdir(tmp_path / 'spcl' / 'checkpoints'))[-1] == '2'
  second = _main(tmp_path, tiny_demo)  # resumes spcl at step 2, then the rest
  assert 'spcl: resuming from step 2' in second.stderr
  resumed = json.loads((tmp_path / 'report.json').read_text())['stages']
  reference_report = json.loads((reference / 'report.json').read_text())
  for name in ('spcl', 'self_training'):
    ours = resumed[name]['eval_history']
    theirs = reference_report['stages'][name]['eval_history']
    assert [h['step'] for h in ours] == [h['step'] for h in theirs] == [4]
    assert [h['miou'] for h in ours] == pytest.approx(
        [h['miou'] for h in theirs], abs=1e-4)
  for name, parts in (('spcl', ('model', 'prototypes')),
                      ('self_training', ('model',))):
    for part in parts:
      _assert_trees_close(_tree(tmp_path / name / part),
                          _tree(reference / name / part), atol=1e-6)


def _numbers(tree, prefix=''):
  """{path: number} of every number in a JSON tree (paths of lists by
  index)."""
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, list):
    items = enumerate(tree)
  else:
    return {prefix: tree} if isinstance(tree, (int, float)) else {}
  out = {}
  for key, value in items:
    out.update(_numbers(value, f'{prefix}/{key}'))
  return out


def _two_processes(workdir, data_dir, *flags_of_process_0,
                   config='configs/demo.py:smoke'):
  """[(exit status, stderr)] of the two processes of one smoke run (stderr
  through files: a full pipe would stall one process in a collective)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  logs = [tempfile.TemporaryFile('w+') for _ in range(2)]
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'spcl_jax.main',
       f'--config={config}', f'--workdir={workdir}',
       f'--config.data.data_dir={data_dir}',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}', *(flags_of_process_0 if i == 0 else ())],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=logs[i], text=True,
      env={**os.environ, 'XLA_FLAGS': ''}) for i in range(2)]
  outputs = []
  for process, log in zip(processes, logs):
    process.wait(timeout=900)
    log.seek(0)
    outputs.append((process.returncode, log.read()))
    log.close()
  return outputs


def test_whole_pipeline_on_two_processes_equals_one_process(
    tiny_demo, reference_run, tmp_path):
  """The two-process command of docs/operations.md runs all six stages. SIGTERM to
  process 0 alone during spcl stops both after the same step (exit 75);
  the rerun resumes there on both. Each process reads its slice of the
  one-process batches, so every stage's report equals the one-process
  run's (within float tolerance: the cross-device sums are ordered
  differently), the two processes hold identical states, and process 1
  writes only its own log beside process 0's files."""
  reference, _ = reference_run
  preempted = _two_processes(tmp_path, tiny_demo,
                             '--config.testing.sigterm_stage=spcl',
                             '--config.testing.sigterm_at_step=1')
  for status, err in preempted:
    assert status == 75, err[-4000:]
    assert 'spcl preempted at step 2' in err, err[-4000:]
  resumed = _two_processes(tmp_path, tiny_demo)
  for status, err in resumed:
    assert status == 0, err[-4000:]
    assert 'spcl: resuming from step 2' in err, err[-4000:]
  logs = [(tmp_path / name).read_text()   # both runs, appended
          for name in ('log.txt', 'log.process_1.txt')]
  for stage in ('warmup', 'spcl', 'self_training'):
    digests = [re.search(stage + r': process (\d) state digest (\w+)', log)
               for log in logs]
    assert [int(d.group(1)) for d in digests] == [0, 1], stage
    assert digests[0].group(2) == digests[1].group(2), stage
  ours = json.loads((tmp_path / 'report.json').read_text())['stages']
  theirs = json.loads((reference / 'report.json').read_text())['stages']
  assert list(ours) == list(theirs) == STAGES
  for name in STAGES:
    a, b = _numbers(ours[name]), _numbers(theirs[name])
    assert set(a) == set(b), name
    for key in a:
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-3,
                                     nan_ok=True), (name, key)
  assert sorted(os.listdir(tmp_path)) == sorted(
      os.listdir(reference) + ['log.process_1.txt'])
  for name in STAGES:
    for part in ('model', 'prototypes'):
      if (reference / name / part).exists():
        _assert_trees_close(_tree(tmp_path / name / part),
                            _tree(reference / name / part), atol=1e-4)


@pytest.mark.slow
def test_nan_loss_stops_with_step_term_and_checkpoint(tiny_demo, tmp_path):
  """The metrics are read at check points only (every 3 steps here, and
  at the evaluation of step 4): the message names the first step whose
  metrics were not finite, the check that found it and the last good
  checkpoint, and no checkpoint holds a non-finite state."""
  result = _main(tmp_path, tiny_demo, '--config.stages.warmup.lr=1e12',
                 '--config.stages.warmup.steps=6',
                 '--config.log_every_steps=3',
                 '--config.checkpoint.every_steps=3', config=
                 'configs/demo.py:smoke,warmup', check=False)
  assert result.returncode == 1
  message = re.search(
      r'stage warmup: non-finite (.*) at step (\d+) \(between steps (\d+) '
      r'and (\d+): .*found at the check after step (\d+).*', result.stderr)
  assert message, result.stderr[-3000:]
  # lr 1e12 blows up the parameters: the first non-finite metric is the loss
  # or, where the gradients overflow while the loss is still finite, the
  # gradient norm (which of the two depends on XLA's order of operations)
  assert re.search(r'\b(loss|grad_norm)\b', message.group(1)), message.group(0)
  first, check = int(message.group(2)), int(message.group(5))
  assert (int(message.group(3)), int(message.group(4))) == (first - 1, first)
  assert first <= check and check in (3, 4, 6), message.group(0)
  assert ('last good checkpoint is step' in result.stderr
          or 'no checkpoint of this stage was written yet' in result.stderr)
  checkpoints = tmp_path / 'warmup' / 'checkpoints'
  for step in (os.listdir(checkpoints) if checkpoints.exists() else []):
    assert int(step) < first, step
    state = _flatten(_tree(checkpoints / step / 'state'))
    assert all(np.isfinite(v).all() for v in state.values()), step
  assert not (tmp_path / 'warmup' / 'done.json').exists()


def test_joint_self_training_reads_source_batches(tiny_demo, reference_run,
                                                  tmp_path):
  reference, _ = reference_run
  for name in STAGES[:-1]:
    shutil.copytree(reference / name, tmp_path / name)
  bad = _main(tmp_path, tiny_demo,
              '--config.stages.self_training.source_batch_size=-8',
              config='configs/demo.py:smoke,self_training', check=False)
  assert bad.returncode != 0
  assert 'stages.self_training.source_batch_size = -8' in bad.stderr
  _main(tmp_path, tiny_demo, '--config.stages.self_training.source_batch_size=8',
        config='configs/demo.py:smoke,self_training')
  report = json.loads((tmp_path / 'report.json').read_text())
  assert report['stages']['self_training']['steps'] == 4
  joint = _flatten(_tree(tmp_path / 'self_training' / 'model'))
  alone = _flatten(_tree(reference / 'self_training' / 'model'))
  assert any(not np.allclose(joint[k], alone[k]) for k in joint)


def test_stage_without_inputs_says_which_stage_to_run(tiny_demo, tmp_path):
  result = _main(tmp_path, tiny_demo, config='configs/demo.py:smoke,spcl',
                 check=False)
  assert result.returncode == 1
  assert "needs the output of stage 'warmup'" in result.stderr
  assert ':warmup' in result.stderr
  # said once, as every command says it, and kept in the log file
  assert result.stderr.count("needs the output of stage 'warmup'") == 1
  assert "error: stage 'spcl' needs the output" in result.stderr
  assert "needs the output of stage 'warmup'" in (
      tmp_path / 'log.txt').read_text()


def test_unknown_key_and_wrong_type_fail_before_compiling(tiny_demo,
                                                          tmp_path):
  typo = _main(tmp_path, tiny_demo, '--config.stages.warmup.lrr=1', check=False)
  assert typo.returncode != 0 and 'lrr' in typo.stderr
  wrong = _main(tmp_path, tiny_demo, '--config.stages.warmup.steps=many',
                check=False)
  assert wrong.returncode != 0 and 'steps' in wrong.stderr
  assert not (tmp_path / 'warmup').exists()


@pytest.mark.parametrize('flag', ['--workdir=s3://bucket/run',
                                  '--config.data.data_dir=s3://bucket/tfds'])
def test_remote_urls_are_refused_before_anything_is_written(tmp_path, flag):
  """A workdir or a data directory is local or gs:// (tests/
  test_remote_workdir.py, test_remote_data_dir.py), no other URL: a clear
  error, not a local folder named `s3:`."""
  refusal = 'the only remote storage supported is gs://'
  flags = ['--config=' + os.path.join(ROOT, 'configs', 'demo.py') + ':smoke',
           f'--workdir={tmp_path / "w"}', flag]
  result = subprocess.run(
      [sys.executable, '-m', 'spcl_jax.main', *flags], cwd=tmp_path,
      capture_output=True, text=True, check=False,
      env={**os.environ, 'XLA_FLAGS': '', 'PYTHONPATH': ROOT})
  assert result.returncode == 1, result.stderr[-3000:]
  assert f'error: {flag}: {refusal}' in result.stderr, result.stderr[-3000:]
  assert os.listdir(tmp_path) == []   # neither `gs:` nor the workdir


def test_workdir_of_another_config_is_refused(tiny_demo, tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'seed': 1}))
  result = _main(tmp_path, tiny_demo, check=False)
  assert result.returncode == 1
  assert 'seed: 1 -> 0' in result.stderr
  assert '--allow_config_change' in result.stderr


def test_written_pseudo_labels_take_the_self_training_path_apart():
  from spcl_jax.run import pass_stages
  ignore = 255
  model = np.array([[0, 1, ignore], [2, 2, 1]], np.uint8)
  truth = np.array([[0, 2, 1], [2, ignore, 1]], np.uint8)
  written = {mode: pass_stages.written_pseudo_labels(mode, model, truth)
             for mode in pass_stages.LABEL_SOURCES}
  np.testing.assert_array_equal(written['model'], model)
  np.testing.assert_array_equal(written['stored'], truth)
  # the model's coverage (5 pixels kept), every kept label the true one
  np.testing.assert_array_equal(written['stored_where_kept'],
                                [[0, 2, ignore], [2, ignore, 1]])
  # the model's labels where right: its wrong 1 and its wrong 2 are dropped
  np.testing.assert_array_equal(written['model_where_correct'],
                                [[0, ignore, ignore], [2, ignore, 1]])
  with pytest.raises(ValueError, match="'truth'.*expected one of"):
    pass_stages.written_pseudo_labels('truth', model, truth)


def test_source_geometry_switch_builds_the_source_stream():
  from configs import demo
  from spcl_jax.data import loaders
  from spcl_jax.data import transforms
  from spcl_jax.run import context
  from spcl_jax.run import stage_graph
  config = demo.get_config()

  def source_spec():
    ctx = context.Context(config, '/nowhere', mesh=None, writer=None)
    return context.train_specs(
        ctx, stage_graph.STAGE_BY_NAME['warmup'])['source_iterator']

  released = source_spec()   # resized to source_size, no crop, no flip
  assert released.size == (128, 256)
  assert (released.crop, released.scale_range, released.flip) == (
      None, None, False)
  assert not any(isinstance(op, transforms.RandomScaleCropFlip)
                 for op in loaders.transforms_of(released))
  config.data.source_scale_range = (0.5, 1.0)
  config.data.source_crop_size = (96, 192)
  config.data.source_flip = True
  cropped = source_spec()
  assert cropped.size is None  # scaled from the original, then cropped
  assert (cropped.crop, cropped.scale_range, cropped.flip) == (
      (96, 192), (0.5, 1.0), True)
  assert [type(op).__name__ for op in loaders.transforms_of(cropped)][-2:] == [
      'RandomScaleCropFlip', 'Normalize']
  config_checks.validate(config, num_devices=1)
  config.data.source_crop_from = 'resized'   # DAFormer's: resize, then crop
  resized = source_spec()
  assert resized.size == (128, 256)
  names = [type(op).__name__ for op in loaders.transforms_of(resized)]
  assert names.index('Resize') < names.index('RandomScaleCropFlip')
  assert 'Resize' not in [type(op).__name__
                          for op in loaders.transforms_of(cropped)]
  config_checks.validate(config, num_devices=1)
  config.data.source_crop_from = 'resised'
  with pytest.raises(ValueError, match=r"source_crop_from: 'resised'"):
    config_checks.validate(config, num_devices=1)
  config.data.source_crop_from = 'original'
  config.data.source_crop_size = ()
  with pytest.raises(ValueError, match=r'source_scale_range = \(0.5, 1.0\) '
                     'needs data.source_crop_size'):
    config_checks.validate(config, num_devices=1)
  config.data.source_scale_range = ()
  config.data.source_crop_from = 'resized'
  with pytest.raises(ValueError, match=r"source_crop_from = 'resized' needs "
                     'data.source_crop_size'):
    config_checks.validate(config, num_devices=1)


def test_negative_source_weight_is_refused():
  from configs import demo
  config = demo.get_config()
  config.stages.self_training.source_weight = -1.0
  with pytest.raises(ValueError, match=r'source_weight = -1.0 must be >= 0'):
    config_checks.validate(config, num_devices=1)


@pytest.mark.parametrize('quantile', [0.0, 1.0, 1.5])
def test_threshold_quantile_outside_0_1_is_refused(quantile):
  from configs import demo
  config = demo.get_config()
  config.stages.pseudo_labels_2.threshold_quantile = quantile
  with pytest.raises(ValueError, match=r'stages.pseudo_labels_2.'
                     rf'threshold_quantile = {quantile}, expected a fraction'):
    config_checks.validate(config, num_devices=1)


@pytest.mark.slow
def test_vgg16_runs_every_stage(tiny_demo, tmp_path):
  """VGG-16 has no BatchNorm (no `batch_stats` collection): every stage
  runs, with trainable-BN stages (the smoke config trains BN) included; the
  smoke config's base_width 16 narrows it 4x (fc6/fc7: 256 wide)."""
  _main(tmp_path, tiny_demo, '--config.model.name=deeplabv2_vgg16',
        '--config.model.pretrained_dir=',
        '--config.chain_model=best',  # also loads the `best` checkpoints
        '--config.stages.warmup.steps=1', '--config.stages.spcl.steps=1',
        '--config.stages.self_training.steps=1',
        '--config.stages.warmup.eval_every_steps=1',
        '--config.stages.spcl.eval_every_steps=1',
        '--config.stages.self_training.eval_every_steps=1')
  report = json.loads((tmp_path / 'report.json').read_text())
  assert list(report['stages']) == STAGES
  assert report['config']['model']['name'] == 'deeplabv2_vgg16'
  for name in ('warmup', 'spcl', 'self_training'):
    assert report['stages'][name]['steps'] == 1, name
  assert not _tree(tmp_path / 'warmup' / 'model').get('batch_stats')


@pytest.mark.slow
def test_mit_demo_runs_every_stage(tiny_demo, tmp_path):
  """SegFormer on the demo's MiT (`:mit`, its shipped pretraining) runs
  the six stages: its prototypes are the head's 128-wide fused features,
  its optimiser AdamW with the MiT recipe's warm-up (clamped to the smoke
  run's 4 steps), its stochastic depth drawn in training."""
  _main(tmp_path, tiny_demo, config='configs/demo.py:mit,smoke')
  report = json.loads((tmp_path / 'report.json').read_text())
  assert list(report['stages']) == STAGES
  assert report['config']['model']['name'] == 'segformer_mit_demo'
  assert report['config']['stages']['warmup']['optimizer'] == 'adamw'
  for name in ('warmup', 'spcl', 'self_training'):
    assert report['stages'][name]['steps'] == 4, name
    assert np.isfinite(report['stages'][name]['miou']), name
  bank = _tree(tmp_path / 'prototypes' / 'prototypes')
  assert np.shape(bank['prototypes']) == (19, 128)
  model = _tree(tmp_path / 'self_training' / 'model')
  assert set(model['params']) == {'backbone', 'classifier'}
  assert set(model['batch_stats']['classifier']) == {'fuse_bn'}


@pytest.mark.parametrize('seed', [0, 7, 2_147_482, 2_147_483, 20_261_128,
                                  2**31 - 1])
def test_every_seed_below_2_31_gives_distinct_grain_seeds(seed):
  import grain  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import context  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import stage_graph  # pylint: disable=g-import-not-at-top
  seeds = {(stage.name, stream): context.stream_seed(seed, stage.name,
                                                     stream)
           for stage in stage_graph.STAGES
           for stream in context.SEED_STREAMS}
  assert len(set(seeds.values())) == len(seeds)
  for value in seeds.values():
    assert 0 <= value < 2**31
    grain.samplers.IndexSampler(10, shuffle=True, num_epochs=1, seed=value)
  assert seeds == {key: context.stream_seed(seed, *key)
                   for key in seeds}
  if seed == 7:  # earlier runs keep their streams
    assert seeds['spcl', 'target'] == 7031


@pytest.mark.parametrize('seed', [-1, 2**31])
def test_seed_outside_range_is_refused(seed):
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config('smoke')
  config.seed = seed
  with pytest.raises(ValueError, match=rf'seed = {seed} must be an integer '
                     r'in \[0, 2147483648\)'):
    config_checks.validate(config, num_devices=8)


def test_chain_model_picks_final_or_best_on_validation(tmp_path):
  from configs import default  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import context  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import stage_outputs  # pylint: disable=g-import-not-at-top
  (tmp_path / 'warmup').mkdir()
  (tmp_path / 'warmup' / 'done.json').write_text(json.dumps(
      {'best_step': 2000, 'steps': 40000}))
  config = default.get_config()
  ctx = context.Context(config, str(tmp_path), mesh=None, writer=None)
  assert stage_outputs.model_directory(ctx, 'warmup') == str(
      tmp_path / 'warmup' / 'model')
  config.chain_model = 'best'
  assert stage_outputs.model_directory(ctx, 'warmup') == str(
      tmp_path / 'warmup' / 'best' / '2000' / 'state')
  config.chain_model = 'latest'
  with pytest.raises(ValueError, match=r"chain_model: 'latest', expected "
                     r"one of \('final', 'best'\)"):
    config_checks.validate(config, num_devices=4)


def test_workdir_of_an_older_version_resumes_when_added_fields_keep_its_values(
    tmp_path):
  """Fields added after a workdir was written (micro-batches, remat, the
  read-ahead) are no change at the values that reproduce its run, and a
  change otherwise."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import config_checks  # pylint: disable=g-import-not-at-top
  config = demo.get_config('smoke')
  older = config_checks.config_to_json(config)
  del older['model']['remat']
  del older['data']['read_threads'], older['data']['read_ahead']
  for stage in older['stages'].values():
    stage.pop('micro_batches', None)
  (tmp_path / 'config.json').write_text(json.dumps(older))
  config_checks.check_workdir_config(config, str(tmp_path), False)
  config.model.remat = 'blocks'   # the same gradients: resumable
  config.data.read_ahead = 4      # the same batches, read less far ahead
  config_checks.check_workdir_config(config, str(tmp_path), False)
  (tmp_path / 'config.json').write_text(json.dumps(older))
  config.stages.spcl.micro_batches = 2
  with pytest.raises(config_checks.ConfigMismatchError,
                     match=r'stages.spcl.micro_batches: .<absent>. -> 2'):
    config_checks.check_workdir_config(config, str(tmp_path), False)



def test_the_commands_read_an_older_workdirs_config_without_read_ahead():
  """evaluate / predict / analyze build their specs from a workdir's own
  config.json: one written before `data.read_ahead` existed reads with the
  pipeline's defaults."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from spcl_jax.data import loaders  # pylint: disable=g-import-not-at-top
  from spcl_jax.run import context  # pylint: disable=g-import-not-at-top
  older = config_checks.config_to_json(demo.get_config('smoke'))
  del older['data']['read_threads'], older['data']['read_ahead']
  ctx = context.Context(ml_collections.ConfigDict(older), '/nowhere',
                        mesh=None, writer=None)
  spec = context.eval_spec(ctx, 'sim2real_demo/tiny', 'target_val', (64, 128),
                           2, resize_label=False)
  defaults = loaders.PipelineSpec('d', 's', '', 1)
  assert (spec.read_threads, spec.read_ahead) == (defaults.read_threads,
                                                  defaults.read_ahead)

@pytest.mark.parametrize('field,value,expected', [
    ('read_ahead', 0, r'data.read_ahead = 0 must be an integer >= 1'),
    ('read_ahead', -3, r'data.read_ahead = -3 must be an integer >= 1'),
    ('read_threads', -1, r'data.read_threads = -1 must be an integer >= 0'),
])
def test_a_read_ahead_of_no_record_is_refused(field, value, expected):
  from configs import gta5  # pylint: disable=g-import-not-at-top
  config = gta5.get_config()
  config.data[field] = value
  with pytest.raises(ValueError, match=expected):
    config_checks.validate(config, num_devices=1)
