"""What the training-program tests share: running `magicvideo_jax.main` in subprocesses as a user
would, and reading the checkpoints it writes."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable


def env(devices=None):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env['PYTHONPATH'] = ROOT
  return env


def main_cmd(workdir, data_dir, *overrides, devices=1, variant=''):
  config = 'configs/tiny.py' + (f':{variant}' if variant else '')
  return [PYTHON, '-m', 'magicvideo_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--num_cpu_devices={devices}', f'--config.data.data_dir={data_dir}',
          '--config.data.prefetch=0', '--config.train.export=False', *overrides]


def run(cmd, timeout=600):
  proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise AssertionError(f'{" ".join(cmd)} failed:\n{proc.stderr[-4000:]}')
  return proc


def checkpoint(workdir, step=None):
  """(step, state, data_state) of a training checkpoint, restored onto this process's first device
  (the checkpoint may come from another topology or from several processes)."""
  root = os.path.join(workdir, 'checkpoints')
  step = max(steps_on_disk(workdir)) if step is None else step
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    path = os.path.join(root, str(step), 'state')
    tree = checkpointer.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = checkpointer.restore(path, target)
  with open(os.path.join(root, str(step), 'data', 'metadata')) as f:
    data_state = json.load(f)
  return step, state, data_state


def flat(tree):
  """path -> numpy leaf, through dicts, lists and tuples (restored optimizer states hold lists)."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def wait_for(predicate, proc, timeout=300):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'process ended early:\n{proc.stderr.read()[-3000:]}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError('timed out')
    time.sleep(0.05)


def steps_on_disk(workdir):
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())
