"""Checkpoints: training state in a workdir (Orbax CheckpointManager) and pretrained model folders.

A *pretrained folder* (what `convert` writes, what training exports, what `MagicVideoPipeline` and the
sample CLI load) holds:
  config.json   the config (model, diffusion, tokenizer, sampling sections) as JSON
  params/       Orbax checkpoint of {'text_encoder': ..., 'vae': ..., 'unet': ...}
  tokenizer/    tokenizer files (CLIP vocab.json + merges.txt, or words_tokenizer.json)
"""

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging as absl_logging
from etils import epath
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from magicvideo_jax import config as config_lib
from magicvideo_jax.tokenizer import load_tokenizer as _load

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'
TOKENIZER_DIR = 'tokenizer'
EXPORT_DIR = 'model'  # A training workdir's exported pretrained folder.


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=1, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_tuplify(json.loads(text)))


def _tuplify(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _tuplify(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuplify(v) for v in tree)
  return tree


def as_path(path: Any) -> epath.Path:
  """A local path made absolute, or a URL (gs://...) kept as it is: never `<cwd>/gs:/...`."""
  text = os.fspath(path)
  return epath.Path(text if '://' in text else os.path.abspath(text))


def model_folder(path: str) -> Optional[str]:
  """The pretrained folder a path names: the folder itself, or a training workdir's exported `model/`
  (None when neither holds one). The one place that rule lives."""
  for candidate in (os.fspath(path), os.path.join(os.fspath(path), EXPORT_DIR)):
    if is_pretrained_folder(candidate):
      return candidate
  return None


def is_pretrained_folder(folder: Any) -> bool:
  folder = epath.Path(folder)
  return (folder / CONFIG_FILE).is_file() and (folder / PARAMS_DIR).is_dir()


def save_pretrained(folder: str, config: ml_collections.ConfigDict, params: Any,
                    tokenizer: Any = None) -> None:
  """Writes a pretrained folder (overwriting `params/`). Call from every process; one writes."""
  folder = as_path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(folder / PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    (folder / CONFIG_FILE).write_text(config_to_json(config))
    if tokenizer is not None:
      tokenizer.save(str(folder / TOKENIZER_DIR))


def load_config(folder: str) -> ml_collections.ConfigDict:
  """The folder's config.json, with the keys added since it was written at their defaults."""
  path = epath.Path(folder) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: {folder} is not a magicvideo_jax checkpoint folder')
  return config_lib.fill_defaults(config_from_json(path.read_text()))


def load_params(folder: str, abstract_params: Optional[Any] = None) -> Any:
  """Restores `params/`; with `abstract_params` (ShapeDtypeStructs with shardings) onto that layout."""
  params_dir = as_path(folder) / PARAMS_DIR
  with ocp.StandardCheckpointer() as checkpointer:
    if abstract_params is None:
      return checkpointer.restore(params_dir)
    return checkpointer.restore(params_dir, abstract_params)


def load_tokenizer(folder: str, config: ml_collections.ConfigDict):
  max_length = config.model.text_encoder.max_position_embeddings
  return _load(os.path.join(folder, TOKENIZER_DIR), max_length)


def load_pretrained(folder: str) -> Tuple[ml_collections.ConfigDict, Any, Any]:
  """(config, params, tokenizer) of a pretrained folder; params as host numpy arrays."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'checkpoint folder not found: {folder}')
  if not os.path.isdir(os.path.join(folder, PARAMS_DIR)):
    raise FileNotFoundError(f'{os.path.join(folder, PARAMS_DIR)} not found: {folder} is not a '
                            'magicvideo_jax checkpoint folder (config.json + params/ + tokenizer/)')
  config = load_config(folder)
  # A folder may store its floats in a smaller dtype (`cast_pretrained`); the model gets its own.
  param_dtype = np.dtype(config.model.param_dtype)
  params = jax.tree.map(lambda x: np.asarray(x, param_dtype) if jnp.issubdtype(
      np.asarray(x).dtype, jnp.floating) else np.asarray(x), load_params(folder))
  logging.info('loaded %s', folder)
  return config, params, load_tokenizer(folder, config)


def cast_pretrained(folder: str, output: str, dtype: str = 'float16') -> None:
  """Writes `output`: `folder` with its floating-point params stored as `dtype` (e.g. a bundle at
  half the size); `load_pretrained` casts them back to the model's param_dtype."""
  config, params, tokenizer = load_pretrained(folder)
  params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        params)
  save_pretrained(output, config, params, tokenizer)


def merge_pretrained(base: str, other: str, output: str, *, params: str = '^vae/',
                     config_keys: Tuple[str, ...] = ('model.vae', 'model.video_vae')) -> None:
  """Writes `output`: `base` with the parameters matching the regex `params` and the config
  sections `config_keys` (dotted paths) taken from `other`, e.g. a separately trained VideoVAE put
  into a text-to-video model. The tokenizer is base's."""
  config, base_params, tokenizer = load_pretrained(base)
  other_config, other_params, _ = load_pretrained(other)
  pattern = re.compile(params)
  flat = traverse_util.flatten_dict(base_params, sep='/')
  flat = {k: v for k, v in flat.items() if not pattern.search(k)}
  taken = {k: v for k, v in traverse_util.flatten_dict(other_params, sep='/').items()
           if pattern.search(k)}
  if not taken:
    raise ValueError(f'{other} has no parameter matching {params!r}')
  flat.update(taken)
  for dotted in config_keys:
    *parents, leaf = dotted.split('.')
    source, target = other_config, config
    for name in parents:
      source, target = source[name], target[name]
    target[leaf] = ml_collections.ConfigDict(source[leaf].to_dict()) if isinstance(
        source[leaf], ml_collections.ConfigDict) else source[leaf]
  save_pretrained(output, config, traverse_util.unflatten_dict(flat, sep='/'), tokenizer)
  logging.info('merged %d leaves of %s into %s -> %s', len(taken), other, base, output)


def main(argv=None) -> int:
  """`python -m magicvideo_jax.weights.checkpoint merge --base DIR --other DIR --output DIR [--params RE]
  [--config_keys model.vae,model.video_vae]` (see `merge_pretrained`), or
  `... cast --input DIR --output DIR [--dtype float16]` (see `cast_pretrained`)."""
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.weights.checkpoint', description=main.__doc__)
  commands = parser.add_subparsers(dest='command', required=True)
  merge = commands.add_parser('merge', help='take some params and config sections from another folder')
  merge.add_argument('--base', required=True)
  merge.add_argument('--other', required=True)
  merge.add_argument('--output', required=True)
  merge.add_argument('--params', default='^vae/', help='regex over parameter paths')
  merge.add_argument('--config_keys', default='model.vae,model.video_vae')
  cast = commands.add_parser('cast', help='store the floating-point params in another dtype')
  cast.add_argument('--input', required=True)
  cast.add_argument('--output', required=True)
  cast.add_argument('--dtype', default='float16', choices=('float16', 'bfloat16', 'float32'))
  args = parser.parse_args(argv)
  logging.getLogger().setLevel(logging.INFO)
  try:
    if args.command == 'merge':
      merge_pretrained(args.base, args.other, args.output, params=args.params,
                       config_keys=tuple(k for k in args.config_keys.split(',') if k))
    else:
      cast_pretrained(args.input, args.output, args.dtype)
  except FileNotFoundError as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {args.output}')
  return 0


# ----------------------------------------------------------------------------------------------------
# Training checkpoints: state + data-iterator position + config, one Orbax step folder each.


def make_manager(workdir: str, keep: int, save_interval_steps: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      as_path(workdir) / 'checkpoints',
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, save_interval_steps=save_interval_steps,
          enable_async_checkpointing=async_save, create=True),
  )


BEST_DIR = 'checkpoints_best'  # training/evaluation.py's best checkpoint.


def make_best_manager(workdir: str, metric: str, mode: str) -> ocp.CheckpointManager:
  """Keeps the one checkpoint with the best `metric` ('min' or 'max') of those saved with metrics
  (Orbax's best_fn; it reads the earlier ones' metrics back on a resume)."""
  return ocp.CheckpointManager(
      as_path(workdir) / BEST_DIR,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda metrics: float(metrics[metric]), best_mode=mode,
          keep_checkpoints_without_metrics=False, enable_async_checkpointing=False, create=True),
  )


class CheckpointError(RuntimeError):
  """No usable training checkpoint, or one that does not fit this run: a one-line message."""


class NonFiniteStateError(FloatingPointError):
  """The state about to be saved holds NaN or inf: it is not saved."""


CORRUPT_DIR = 'checkpoints_corrupt'  # Where unreadable checkpoints are moved (never deleted).
# Config keys whose change makes a checkpoint's state unusable for this run.
STRUCTURAL_KEYS = ('model', 'lora', 'train.objective', 'train.trainable')


def _bits_sum(x: jax.Array) -> jax.Array:
  """Checksum of a leaf: the wrap-around uint32 sum of its bit patterns times odd position weights
  (odd numbers are invertible mod 2**32, so any one changed element changes it)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
  weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


# A state holding values beyond sqrt(float32 max) has diverged: their squares (norms, variances, Adam's
# second moments) overflow on the next step. Such a state is as unusable as a NaN one.
DIVERGED_ABS = float(np.sqrt(np.finfo(np.float32).max))


@jax.jit
def _fingerprint(leaves):
  sums = jnp.stack([_bits_sum(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)
  good = [jnp.all(jnp.abs(x.astype(jnp.float32)) <= DIVERGED_ABS)  # False for NaN too.
          for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  return sums, jnp.all(jnp.stack(good)) if good else jnp.bool_(True)


def state_fingerprint(state: Any) -> Tuple[List[int], bool]:
  """(per-leaf checksums, every float finite and below `DIVERGED_ABS`) of a (sharded) state, reduced
  on its devices."""
  sums, finite = _fingerprint(jax.tree.leaves(state))
  return [int(v) for v in np.asarray(jax.device_get(sums))], bool(jax.device_get(finite))


def save_train_state(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
                     config: ml_collections.ConfigDict, force: bool = False,
                     metrics: Optional[Dict[str, float]] = None) -> bool:
  """Saves at the manager's interval (or when forced) with the state's checksums beside it.

  Raises:
    NonFiniteStateError: the state holds NaN / inf / diverged values; nothing is written, the last
      good checkpoint stays the newest.
  """
  if not (force or manager.should_save(step)):
    return False
  checksums, finite = state_fingerprint(state)
  if not finite:
    manager.wait_until_finished()
    raise NonFiniteStateError(
        f'the state at step {step} holds NaN, inf or diverged values (beyond {DIVERGED_ABS:.1e}): not '
        f'saved (the last good checkpoint is '
        f'{"none" if manager.latest_step() is None else "step " + str(manager.latest_step())})')
  return manager.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(json.loads(config_to_json(config))),
          integrity=ocp.args.JsonSave(dict(leaf_checksums=checksums)),
      ),
      force=force, metrics=metrics,
  )


def _flat_keys(tree: Any, prefix: str = '') -> Dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat_keys(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_differences(stored: Dict[str, Any], config: ml_collections.ConfigDict) -> List[str]:
  """`STRUCTURAL_KEYS` whose values differ between a checkpoint's config and this run's."""
  # Both filled: a section added since the checkpoint was written (e.g. `lora`), or left out of a
  # hand-made config, compares at its defaults.
  filled = lambda c: json.loads(config_to_json(config_lib.fill_defaults(c)))
  current = filled(config)
  stored = filled(config_from_json(json.dumps(stored)))
  differences = []
  for key in STRUCTURAL_KEYS:
    a, b = stored, current
    for part in key.split('.'):
      a = a.get(part) if isinstance(a, dict) else None
      b = b.get(part) if isinstance(b, dict) else None
    flat_a, flat_b = _flat_keys(a, f'{key}.'), _flat_keys(b, f'{key}.')
    for k in sorted(set(flat_a) | set(flat_b)):
      if flat_a.get(k) != flat_b.get(k):
        differences.append(f'{k}: {flat_a.get(k)!r} -> {flat_b.get(k)!r}')
  return differences


def _move_aside(manager: ocp.CheckpointManager, step: int, reason: str) -> None:
  folder = epath.Path(manager.directory) / str(step)
  aside = epath.Path(manager.directory).parent / CORRUPT_DIR
  target = aside / f'{step}.{time.strftime("%Y%m%d-%H%M%S")}'
  if jax.process_index() == 0:  # One host moves; every host then reads the same list.
    aside.mkdir(parents=True, exist_ok=True)
    if folder.exists():
      folder.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'checkpoint {step} moved aside')
  logging.warning('checkpoint step %d is unusable (%s): moved to %s; trying the previous one.', step,
                  reason, target)
  manager.reload()


class _QuietRestore:
  """Drops the log records Orbax's and asyncio's worker threads write while a broken checkpoint fails
  to restore (dozens of interleaved tracebacks); the one-line warning of `_move_aside` says it."""

  def filter(self, record: logging.LogRecord) -> bool:
    where = f'{record.name} {record.pathname}'
    return not any(name in where for name in ('orbax', 'asyncio', 'tensorstore'))

  def __enter__(self):
    self.handlers = list(logging.getLogger().handlers) + [absl_logging.get_absl_handler()]
    for handler in self.handlers:
      handler.addFilter(self)
    return self

  def __exit__(self, *exc):
    for handler in self.handlers:
      handler.removeFilter(self)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   config: ml_collections.ConfigDict, allow_config_change: bool = False
                   ) -> Optional[Tuple[int, Any, Any]]:
  """(step, state, data_state) of the newest usable checkpoint, or None when there is none.

  A checkpoint that fails to restore or whose checksums differ from the stored ones is moved to
  `CORRUPT_DIR` beside `checkpoints/` (never deleted) with one warning, and the previous one is tried.

  Raises:
    CheckpointError: checkpoints exist but none is usable, or the newest readable one was written with
      a different model (`STRUCTURAL_KEYS`; `allow_config_change` skips that check), before any state
      is restored.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  for step in steps:
    try:
      stored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    except Exception as e:  # pylint: disable=broad-except  # Unreadable: fall back below.
      _move_aside(manager, step, f'its config does not read: {type(e).__name__}')
      continue
    differences = config_differences(stored, config)
    if differences and not allow_config_change:
      raise CheckpointError(
          f'{manager.directory}/{step} was written with another model config ({len(differences)} '
          f'keys differ: {"; ".join(differences[:4])}{"; ..." if len(differences) > 4 else ""}): '
          'use a new workdir, or set config.train.allow_config_change=True to restore anyway.')
    try:
      with _QuietRestore():
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      _move_aside(manager, step, f'{type(e).__name__}: {" ".join(str(e).split())[:200]}')
      continue
    try:
      expected = manager.restore(step, args=ocp.args.Composite(
          integrity=ocp.args.JsonRestore()))['integrity']['leaf_checksums']
    except Exception:  # pylint: disable=broad-except  # Written before checksums existed.
      logging.info('checkpoint step %d has no checksums: restored unverified', step)
      return step, restored['state'], restored['data']
    checksums, _ = state_fingerprint(restored['state'])
    if checksums != expected:
      bad = sum(a != b for a, b in zip(checksums, expected)) + abs(len(checksums) - len(expected))
      _move_aside(manager, step, f'{bad} arrays differ from their checksums')
      continue
    return step, restored['state'], restored['data']
  raise CheckpointError(f'no usable checkpoint in {manager.directory}: every one failed to restore '
                        f'and was moved to {CORRUPT_DIR}/; start a new workdir or restore one by hand')


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Tuple[Any, Any]:
  """(state, data_state) at `step`, restored onto the shardings of `abstract_state`."""
  restored = manager.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
      ),
  )
  return restored['state'], restored['data']


if __name__ == '__main__':
  raise SystemExit(main())
