"""Evaluation during training (`config.eval`): the training objective on held-out batches at fixed
noise and timesteps, and the best checkpoint by a chosen metric beside the latest ones.

Every `config.eval.every_steps` steps `train.train_and_evaluate` calls an `Evaluator`: the first
`num_batches` batches of `config.eval.split` (caption dropout off, no shuffling; the same clips every
time) go through the objective with per-example PRNG keys fixed by `config.eval.seed`, so the noise
and timesteps are the same at every evaluation and the numbers are comparable across steps. The
parameters are the ones sampling uses: the EMA of the trainable ones merged in, LoRA adapters
folded. The means ('eval_loss' and the objective's other metrics, prefixed 'eval_') go to
TensorBoard; `config.eval.best_metric` picks the checkpoint kept in WORKDIR/checkpoints_best
(Orbax's `best_fn` over the saved metrics, so a resumed run keeps comparing with the earlier best).
"""

import copy
import functools
import logging
from typing import Any, Callable, Dict, List

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from magicvideo_jax import lora as lora_lib
from magicvideo_jax import losses
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax.training import state as state_lib

def enabled(config: ml_collections.ConfigDict) -> bool:
  return int(config.eval.every_steps) > 0


def validate(config: ml_collections.ConfigDict) -> None:
  ec = config.eval
  if int(ec.every_steps) < 0 or int(ec.num_batches) < 1:
    raise ValueError(f'config.eval.every_steps={ec.every_steps} must be >= 0 (0: no evaluation) '
                     f'and config.eval.num_batches={ec.num_batches} >= 1')
  if ec.best_mode not in ('min', 'max'):
    raise ValueError(f'config.eval.best_mode={ec.best_mode!r}; valid: "min", "max"')


def eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.data for the held-out batches: config.eval.split, no caption dropout, no shuffling."""
  data = copy.deepcopy(config.data)
  with data.unlocked():
    data.update(split=config.eval.split, caption_dropout=0.0, shuffle=False, prefetch=0,
                num_epochs=None)
  return data


class Evaluator:
  """`evaluator(state) -> {'eval_loss': ..., ...}` (host floats), the same batches and keys each call."""

  def __init__(self, config: ml_collections.ConfigDict, setup: state_lib.TrainSetup, mesh: Mesh,
               tokenizer: Any, make_iterator: Callable, device_batch: Callable):
    self.config, self.setup, self.mesh = config, setup, mesh
    data_config = eval_data_config(config)
    iterator = make_iterator(ml_collections.ConfigDict(dict(config.to_dict(), data=data_config)),
                             tokenizer)
    if iterator.steps_per_epoch < int(config.eval.num_batches):
      raise ValueError(f'config.eval.num_batches={config.eval.num_batches}: split '
                       f'{config.eval.split!r} holds {iterator.steps_per_epoch} batches of '
                       f'{config.data.global_batch_size}')
    self.batches: List[Dict[str, Any]] = [
        device_batch(iterator.make_batch(0, i)) for i in range(int(config.eval.num_batches))]
    base = jax.random.key(int(config.eval.seed))
    size = int(config.data.global_batch_size)
    self.keys = [jax.vmap(lambda j, i=i: jax.random.fold_in(jax.random.fold_in(base, i), j))(
        jnp.arange(size)) for i in range(len(self.batches))]
    objective = functools.partial(losses.LOSSES[config.train.objective], modules=setup.modules,
                                  schedule=setup.schedule, config=config)
    lora_scale = lora_lib.scale(config)

    def evaluate(params, ema_params, batch, keys):
      params = lora_lib.fold(state_lib.merge_ema(params, ema_params), lora_scale)
      loss, aux = objective(params, batch, keys)
      return dict(loss=loss, **aux)

    self._evaluate = jax.jit(evaluate)
    logging.info('evaluation every %d steps: %d batches of %s %r', config.eval.every_steps,
                 len(self.batches), config.data.dataset, config.eval.split)

  def metric_names(self, state: state_lib.TrainState) -> List[str]:
    """The metrics `__call__` returns (from shapes alone: nothing runs)."""
    with self.setup.context():
      batch = sharding_lib.to_global_batch(self.batches[0], self.mesh)
      out = jax.eval_shape(self._evaluate, state.params, state.ema_params, batch, self.keys[0])
    return sorted(f'eval_{name}' for name in out)

  def __call__(self, state: state_lib.TrainState) -> Dict[str, float]:
    totals: Dict[str, float] = {}
    with self.setup.context():
      for batch, keys in zip(self.batches, self.keys):
        global_batch = sharding_lib.to_global_batch(batch, self.mesh)
        keys = jax.device_put(keys, sharding_lib.batch_sharding(self.mesh, 1))
        metrics = jax.device_get(self._evaluate(state.params, state.ema_params, global_batch, keys))
        for name, value in metrics.items():
          totals[name] = totals.get(name, 0.0) + float(value)
    return {f'eval_{name}': value / len(self.batches) for name, value in totals.items()}


def is_finite(metrics: Dict[str, float]) -> bool:
  return all(np.isfinite(v) for v in metrics.values())
