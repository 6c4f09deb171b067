"""The one-way import rule (.importlinter, docs/layout.md) holds for the
tree, and a module placed in the wrong layer fails it with the offending
import named."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('spcl_jax', 'data_prep', 'configs', 'benchmarks', 'tests')


def _lint_imports(cwd: str) -> subprocess.CompletedProcess:
  lint = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
  return subprocess.run([lint, '--no-cache'], cwd=cwd, capture_output=True,
                        text=True, timeout=600,
                        env={**os.environ, 'PYTHONPATH': cwd})


def test_the_tree_keeps_every_import_contract():
  result = _lint_imports(ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'broken' not in result.stdout.split('Contracts:')[-1].replace(
      '0 broken', '')


def _copy_tree(destination) -> str:
  for package in PACKAGES:
    shutil.copytree(os.path.join(ROOT, package), destination / package,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc',
                                                  '*.json', '*.png'))
  shutil.copy(os.path.join(ROOT, '.importlinter'), destination)
  return str(destination)


def _add_import(tree: str, module: str, line: str) -> None:
  path = os.path.join(tree, *module.split('.')) + '.py'
  with open(path, encoding='utf-8') as f:
    text = f.read()
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'{line}\n{text}')


def test_an_upward_import_fails_naming_the_import(tmp_path):
  tree = _copy_tree(tmp_path)
  _add_import(tree, 'spcl_jax.core.metrics',
              'from spcl_jax.run import pipeline')
  result = _lint_imports(tree)
  assert result.returncode != 0
  assert 'spcl_jax.core.metrics -> spcl_jax.run.pipeline (l.1)' in (
      result.stdout), result.stdout


def test_data_prep_outside_the_door_and_configs_from_spcl_jax_fail(tmp_path):
  tree = _copy_tree(tmp_path)
  _add_import(tree, 'spcl_jax.run.pipeline',
              'from data_prep import builders')
  _add_import(tree, 'spcl_jax.report.tables', 'from configs import default')
  result = _lint_imports(tree)
  assert result.returncode != 0
  assert 'spcl_jax.run.pipeline -> data_prep.builders (l.1)' in (
      result.stdout), result.stdout
  assert 'spcl_jax.report.tables -> configs.default (l.1)' in (
      result.stdout), result.stdout
