r"""Model FLOPs utilisation on this machine: a train step's achieved FLOP/s over the matmul peak.

1. Peak: the best dense float32 matmul rate of `jax.jit(jnp.dot)` over a few square sizes.
2. Achieved: a real training step of `--config` (default configs/tiny.py; the state and step that
   `train_and_evaluate` builds, `training.state.create_train_state`, on a random batch of the
   structure `state.abstract_batch` gives), FLOPs from the compiled step's cost analysis (per
   device), divided by the median measured step time.
3. MFU = achieved / peak (per device; XLA convention, multiply-add = 2).

  python -m benchmarks.mfu                                   # tiny config
  python -m benchmarks.mfu --config=configs/tiny.py --config.data.global_batch_size=4 --steps=5
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax.training import state as state_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config of the train step.',
                                          lock_config=False)
_SIZES = flags.DEFINE_list('matmul_sizes', ['1024', '2048', '3072'], 'Square matmul sizes for the peak.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed train steps (after one warm-up).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed matmuls per size.')


def matmul_peak(sizes, repeats: int, dtype=jnp.float32):
  """{n: FLOP/s} of an n x n x n matmul (2 n^3 FLOPs), best of `repeats`."""
  rates = {}
  dot = jax.jit(jnp.dot)
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot(a, b).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
      t0 = time.perf_counter()
      dot(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    rates[n] = 2 * n ** 3 / best
  return rates


def train_step_rate(config, steps: int):
  """(FLOPs per step per device, median seconds per step, compile seconds) of a real train step."""
  setup = state_lib.create_train_state(config, sharding_lib.create_mesh(config.mesh))
  compiled, compile_s = setup.compile()
  state = setup.init_fn(setup.init_key)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  rng = np.random.default_rng(0)

  def make(x):
    if x.dtype == jnp.bool_:
      value = np.ones(x.shape, bool)
    elif jnp.issubdtype(x.dtype, jnp.integer):
      value = rng.integers(0, 8, x.shape).astype(x.dtype)
    else:
      value = rng.uniform(-1, 1, x.shape).astype(x.dtype)
    return jax.device_put(value, x.sharding)

  batch = jax.tree.map(make, setup.batch_struct)
  state, metrics = compiled(state, batch)  # Warm-up.
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return float(cost['flops']), statistics.median(times), compile_s, int(setup.mesh.size)


def main(argv) -> None:
  del argv
  rates = matmul_peak([int(n) for n in _SIZES.value], _REPEATS.value)
  peak = max(rates.values())
  for n, r in rates.items():
    print(f'fp32 matmul {n}x{n}x{n}: {r / 1e9:.1f} GFLOP/s')
  config = _CONFIG.value
  step_flops, seconds, compile_s, devices = train_step_rate(config, _STEPS.value)
  achieved = step_flops / seconds
  print(f'train step ({flags.FLAGS["config"].config_filename}, global batch '
        f'{config.data.global_batch_size}, {devices} device(s), dtype {config.model.dtype}): '
        f'{step_flops / 1e9:.2f} GFLOP per step per device, {seconds:.3f} s per step '
        f'(median of {_STEPS.value}), compiled in {compile_s:.1f} s')
  print(f'achieved {achieved / 1e9:.1f} GFLOP/s per device; peak (dense fp32 matmul) '
        f'{peak / 1e9:.1f} GFLOP/s; MFU {achieved / peak:.1%}')


if __name__ == '__main__':
  app.run(main)
