"""One-line errors for a command's flags.

A bad `--config` (a missing file, one that fails to load, an unknown
variant, a misspelt or mistyped field) used to end in the chained
tracebacks of absl and ml_collections (~60 lines) before the useful line.
`parse_flags` prints that line alone, as every error of a command is
printed (`error: <flag>: <what is wrong>`), and exits with status 1;
`--verbosity=1` prints the traceback before it.

  app.run(main, flags_parser=flag_errors.parse_flags)
"""

import os
import re
import sys
import traceback
from typing import Sequence

from absl import flags

from spcl_jax.infra import console

ERROR_EXIT_STATUS = 1

# ml_collections' suggestion for a misspelt field.
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)"')


def parse_flags(argv: Sequence[str],
                config_flags: Sequence[str] = ('config',),
                flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's `flags_parser`: parses `argv` into `flag_values` and loads the
  config files of `config_flags`; on any failure prints `error: ...` (one
  line) on stderr and exits with status 1."""
  try:
    remaining = flag_values(list(argv))
    for name in config_flags:
      _load(flag_values[name].value)
    return remaining
  except Exception as e:  # pylint: disable=broad-except
    if console.verbosity_from_argv(argv) >= 1:
      traceback.print_exception(e)
    line = one_line(argv, e, *config_flags[:1])
    print(f'error: {line}', file=sys.stderr, flush=True)
    sys.exit(ERROR_EXIT_STATUS)


def _load(config) -> None:
  """ml_collections keeps a config file's load error (an OSError: a
  missing file) until the config is first used: use it."""
  if config is not None:
    getattr(config, 'keys')


def one_line(argv: Sequence[str], error: BaseException,
             config_flag: str = 'config') -> str:
  """The error of parsing `argv` in one line, naming the flag."""
  root = _innermost(error)
  config_arg, config_path = _argument(argv, config_flag)
  if isinstance(root, KeyError):
    field = _unknown_field(argv, error, root, config_flag)
    if field:
      return field
  if isinstance(root, OSError) and config_arg:
    if not os.path.isfile(config_path):
      return (f'{config_arg}: no config file {config_path} (a relative '
              f'path starts at {os.getcwd()})')
    return f'{config_arg}: cannot load {config_path}: {_last_line(root)}'
  message = str(error)
  if isinstance(error, flags.Error) and '\n' not in message:
    return message[len('flag '):] if message.startswith('flag ') else message
  # raised by the config file's code (absl and ml_collections wrap it in
  # a message holding the whole traceback)
  return f'{config_arg}: {_describe(root)}' if config_arg else _describe(
      root)


def _innermost(error: BaseException) -> BaseException:
  """The first exception of a chain (`raise ... from`, or raised while
  handling another)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def _argument(argv: Sequence[str], name: str) -> tuple[str, str]:
  """(`--name=value` as given, value) of the last `--name` in `argv`;
  ('', '') if absent. `config.py:args` gives the path `config.py`."""
  found = ('', '')
  for arg, value in _flag_values(argv):
    if arg.lstrip('-') == name:
      found = (f'{arg}={value}', value.split(':', 1)[0])
  return found


def _flag_values(argv: Sequence[str]):
  """(`--flag`, value) of `--flag=value` and `--flag value` in `argv`."""
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if not arg.startswith('-') or arg in ('-', '--'):
      continue
    if '=' in arg:
      yield tuple(arg.split('=', 1))
    elif i + 1 < len(args) and not args[i + 1].startswith('-'):
      yield arg, args[i + 1]


def _unknown_field(argv, error, root: KeyError, config_flag: str) -> str:
  """'--config.a.b.typo=1: config.a.b has no field 'typo'; did you mean
  'type'?' when an override names a field the config lacks; '' when no
  override of `argv` names the missing key."""
  key = root.args[0] if root.args else ''
  prefix = f'{config_flag}.'
  for arg, value in _flag_values(argv):
    path = arg.lstrip('-')
    if not path.startswith(prefix):
      continue
    fields = path[len(prefix):].split('.')
    if key in fields:
      owner = '.'.join([config_flag] + fields[:fields.index(key)])
      line = f'{arg}={value}: {owner} has no field {key!r}'
      match = None
      chained = error
      while chained is not None and match is None:
        match = _DID_YOU_MEAN.search(str(chained))
        chained = chained.__cause__ or chained.__context__
      return line + (f'; did you mean {match.group(1)!r}?' if match else '')
  return ''


def _last_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[-1].strip() if lines else type(error).__name__


def _describe(error: BaseException) -> str:
  """A ValueError's message (what config files raise on purpose); any other
  exception with its type and where it was raised."""
  if isinstance(error, ValueError):
    return _last_line(error)
  where = ''
  frames = traceback.extract_tb(error.__traceback__)
  if frames:
    where = f' ({frames[-1].filename}, line {frames[-1].lineno})'
  hint = ''
  if isinstance(error, ModuleNotFoundError) and error.name:
    hint = (f'; run the command from the folder that holds {error.name!r} '
            '(the repository root) or add that folder to PYTHONPATH')
  return f'{type(error).__name__}: {_last_line(error)}{where}{hint}'
