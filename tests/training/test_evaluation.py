"""Evaluation during training (training/evaluation.py): fixed noise, metrics in the log and
TensorBoard, the best checkpoint by config.eval.best_metric kept beside the latest ones (the run
itself: tests/training/test_lora_training.py evaluates during training)."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax.training import evaluation
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.training import train
from magicvideo_jax.weights import checkpoint as ckpt_lib


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


def test_best_manager_keeps_the_best_of_the_saved_metrics(tmp_path):
  """The manager train.py saves evaluated states to: exactly the best by the metric is kept, also
  across a reopen (a resumed run compares with the earlier best)."""
  config = tiny.get_config()

  def save(manager, step, loss):
    ckpt_lib.save_train_state(manager, step, {'w': np.full((3,), step, np.float32)}, {}, config,
                              force=True, metrics={'eval_loss': loss})
    manager.wait_until_finished()

  manager = ckpt_lib.make_best_manager(str(tmp_path), 'eval_loss', 'min')
  for step, loss in ((2, 3.0), (4, 1.0), (6, 2.0)):
    save(manager, step, loss)
  assert manager.all_steps() == [4]
  manager.close()
  manager = ckpt_lib.make_best_manager(str(tmp_path), 'eval_loss', 'min')
  save(manager, 8, 1.5)
  assert manager.all_steps() == [4]
  save(manager, 10, 0.5)
  assert manager.all_steps() == [10]
  with open(os.path.join(tmp_path, ckpt_lib.BEST_DIR, '10', 'metrics', 'metrics')) as f:
    assert json.load(f) == {'eval_loss': 0.5}
