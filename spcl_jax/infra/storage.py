"""Where the pipeline's files live: local paths and `gs://` URLs alike.

Every file operation on a workdir, a data directory or a trained model goes
through here. A local path (a bucket mounted as a file system, gcsfuse or
NFS, is local) is handled with `os`; a URL with etils.epath (TensorFlow's
GCS file system, the one TFDS reads with). What differs between the two:

* Atomic writes. Locally a file is written under a temporary name and
  renamed (`workdir.write_atomically`). An object store has no rename, but
  an object upload is atomic itself: a reader sees the whole object or
  none. Folders (checkpoints, a stage's model) are written in place, and
  orbax's `commit_success.txt` marks a complete one.
* Appends. GCS cannot append: the log of a `gs://` workdir is kept in a
  local file and uploaded whole (`console.log_to_file`).
* `os.path.abspath` and `os.path.normpath` make `gs://b/d` the local
  `<cwd>/gs:/b/d`; `resolve` leaves a URL as it is. `os.path.join`,
  `dirname` and `basename` are right for URLs too.
"""

import os
import shutil

# The remote storage that TFDS (etils.epath), orbax (tensorstore) and
# ArrayRecord (its GCS client) all read and write.
SUPPORTED_SCHEMES = ('gs://',)

# Settings of TensorFlow's GCS file system (read when it is first used)
# that `add_environment_defaults` sets unless the user has. Its stat cache
# (5 s by default) keeps a deleted folder "existing" for that long: a
# checkpoint step deleted and written again (a best/<step> evaluated
# again) would collide with its own ghost. A run stats few paths, so
# without the cache it costs a few requests.
ENVIRONMENT_DEFAULTS = {'GCS_STAT_CACHE_MAX_AGE': '0'}


def add_environment_defaults(environ=None) -> dict:
  """Sets each `ENVIRONMENT_DEFAULTS` variable absent from `environ`
  (default `os.environ`); returns those it set."""
  environ = os.environ if environ is None else environ
  added = {name: value for name, value in ENVIRONMENT_DEFAULTS.items()
           if name not in environ}
  environ.update(added)
  return added


def is_remote(path) -> bool:
  """Whether `path` is a URL (`gs://bucket/dir`, `s3://...`) rather than a
  local path. Never pass a URL to `os.path.abspath` or `expanduser`."""
  return '://' in str(path)


def check_supported(flag: str, path) -> None:
  """Refuses a URL other than `gs://...` for `flag`: the pipeline's
  readers and writers (TFDS, orbax, ArrayRecord) know no other remote
  storage."""
  if is_remote(path) and not str(path).startswith(SUPPORTED_SCHEMES):
    raise ValueError(
        f'{flag}={path}: the only remote storage supported is gs://; use a '
        'gs:// URL, a local path or a file system mounted on every host '
        '(e.g. gcsfuse, NFS)')


def check_bucket(flag: str, url) -> None:
  """Refuses a `gs://` URL whose bucket does not exist or cannot be read
  with these credentials (checked before a run writes anything: a write
  into a missing bucket fails only after minutes of retries)."""
  if not is_remote(url):
    return
  scheme, _, rest = str(url).partition('://')
  bucket = f'{scheme}://{rest.split("/")[0]}'
  try:
    found = _epath(bucket).exists()
  except Exception as e:  # pylint: disable=broad-exception-caught
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f'{flag}={url}: cannot read the bucket {bucket} '
                     f'({reason})') from e
  if not found:
    raise ValueError(f'{flag}={url}: the bucket {bucket} does not exist, or '
                     'these credentials cannot see it; create it (gsutil mb '
                     f'{bucket}) or name another')


def resolve(path) -> str:
  """A local path made absolute (`~` expanded); a URL as it is (without a
  trailing slash)."""
  path = str(path)
  if is_remote(path):
    return path.rstrip('/') if path.rstrip('/')[-1] != ':' else path
  return os.path.abspath(os.path.expanduser(path))


def _epath(path):
  """etils.epath.Path of a URL; imported here, on the first remote
  operation: `import spcl_jax` sets `ENVIRONMENT_DEFAULTS` through this
  module and should not pay for etils.epath."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(str(path))


def exists(path) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  return _epath(path).exists()


def isdir(path) -> bool:
  """Locally a directory; in a bucket, a prefix under which objects are."""
  if not is_remote(path):
    return os.path.isdir(path)
  return _epath(path).is_dir()


def isfile(path) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  return _epath(path).is_file()


def listdir(path) -> list[str]:
  """The sorted names in the directory `path` (FileNotFoundError if none)."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  where = _epath(path)
  if not where.is_dir():
    raise FileNotFoundError(f'no directory {path}')
  return sorted(entry.name for entry in where.iterdir())


def makedirs(path) -> None:
  """Creates the directory `path` and its parents (in a bucket: nothing
  needs creating, an object's name is its whole path)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  """Deletes the file `path`."""
  if not is_remote(path):
    os.remove(path)
  else:
    _epath(path).unlink()


def rmtree(path, missing_ok: bool = False) -> None:
  """Deletes the directory `path` and everything in it (a file: the
  file)."""
  if not exists(path):
    if missing_ok:
      return
    raise FileNotFoundError(f'no file or directory {path}')
  if not is_remote(path):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  elif isdir(path):
    _epath(path).rmtree()
  else:
    _epath(path).unlink()


def read_text(path) -> str:
  if not is_remote(path):
    with open(path, encoding='utf-8') as f:
      return f.read()
  return _epath(path).read_text(encoding='utf-8')


def read_bytes(path) -> bytes:
  if not is_remote(path):
    with open(path, 'rb') as f:
      return f.read()
  return _epath(path).read_bytes()


def write_object(url: str, data: bytes) -> None:
  """Uploads `data` as the object `url` (all of it or nothing: an object
  upload is atomic), replacing one there."""
  if not is_remote(url):
    raise ValueError(f'{url} is not a URL; write local files with '
                     'workdir.write_atomically')
  _epath(url).write_bytes(data)


def copy_file(source, destination) -> None:
  """Copies the file `source` to `destination` (either may be a URL),
  replacing one there; an upload to a bucket appears whole or not at
  all."""
  _epath(source).copy(_epath(destination), overwrite=True)


def move_tree(source, destination) -> None:
  """Moves the directory `source` to `destination` (which must not exist).
  Locally a rename; in a bucket a copy of each object and then the
  deletion of `source` (not atomic: an interrupted move leaves `source`
  as it was and part of `destination`, and the move can be done again)."""
  if not is_remote(source) and not is_remote(destination):
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    os.rename(source, destination)
    return
  for relative in _files_under(_epath(source)):
    copy_file(os.path.join(str(source), relative),
              os.path.join(str(destination), relative))
  rmtree(source)


def _files_under(root, prefix: str = '') -> list[str]:
  """The paths (relative to `root`, an etils.epath.Path) of the files
  under the directory `root`, at any depth."""
  files = []
  for entry in sorted(root.iterdir()):
    name = f'{prefix}{entry.name}'
    if entry.is_dir():
      files += _files_under(entry, f'{name}/')
    else:
      files.append(name)
  return files
