"""Evaluation during training (training/evaluation.py): fixed noise, metrics in the log and
TensorBoard, the best checkpoint by config.eval.best_metric kept beside the latest ones."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import tiny
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax.training import evaluation
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # Compiles the tiny objective.
def test_same_batches_and_noise_every_call(shapes_data_dir):
  config = tiny.get_config()
  config.data.update(data_dir=shapes_data_dir, prefetch=0)
  config.eval.update(every_steps=1, num_batches=2)
  mesh = sharding_lib.create_mesh(config.mesh)
  setup = state_lib.create_train_state(config, mesh)
  state = setup.init_fn(setup.init_key)
  tokenizer = train.build_tokenizer(config)
  evaluator = evaluation.Evaluator(config, setup, mesh, tokenizer, train.make_iterator,
                                   train.device_batch)
  first, again = evaluator(state), evaluator(state)
  config.eval.seed = 1
  other_seed = evaluation.Evaluator(config, setup, mesh, tokenizer, train.make_iterator,
                                    train.device_batch)(state)
  print(f'eval_loss {first["eval_loss"]:.6f}, again {again["eval_loss"]:.6f}, seed 1 '
        f'{other_seed["eval_loss"]:.6f}')
  assert first == again
  assert first['eval_loss'] != other_seed['eval_loss']
  assert evaluator.metric_names(state) == sorted(first)
  # Held-out clips, in order, captions kept.
  data = evaluation.eval_data_config(config)
  assert data.split == 'validation' and data.caption_dropout == 0.0 and not data.shuffle


@pytest.mark.slow  # One tiny training run.
def test_run_keeps_the_best_checkpoint(tmp_path, shapes_data_dir):
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  cmd = [sys.executable, '-m', 'magicvideo_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', '--num_cpu_devices=1', f'--config.data.data_dir={shapes_data_dir}',
         '--config.data.prefetch=0', '--config.train.export=False', '--config.train.num_steps=6',
         '--config.train.checkpoint_every=2', '--config.train.keep_checkpoints=5',
         '--config.eval.every_steps=2']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  found = {int(s): float(v) for s, v in
           re.findall(r'evaluation at step (\d+): .*?eval_loss=([-\d.e+]+)', proc.stderr)}
  print('eval_loss by step:', found)
  assert sorted(found) == [2, 4, 6]
  best_root = os.path.join(workdir, 'checkpoints_best')
  kept = [int(d) for d in os.listdir(best_root) if d.isdigit()]
  assert kept == [min(found, key=found.get)]
  with open(os.path.join(best_root, str(kept[0]), 'metrics', 'metrics')) as f:
    assert abs(json.load(f)['eval_loss'] - found[kept[0]]) <= 1e-4 * abs(found[kept[0]])
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                if d.isdigit()) == [1, 2, 4, 6]

  bad = cmd[:-1] + ['--config.eval.every_steps=2', '--config.eval.best_metric=eval_fvd',
                    f'--workdir={tmp_path / "bad"}']
  proc = subprocess.run(bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode != 0
  assert "config.eval.best_metric='eval_fvd'" in proc.stderr.strip().splitlines()[-1]
