"""One run per workdir: a live holder refuses a second run, a dead one's lock is taken over."""

import json
import os
import subprocess
import sys

import pytest

from magicvideo_jax.training import workdir as workdir_lib


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
  with workdir_lib.WorkdirLock(tmp_path) as lock:
    held = json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())
    assert held['pid'] == os.getpid() and held['host'] == lock.info['host']
    with pytest.raises(workdir_lib.WorkdirLockedError, match=rf'in use by pid {os.getpid()}'):
      workdir_lib.WorkdirLock(tmp_path).acquire()
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()  # Released at exit.
  workdir_lib.WorkdirLock(tmp_path).acquire()  # Free again.


def test_a_dead_process_lock_is_taken_over(tmp_path, caplog):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                        text=True, check=True)
  lock = workdir_lib.WorkdirLock(tmp_path)
  stale = dict(lock.info, pid=int(dead.stdout), started='yesterday')
  (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps(stale))
  with lock:
    assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert any('no longer alive' in r.getMessage() for r in caplog.records)


def test_a_lock_from_another_host_is_never_taken(tmp_path):
  (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps(dict(host='elsewhere', pid=1, started='t')))
  with pytest.raises(workdir_lib.WorkdirLockedError, match='pid 1 on elsewhere since t'):
    workdir_lib.WorkdirLock(tmp_path).acquire()
  workdir_lib.WorkdirLock(tmp_path, enabled=False).acquire()  # Processes other than 0 do not lock.
