"""Training on two processes (two local hosts of one CPU device each): SIGTERM to one of them."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

import train_helpers as helpers


def _launch(workdir, data_dir, log_dir, *overrides, processes=2):
  """`processes` hosts of one CPU device each, as launch/local.sh starts them; (procs, log paths)."""
  port = 20000 + (os.getpid() * 7 + len(str(workdir))) % 20000
  procs, logs = [], []
  for i in range(processes):
    cmd = helpers.main_cmd(workdir, data_dir, *overrides, devices=1)
    cmd[3:3] = [f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
                f'--process_id={i}']
    log = os.path.join(log_dir, f'process_{i}.log')
    logs.append(log)
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(cmd, cwd=helpers.ROOT, env=helpers.env(),
                                    stdout=subprocess.DEVNULL, stderr=f))
  return procs, logs


def _wait_all(procs, logs, timeout=900):
  t0 = time.time()
  for proc, log in zip(procs, logs):
    try:
      proc.wait(timeout=max(1, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise AssertionError(f'hung; {log}:\n{open(log).read()[-3000:]}')
  return [p.returncode for p in procs]


@pytest.mark.slow  # Two 2-process training runs and one 1-process run.
def test_sigterm_to_one_of_two_processes(tmp_path, shapes_data_dir):
  """SIGTERM to one host only: both hosts save the same step (JAX's preemption sync point) and exit
  0. The rerun (through launch/local.sh, sampling with 2 processes) resumes from it and reaches the
  state of one uninterrupted process with both devices (bitwise on XLA:CPU; the tolerance allows
  another summation order in cross-process all-reduces)."""
  # A constant learning rate after warm-up: the interrupted run's num_steps (100000) and the
  # reruns' (saved + 1) then give the same schedule.
  common = ('--config.train.checkpoint_every=1000', '--config.train.log_every=1',
            '--config.train.end_lr_factor=1.0', '--config.mesh.data=1', '--config.mesh.fsdp=2')
  workdir = str(tmp_path / 'preempted')
  procs, logs = _launch(workdir, shapes_data_dir, str(tmp_path), '--config.train.num_steps=100000',
                        *common)
  t0 = time.time()
  while not all('[4] ' in open(log).read() for log in logs):
    if any(p.poll() is not None for p in procs) or time.time() - t0 > 900:
      for p in procs:
        p.kill()
      raise AssertionError(open(logs[0]).read()[-3000:])
    time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  t_signal = time.time()
  assert _wait_all(procs, logs, timeout=300) == [0, 0]
  print(f'both processes exited {time.time() - t_signal:.1f} s after SIGTERM to process 1')
  steps = helpers.steps_on_disk(workdir)
  saved = steps[-1]  # Orbax also saved the first step.
  assert saved >= 4 and saved % 1000 and steps[:-1] in ([], [1]), steps
  for log in logs:
    assert f'stopped at step {saved} after a preemption notice' in open(log).read()

  # Resume to saved + 1 on 2 processes; the reference runs there on 1 process x 2 devices.
  target = saved + 1
  cmd = helpers.main_cmd(workdir, shapes_data_dir, f'--config.train.num_steps={target}',
                  f'--config.train.sample_every={target}', *common)
  launch = ['bash', os.path.join(helpers.ROOT, 'launch', 'local.sh'), '2',
            *[a for a in cmd[3:] if not a.startswith('--num_cpu_devices')]]
  env = helpers.env()
  env.update(DEVICES='1', PYTHON=helpers.PYTHON, WORKDIR_LOGS=str(tmp_path / 'resumed'))
  proc = subprocess.run(launch, cwd=helpers.ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'resuming from' in open(tmp_path / 'resumed' / 'process_0.log').read()
  assert os.path.isfile(os.path.join(workdir, 'samples', f'step_{target:07d}.gif'))
  reference = str(tmp_path / 'reference')
  helpers.run(helpers.main_cmd(reference, shapes_data_dir, f'--config.train.num_steps={target}',
                               *common, devices=2), timeout=900)
  _, resumed_state, resumed_data = helpers.checkpoint(workdir, target)
  _, reference_state, reference_data = helpers.checkpoint(reference, target)
  assert resumed_data == reference_data
  a, b = helpers.flat(resumed_state), helpers.flat(reference_state)
  assert a.keys() == b.keys()
  vec_a = np.concatenate([a[k].ravel().astype(np.float64) for k in sorted(a)])
  vec_b = np.concatenate([b[k].ravel().astype(np.float64) for k in sorted(a)])
  relative = float(np.linalg.norm(vec_a - vec_b) / np.linalg.norm(vec_b))
  print(f'resumed on 2 processes vs 1 uninterrupted process at step {target}: relative L2 '
        f'difference {relative:.2e}')
  assert relative <= 1e-5  # One skipped or repeated batch would be ~1e-3.
