"""A workdir belongs to one run at a time: a lock file naming its host, process and start time.

`WorkdirLock(workdir)` (a context manager) creates `WORKDIR/LOCK` atomically. A lock held by a live
process, or by any process on another host, refuses the second run with one line naming it; a lock
left by a dead process on this host (kill -9, a crash) is taken over with a warning. Multi-host runs
lock once, from process 0 (`enabled=False` elsewhere). On object stores (gs://...) creation is not
atomic: the lock still names the running host but two runs started in the same instant can both pass.
"""

import json
import logging
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

from etils import epath

LOCK_FILE = 'LOCK'


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


class WorkdirLock:
  """Holds `workdir/LOCK` while the run lasts."""

  def __init__(self, workdir: Any, enabled: bool = True):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.enabled = enabled
    self.info: Dict[str, Any] = dict(host=socket.gethostname(), pid=os.getpid(),
                                     started=time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                                     command=' '.join(sys.argv)[:500])
    self._held = False

  def _read(self) -> Optional[Dict[str, Any]]:
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):  # Gone, or half written by a dying process.
      return None

  def _create(self) -> bool:
    text = json.dumps(self.info, indent=1)
    if '://' in str(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return True
    try:
      fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True

  def acquire(self) -> None:
    if not self.enabled:
      return
    for _ in range(3):  # A stale lock is removed, then created again (another run may race us).
      if self._create():
        self._held = True
        return
      held = self._read()
      if held is None:
        self.path.unlink(missing_ok=True)
        continue
      same_host = held.get('host') == self.info['host']
      if same_host and not _alive(int(held.get('pid', -1))):
        logging.warning('taking over %s: its run (pid %s, started %s) is no longer alive', self.path,
                        held.get('pid'), held.get('started'))
        self.path.unlink(missing_ok=True)
        continue
      raise WorkdirLockedError(
          f'{self.path.parent} is in use by pid {held.get("pid")} on {held.get("host")} since '
          f'{held.get("started")}: stop that run or use another workdir (if it is gone, remove '
          f'{self.path}).')
    raise WorkdirLockedError(f'could not take {self.path}: another run keeps creating it')

  def release(self) -> None:
    if self._held:
      held = self._read()
      if held and held.get('pid') == self.info['pid'] and held.get('host') == self.info['host']:
        self.path.unlink(missing_ok=True)
      self._held = False

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
