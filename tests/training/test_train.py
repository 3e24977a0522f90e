"""Training program end to end: overfitting, resume after kill -9, topology change, SIGTERM, NaN
guard, config errors (two processes: test_train_multihost.py). Runs `magicvideo_jax.main` in
subprocesses like a user would."""

import os
import signal
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from magicvideo_jax import diffusion
from magicvideo_jax import models as models_lib
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.training import train
import train_helpers as helpers


# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_unknown_config_key_fails_fast(tmp_path):
  t0 = time.time()
  proc = subprocess.run(
      [helpers.PYTHON, '-m', 'magicvideo_jax.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.train.num_stepz=3'], cwd=helpers.ROOT, env=helpers.env(),
       capture_output=True, text=True,
      timeout=120)
  elapsed = time.time() - t0
  print(f'unknown key rejected in {elapsed:.1f} s')
  assert proc.returncode != 0
  assert 'num_stepz' in proc.stderr
  assert elapsed < 30
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


@pytest.mark.slow
def test_overfits_a_fixed_batch(shapes_data_dir):
  """All parameters train on one batch with fixed noise: the loss falls by a large factor."""
  config = tiny.get_config('all')
  config.data.data_dir = shapes_data_dir
  config.train.update(learning_rate=2e-3, warmup_steps=10, num_steps=120, ema_decay=0.0,
                      grad_clip_norm=10.0)
  modules = models_lib.build_models(config.model)
  tokenizer = train.build_tokenizer(config)
  iterator = train.make_iterator(config, tokenizer)
  batch = jax.tree.map(jnp.asarray, train.device_batch(iterator.make_batch(0, 0)))
  params = jax.jit(lambda k: nn.unbox(state_lib.init_params(modules, config, k)))(
      jax.random.key(0))
  mask = state_lib.trainable_mask(params, config.train.trainable)
  tx, lr = state_lib.make_optimizer(config)
  trainable, _ = state_lib.split_params(params, mask)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(trainable), ema_params=trainable)
  step_fn = state_lib.make_train_step(
      config, modules, diffusion.Schedule.from_config(config.diffusion), tx, lr, mask)

  @jax.jit
  def fixed_noise_step(state):
    # The step's PRNG key folds in state.step: pin it so noise and timesteps repeat.
    new_state, metrics = step_fn(state.replace(step=jnp.zeros((), jnp.int32)), batch)
    return new_state.replace(step=state.step + 1), metrics

  losses = []
  for _ in range(config.train.num_steps):
    state, metrics = fixed_noise_step(state)
    losses.append(float(metrics['loss']))
  first, last = np.mean(losses[:5]), np.mean(losses[-10:])
  print(f'loss {first:.4f} -> {last:.5f} ({first / last:.0f}x) in {len(losses)} steps')
  assert np.all(np.isfinite(losses))
  assert last < first / 20


@pytest.mark.slow
def test_kill_resume_is_bitwise_identical(tmp_path, shapes_data_dir):
  args = ('--config.train.num_steps=12', '--config.train.checkpoint_every=4',
          '--config.train.log_every=1')
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  helpers.run(helpers.main_cmd(straight, shapes_data_dir, *args))

  proc = subprocess.Popen(helpers.main_cmd(resumed, shapes_data_dir, *args), cwd=helpers.ROOT,
                          env=helpers.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  helpers.wait_for(lambda: 4 in helpers.steps_on_disk(resumed), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = helpers.steps_on_disk(resumed)
  print('checkpoints on disk after kill -9:', killed_at)
  assert 12 not in killed_at
  helpers.run(helpers.main_cmd(resumed, shapes_data_dir, *args))

  step_a, state_a, data_a = helpers.checkpoint(straight)
  step_b, state_b, data_b = helpers.checkpoint(resumed)
  assert step_a == step_b == 12
  assert data_a == data_b
  flat_a, flat_b = helpers.flat(state_a), helpers.flat(state_b)
  assert flat_a.keys() == flat_b.keys()
  different = [k for k in flat_a if not np.array_equal(flat_a[k], flat_b[k])]
  assert not different, f'{len(different)} leaves differ, e.g. {different[:3]}'


@pytest.mark.slow
def test_restores_onto_another_topology(tmp_path, shapes_data_dir):
  """Saved on 4 devices with fsdp=4, continued on 2 devices with data=2."""
  workdir = str(tmp_path / 'run')
  common = ('--config.train.checkpoint_every=2', '--config.train.trainable=("^unet/",)')
  helpers.run(helpers.main_cmd(workdir, shapes_data_dir, *common, '--config.train.num_steps=2',
                 '--config.mesh.data=1', '--config.mesh.fsdp=4', devices=4))
  step, saved, _ = helpers.checkpoint(workdir)
  assert step == 2
  helpers.run(helpers.main_cmd(workdir, shapes_data_dir, *common, '--config.train.num_steps=3',
                 '--config.mesh.data=2', '--config.mesh.fsdp=1', devices=2))
  step, state, _ = helpers.checkpoint(workdir)
  assert step == 3
  assert int(state['step']) == 3
  moved = [k for k, v in helpers.flat(state['params']).items()
           if not np.array_equal(v, helpers.flat(saved['params'])[k])]
  assert moved, 'training did not continue after the restore'


@pytest.mark.slow
def test_sigterm_saves_current_step(tmp_path, shapes_data_dir):
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(
      helpers.main_cmd(workdir, shapes_data_dir, '--config.train.num_steps=100000',
                '--config.train.checkpoint_every=1000', '--config.train.log_every=1'),
      cwd=helpers.ROOT, env=helpers.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  log = []

  def trained_a_few_steps():
    line = proc.stderr.readline()
    log.append(line)
    return '[6] ' in line or ' 6 steps' in line

  helpers.wait_for(trained_a_few_steps, proc)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  steps = helpers.steps_on_disk(workdir)
  print('returncode', proc.returncode, 'checkpoints', steps)
  assert proc.returncode == 0
  assert steps and steps[-1] >= 6 and steps[-1] % 1000 != 0


@pytest.mark.slow  # Compiles the tiny train step in-process (about 2 min of CPU).
def test_nan_loss_stops_without_checkpointing_it(tmp_path, shapes_data_dir, monkeypatch):
  config = tiny.get_config()
  config.data.data_dir = shapes_data_dir
  config.data.prefetch = 0
  config.train.update(num_steps=10, checkpoint_every=1, export=False, async_checkpointing=False)
  config.mesh.update(data=-1, fsdp=1)
  real_make_iterator = train.make_iterator

  class Poisoned:
    """Yields NaN video from the 4th batch on."""

    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __getattr__(self, name):
      return getattr(self.inner, name)

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count >= 4:
        batch = dict(batch, video=np.full_like(batch['video'], np.nan))
      return batch

  monkeypatch.setattr(train, 'make_iterator', lambda *a, **k: Poisoned(real_make_iterator(*a, **k)))
  with pytest.raises(FloatingPointError, match='loss is nan at step 4'):
    train.train_and_evaluate(config, str(tmp_path))
  steps = helpers.steps_on_disk(str(tmp_path))
  print('checkpoints after NaN:', steps)
  assert steps and max(steps) == 3


@pytest.mark.slow  # Compiles two train steps.
def test_gradient_accumulation_matches_one_big_batch(shapes_data_dir):
  """Two micro-batches give the update of one batch: per-example noise does not depend on the split."""
  config = tiny.get_config('all')
  config.data.data_dir = shapes_data_dir
  config.data.prefetch = 0
  modules = models_lib.build_models(config.model)
  iterator = train.make_iterator(config, train.build_tokenizer(config))
  batch = jax.tree.map(jnp.asarray, train.device_batch(iterator.make_batch(0, 0)))
  params = jax.jit(lambda k: nn.unbox(state_lib.init_params(modules, config, k)))(
      jax.random.key(0))
  mask = state_lib.trainable_mask(params, config.train.trainable)
  tx, lr = state_lib.make_optimizer(config)
  trainable, _ = state_lib.split_params(params, mask)
  state = state_lib.TrainState(step=jnp.asarray(7, jnp.int32), params=params,
                               opt_state=tx.init(trainable), ema_params=trainable)
  schedule = diffusion.Schedule.from_config(config.diffusion)
  results = {}
  for accum in (1, 2):
    config.train.grad_accum_steps = accum
    step = jax.jit(state_lib.make_train_step(config, modules, schedule, tx, lr, mask))
    results[accum] = step(state, batch)
  (state_1, metrics_1), (state_2, metrics_2) = results[1], results[2]
  print(f'loss {float(metrics_1["loss"]):.6f} vs {float(metrics_2["loss"]):.6f}, grad norm '
        f'{float(metrics_1["grad_norm"]):.6f} vs {float(metrics_2["grad_norm"]):.6f}')
  np.testing.assert_allclose(metrics_1['loss'], metrics_2['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics_1['grad_norm'], metrics_2['grad_norm'], rtol=1e-4)
  flat_1, flat_2 = helpers.flat(state_1.params), helpers.flat(state_2.params)
  worst = max(float(np.max(np.abs(flat_1[k] - flat_2[k]))) for k in flat_1)
  print(f'max abs parameter difference after one step: {worst:.2e}')
  assert worst < 1e-5


@pytest.mark.parametrize('variant', ['video', 'image', 'vae'])
def test_abstract_batch_is_the_first_batch(shapes_data_dir, variant):
  """state.abstract_batch (flops.py, benchmarks/mfu.py) from the config alone = the global structs
  of the first real batch that train_and_evaluate compiles its step for."""
  config = tiny.get_config(variant)
  config.data.update(data_dir=shapes_data_dir, prefetch=0)
  mesh = sharding_lib.create_mesh(config.mesh)
  iterator = train.make_iterator(config, train.build_tokenizer(config))
  real = train._batch_struct(config, iterator, mesh)  # pylint: disable=protected-access
  abstract = state_lib.abstract_batch(config, mesh)
  print({k: (v.shape, v.dtype.name) for k, v in abstract.items()})
  assert abstract.keys() == real.keys()
  for key, struct in real.items():
    assert abstract[key] == struct, (key, abstract[key], struct)
