"""benchmarks/accelerator_check.py at tiny sizes on CPU, with TensorFlow, TFDS and clu unimportable
(what a bare accelerator machine has)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu')
RUNNER = f'''
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in {BLOCKED!r}:
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['accelerator_check'] + sys.argv[1:]
runpy.run_module('benchmarks.accelerator_check', run_name='__main__')
'''


@pytest.mark.slow  # Compiles a sampler and a train step.
def test_runs_without_tensorflow_tfds_or_clu(tmp_path):
  out = tmp_path / 'check.json'
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-c', RUNNER, '--tiny', '--steps', '2', '--batches', '1',
                         '--timed_steps', '1', '--json', str(out)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(out.read_text())
  assert sorted(results['absent_optional_packages']) == sorted(BLOCKED)
  assert results['sampling']['denoise_s'] > 0 and results['sampling']['steps'] == 2
  fits = results['train_step']['fits']
  assert fits['per_device_batch'] == 1 and fits['step_s'] > 0 and fits['flops_per_device'] > 0
  assert len(results['attention']) >= 3 and all(r['xla_s'] > 0 for r in results['attention'])
  assert all(r['cudnn'] == 'skipped: no GPU' for r in results['attention'])
