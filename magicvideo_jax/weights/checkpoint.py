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
from typing import Any, Optional, Tuple

from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from magicvideo_jax import config as config_lib
from magicvideo_jax.tokenizer import load_tokenizer as _load

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'
TOKENIZER_DIR = 'tokenizer'


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


def is_pretrained_folder(folder: str) -> bool:
  return (os.path.isfile(os.path.join(folder, CONFIG_FILE))
          and os.path.isdir(os.path.join(folder, PARAMS_DIR)))


def save_pretrained(folder: str, config: ml_collections.ConfigDict, params: Any,
                    tokenizer: Any = None) -> None:
  """Writes a pretrained folder (overwriting `params/`). Call from every process; one writes."""
  folder = os.path.abspath(folder)
  os.makedirs(folder, exist_ok=True)
  params_dir = os.path.join(folder, PARAMS_DIR)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, params, force=True)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
      f.write(config_to_json(config))
    if tokenizer is not None:
      tokenizer.save(os.path.join(folder, TOKENIZER_DIR))


def load_config(folder: str) -> ml_collections.ConfigDict:
  """The folder's config.json, with the keys added since it was written at their defaults."""
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: {folder} is not a magicvideo_jax checkpoint folder')
  with open(path) as f:
    return config_lib.fill_defaults(config_from_json(f.read()))


def load_params(folder: str, abstract_params: Optional[Any] = None) -> Any:
  """Restores `params/`; with `abstract_params` (ShapeDtypeStructs with shardings) onto that layout."""
  params_dir = os.path.join(os.path.abspath(folder), PARAMS_DIR)
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
  params = jax.tree.map(np.asarray, load_params(folder))
  logging.info('loaded %s', folder)
  return config, params, load_tokenizer(folder, config)


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
  [--config_keys model.vae,model.video_vae]`: see `merge_pretrained`."""
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.weights.checkpoint', description=main.__doc__)
  parser.add_argument('command', choices=('merge',))
  parser.add_argument('--base', required=True)
  parser.add_argument('--other', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--params', default='^vae/', help='regex over parameter paths')
  parser.add_argument('--config_keys', default='model.vae,model.video_vae')
  args = parser.parse_args(argv)
  logging.getLogger().setLevel(logging.INFO)
  merge_pretrained(args.base, args.other, args.output, params=args.params,
                   config_keys=tuple(k for k in args.config_keys.split(',') if k))
  print(f'wrote {args.output}')
  return 0


# ----------------------------------------------------------------------------------------------------
# Training checkpoints: state + data-iterator position + config, one Orbax step folder each.


def make_manager(workdir: str, keep: int, save_interval_steps: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, save_interval_steps=save_interval_steps,
          enable_async_checkpointing=async_save, create=True),
  )


def save_train_state(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
                     config: ml_collections.ConfigDict, force: bool = False) -> bool:
  return manager.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(json.loads(config_to_json(config))),
      ),
      force=force,
  )


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
