"""Smoke test of the training program in this process, as the Flax examples' train_test.py: a few steps
of `train.train_and_evaluate` on configs/tiny.py over a local moving_shapes/tiny build. The runs of
`magicvideo_jax.main` in subprocesses (resume, topologies) are in tests/training/test_train.py, two
processes in test_train_multihost.py."""

import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import tiny
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.training import train

NUM_STEPS = 3


def _logged(workdir, tag):
  """(step, value) of a scalar the run's metric writer put in workdir's TensorBoard events."""
  events = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  events.Reload()
  return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


@pytest.mark.slow  # About 2 min of CPU (compiles the train step), 9 min wall at load 10-18.
def test_train_and_evaluate_tiny(tmp_path, shapes_data_dir):
  config = tiny.get_config()
  config.data.data_dir = shapes_data_dir
  config.data.prefetch = 0
  config.train.update(num_steps=NUM_STEPS, log_every=1, checkpoint_every=NUM_STEPS,
                      async_checkpointing=False)
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir)

  assert int(state.step) == NUM_STEPS
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(NUM_STEPS), 'state'))
  exported = ckpt_lib.load_config(os.path.join(workdir, 'model'))
  assert exported.model.unet.to_dict() == config.model.unet.to_dict()
  losses = _logged(workdir, 'loss')
  print('loss by step:', losses)
  assert [step for step, _ in losses] == list(range(1, NUM_STEPS + 1))
  assert np.all(np.isfinite([loss for _, loss in losses]))
