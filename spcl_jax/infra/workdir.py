"""Workdir hygiene: atomic writes, the temporary names our writers use,
their removal after a crash, and the deterministic crash hook of the tests.

Every write of the pipeline goes through a temporary name and a rename, so
a `kill -9` leaves at most a temporary file or folder behind, never a
half-written output under its final name (in a `gs://` workdir, which has
no rename: one object upload per file, see spcl_jax/infra/storage.py).
`remove_litter` deletes those temporaries on the next run; it matches only
the names listed in `LITTER_PATTERNS` (never a user's file), and only
where our writers put them (the workdir, its stage folders and their
`labels`).
"""

import io
import json
import os
import re
import shutil
import signal
import tempfile
from typing import IO, Callable

from absl import logging

from spcl_jax.infra import console
from spcl_jax.infra import storage

# Temporary names of our own writers (matched against a file or folder's
# base name), by where the writers put them:
# write_atomically: tempfile.mkstemp(prefix='.<file name>.tmp-') (before:
# prefix '.tmp-'); mkstemp's suffix is 8 of [a-z0-9_]. The files of the
# workdir written so: config, report, done, eval_history (JSON) and a
# training stage's table (markdown, CSV).
_JSON_TMP = re.compile(r'\.(?:(?:(?:config|report|done|eval_history)\.json'
                       r'|table\.(?:md|csv))\.)?tmp-[a-z0-9_]{8}')
# checkpoint.save_tree: '.<output>.writing' / '.<output>.replaced', and
# orbax's temporary folder of a tree being written ('<path>.orbax-checkpoint-
# tmp[-<timestamp>]').
_TREE_TMP = re.compile(r'\.(?:model|prototypes)\.(?:writing|replaced)'
                       r'|\.?(?:model|prototypes)(?:\.writing)?'
                       r'\.orbax-checkpoint-tmp(?:-\d+)?')
# PseudoLabelWriter: tempfile.mkdtemp(prefix='.<shard stem>.tmp-').
_SHARD_TMP = re.compile(r'\.pseudo_labels-\d{5}-of-\d{5}\.tmp-[a-z0-9_]{8}')
# folder (relative to the workdir; '<stage>' = each stage's) -> patterns
LITTER_PATTERNS = {
    '': (_JSON_TMP,),
    '<stage>': (_JSON_TMP, _TREE_TMP),
    '<stage>/labels': (_SHARD_TMP,),
}

# TFDS builds into '<parent>/incomplete.<6 of [A-Z0-9]>_<version>' and
# renames it to '<parent>/<version>' when complete.
TFDS_INCOMPLETE = re.compile(r'incomplete\.[A-Z0-9]{6}_(?P<version>[\w.]+)')


def write_atomically(path: str, write: Callable[[IO], None],
                     binary: bool = False) -> None:
  """Calls `write(file)` on a temporary file `.<name>.tmp-*` in `path`'s
  directory, then renames it to `path`: a reader sees the whole file or
  none (the temporary is removed if `write` fails; one left by a kill is
  removed by `remove_litter` where our writers put it). A `gs://` path is
  written in memory and uploaded as one object, which is atomic itself."""
  if storage.is_remote(path):
    buffer = io.BytesIO() if binary else io.StringIO()
    write(buffer)
    data = buffer.getvalue()
    storage.write_object(path, data if binary else data.encode('utf-8'))
    return
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{name}.tmp-', dir=directory)
  try:
    with os.fdopen(fd, 'wb' if binary else 'w') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Atomic text write (`write_atomically`)."""
  write_atomically(path, lambda f: f.write(text))


def write_json(path: str, data, sort_keys: bool = True) -> None:
  """Atomic JSON write (`write_atomically`)."""
  write_atomically(path, lambda f: json.dump(
      data, f, indent=2, sort_keys=sort_keys, default=float))


def read_json(path: str):
  """The JSON file `path` (ours: written by `write_json`); one that is not
  JSON is a ValueError naming it (our writes are atomic, so it was edited
  or damaged outside a run)."""
  try:
    return json.loads(storage.read_bytes(path))
  except ValueError as e:   # not JSON, not UTF-8
    raise ValueError(f'{path} is not JSON ({e}); it is written by the '
                     'pipeline: restore it, or delete it (a done.json: '
                     'the stage is done again) and rerun') from e


def _litter_folders(workdir: str, stage_names):
  """(folder, patterns) of every place our writers use temporary names."""
  for where, patterns in LITTER_PATTERNS.items():
    if '<stage>' in where:
      for name in stage_names:
        yield os.path.join(workdir, where.replace('<stage>', name)), patterns
    else:
      yield os.path.join(workdir, where), patterns


def litter_paths(workdir: str, stage_names) -> list[str]:
  """Our temporary files and folders in `workdir` and its stage folders,
  sorted."""
  found = []
  for folder, patterns in _litter_folders(workdir, stage_names):
    if storage.isdir(folder):
      found += [os.path.join(folder, entry) for entry in storage.listdir(folder)
                if any(p.fullmatch(entry) for p in patterns)]
  return sorted(p if storage.is_remote(p) else os.path.normpath(p)
                for p in found)


def remove_litter(workdir: str, stage_names) -> list[str]:
  """Deletes what an interrupted run left under temporary names; returns
  the paths deleted. Call it before anything is written."""
  removed = litter_paths(workdir, stage_names)
  for path in removed:
    logging.info('removing %s (left by an interrupted run)', path)
    storage.rmtree(path)
  return removed


def incomplete_tfds_builds(parent: str) -> list[str]:
  """TFDS `incomplete.*_<version>` folders in `parent` (a dataset's or a
  dataset config's folder) whose version is built: an interrupted build
  whose redo has finished. Those of a version not built yet are kept (a
  build may be running)."""
  if not os.path.isdir(parent):
    return []
  found = []
  for entry in sorted(os.listdir(parent)):
    match = TFDS_INCOMPLETE.fullmatch(entry)
    if match and os.path.exists(os.path.join(
        parent, match['version'], 'dataset_info.json')):
      found.append(os.path.join(parent, entry))
  return found


def remove_incomplete_tfds_builds(parent: str) -> list[str]:
  """Deletes `incomplete_tfds_builds(parent)`; a folder that cannot be
  deleted (a read-only data directory) is reported, not fatal."""
  removed = []
  for path in incomplete_tfds_builds(parent):
    try:
      shutil.rmtree(path)
    except OSError as e:
      logging.warning('cannot remove the interrupted TFDS build %s: %s',
                      path, e)
      continue
    logging.info('removed the interrupted TFDS build %s', path)
    removed.append(path)
  return removed


def crash_after_write(config, write: str, wait=None) -> None:
  """Called after each write of a run (named as `testing.crash_after_write`
  names them; logged to the log file, where the crash-point sweep of the
  tests finds every one). Test hook: SIGKILLs this process if
  `config.testing.crash_after_write` names `write` (after `wait()`, which
  finishes an asynchronous write)."""
  logging.info('write point %s', write, extra={console.FILE_ONLY: True})
  if config.testing.crash_after_write != write:
    return
  if wait is not None:
    wait()
  logging.warning('testing.crash_after_write=%r: killing this process', write)
  logging.flush()
  os.kill(os.getpid(), signal.SIGKILL)
