"""Facts about this machine's processes, read from /proc (Linux): a
process's children, its command line, whether it is still alive and its
resident memory, alone or with all its descendants. For the benchmarks
that measure a run's memory and the tests that find its worker processes.
"""

import os


def _stat(pid: int) -> list[str] | None:
  """The fields of /proc/PID/stat after the command name (state, parent
  PID, ...), or None once the process is gone."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()
  except OSError:
    return None


def _pids() -> list[int]:
  return [int(entry) for entry in os.listdir('/proc') if entry.isdigit()]


def parents() -> dict[int, int]:
  """{PID: parent PID} of every process."""
  found = {}
  for pid in _pids():
    fields = _stat(pid)
    if fields is not None:
      found[pid] = int(fields[1])
  return found


def children(pid: int) -> list[int]:
  """The PIDs whose parent is `pid`."""
  return [child for child, parent in parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
  """`pid`'s children, their children, and so on."""
  by_parent = {}
  for child, parent in parents().items():
    by_parent.setdefault(parent, []).append(child)
  found, frontier = [], [pid]
  while frontier:
    below = by_parent.get(frontier.pop(), [])
    found.extend(below)
    frontier.extend(below)
  return found


def command_line(pid: int) -> bytes:
  """/proc/PID/cmdline (arguments separated by NUL; b'' once it is gone)."""
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f.read()
  except OSError:
    return b''


def alive(pids) -> list[int]:
  """Those of `pids` still running (a zombie has exited)."""
  return [pid for pid in pids
          if (fields := _stat(pid)) is not None and fields[0] != 'Z']


def rss(pid: int) -> int:
  """Resident bytes of process `pid` (0 once it is gone)."""
  try:
    with open(f'/proc/{pid}/statm', encoding='utf-8') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:
    return 0


def tree_rss(pid: int) -> int:
  """Resident bytes of `pid` and all its descendants."""
  return sum(rss(p) for p in [pid, *descendants(pid)])
