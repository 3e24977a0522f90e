r"""PyTorch state dicts <-> our Linen parameter trees, and safetensors files.

Our Linen trees mirror the PyTorch state dicts, so the mapping is by name:
  torch `down_blocks.0.resnets.1.conv1.weight` <-> flax `down_blocks_0/resnets_1/conv1/kernel`
with `weight` -> `kernel` (transposed), `scale` (norms) or `embedding`, and `bias` -> `bias`.
Video-only parameters (`is_video_only`) do not exist in image checkpoints and are not exported.
Pickle checkpoints (.ckpt, .bin, .pt, .pth) are never loaded; a missing, unexpected or mis-shaped tensor
is a `ConversionError` naming it.
"""

import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from flax import traverse_util
import flax.linen as nn
import numpy as np
from safetensors.numpy import load_file, save_file

Params = Dict[str, Any]


VIDEO_ONLY_PATTERN = re.compile(
    r'(^|/)([^/]*(temporal|adaptor)[^/]*|fps_[^/]*|embedding_to_context|motion_modules_\d+)(/|$)')


PICKLE_SUFFIXES = ('.ckpt', '.bin', '.pt', '.pth', '.pkl', '.pickle')


# Non-parameter buffers that some PyTorch checkpoints carry.
IGNORED_TORCH_KEYS = re.compile(r'(position_ids|num_batches_tracked)$')


class ConversionError(ValueError):
  """A checkpoint does not fit the model: names the offending tensor."""


def is_video_only(path: str) -> bool:
  """True for parameters that image checkpoints do not have (adaptors, temporal layers, AnimateDiff
  motion modules, fps embedding, the embedding-to-context layer of CLIP-embedding conditioning)."""
  return VIDEO_ONLY_PATTERN.search(path) is not None


def torch_key_to_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """'a.b.0.c.weight' -> (('a', 'b_0', 'c'), 'weight')."""
  parts = key.split('.')
  module: list = []
  for part in parts[:-1]:
    if part.isdigit() and module:
      module[-1] = f'{module[-1]}_{part}'
    else:
      module.append(part)
  return tuple(module), parts[-1]


def _to_flax(leaf: str, value: np.ndarray, target_shape: Tuple[int, ...]) -> np.ndarray:
  if leaf == 'kernel':
    if value.ndim == 4 and len(target_shape) == 4:  # Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
      return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 4 and len(target_shape) == 2:  # 1x1 conv into a Dense
      if value.shape[2:] != (1, 1):
        raise ConversionError(f'cannot map conv weight {value.shape} to a Dense kernel')
      return value[:, :, 0, 0].T
    if value.ndim == 2 and len(target_shape) == 4:  # Linear into a 1x1 conv
      return value.T[None, None]
    if value.ndim == 2:
      return value.T
  return value


def _to_torch(leaf: str, value: np.ndarray, torch_ndim: Optional[int]) -> np.ndarray:
  if leaf == 'kernel':
    if value.ndim == 4 and torch_ndim in (None, 4):
      return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 4 and torch_ndim == 2:
      return value[0, 0].T
    if value.ndim == 2 and torch_ndim == 4:
      return value.T[:, :, None, None]
    if value.ndim == 2:
      return value.T
  return value


def _leaf_candidates(torch_leaf: str) -> Tuple[str, ...]:
  if torch_leaf == 'weight':
    return ('kernel', 'scale', 'embedding')
  return (torch_leaf,)


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    params_template: Any,
    keep_init: Optional[Any] = None,
    prefix: str = '',
    allow_missing_video: bool = False,
) -> Params:
  """Maps a PyTorch state dict onto a Flax params tree.

  Args:
    state_dict: torch key -> numpy array (e.g. `safetensors.numpy.load_file`).
    params_template: a params tree (arrays or `jax.ShapeDtypeStruct`, boxed or not) fixing names and shapes.
    keep_init: optional params tree of the same structure whose video-only leaves are used as they are
      (their identity init); without it, video-only leaves missing from `state_dict` raise.
    prefix: prepended to every torch key's path (e.g. `text_model` for a transformers 5 CLIPTextModel
      file, which lacks the `text_model.` prefix of SD's files).
    allow_missing_video: leave video-only leaves missing from `state_dict` (and `keep_init`) out of the
      result instead of raising (`grow_params` then initialises them).

  Returns:
    A nested dict of numpy arrays with the template's structure and dtypes.

  Raises:
    ConversionError: naming an unexpected, missing or mis-shaped tensor.
  """
  template = traverse_util.flatten_dict(nn.unbox(params_template), sep='/')
  init = traverse_util.flatten_dict(nn.unbox(keep_init), sep='/') if keep_init is not None else {}
  out: Dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    if IGNORED_TORCH_KEYS.search(key):
      continue
    module, leaf = torch_key_to_path(key)
    base = '/'.join(((prefix,) if prefix else ()) + module)
    path = next((f'{base}/{c}' for c in _leaf_candidates(leaf) if f'{base}/{c}' in template), None)
    if path is None:
      raise ConversionError(
          f'checkpoint tensor {key!r} {tuple(value.shape)} has no counterpart in the model '
          f'(looked for {base}/{{{",".join(_leaf_candidates(leaf))}}}): wrong model config?')
    target = template[path]
    array = _to_flax(path.rsplit('/', 1)[-1], np.asarray(value), tuple(target.shape))
    if tuple(array.shape) != tuple(target.shape):
      raise ConversionError(
          f'checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model expects '
          f'{tuple(target.shape)} at {path}')
    out[path] = array.astype(target.dtype)
  for path in template:
    if path not in out and is_video_only(path) and path in init:
      out[path] = np.asarray(init[path])
  missing = [p for p in template if p not in out and not (allow_missing_video and is_video_only(p))]
  if missing:
    strip = len(prefix) + 1 if prefix else 0
    shown = ', '.join(f'{flax_path_to_torch_key(p)[strip:]!r} ({p})' for p in missing[:8])
    raise ConversionError(f'{len(missing)} tensors the model needs are missing from the checkpoint: '
                          f'{shown}{" ..." if len(missing) > 8 else ""}')
  return traverse_util.unflatten_dict(out, sep='/')


def flax_path_to_torch_key(path: str) -> str:
  """'down_blocks_0/resnets_1/conv1/kernel' -> 'down_blocks.0.resnets.1.conv1.weight'."""
  parts = path.split('/')
  module = []
  for part in parts[:-1]:
    match = re.fullmatch(r'(.+?)_(\d+)', part)
    if match and match.group(1) in _TORCH_CONTAINERS:
      module.extend([match.group(1), match.group(2)])
    else:
      module.append(part)
  leaf = parts[-1]
  leaf = 'weight' if leaf in ('kernel', 'scale', 'embedding') else leaf
  return '.'.join(module + [leaf])


# PyTorch ModuleList / Sequential attributes in the SD and CLIP models (indexed as `name.N`).
_TORCH_CONTAINERS = frozenset({
    'down_blocks', 'up_blocks', 'resnets', 'attentions', 'transformer_blocks', 'downsamplers',
    'upsamplers', 'to_out', 'net', 'layers', 'motion_modules',
})


def params_to_state_dict(
    params: Any,
    torch_ndims: Optional[Mapping[str, int]] = None,
    include_video: bool = False,
) -> Dict[str, np.ndarray]:
  """Exports a Flax params tree to PyTorch names and layouts (the inverse of `state_dict_to_params`).

  Args:
    params: a params tree (boxed or not).
    torch_ndims: optional torch key -> ndim of the target checkpoint, to resolve Dense <-> 1x1-conv layouts
      (e.g. SD's `proj_in` is a 1x1 conv in torch); without it a Dense kernel exports as a Linear.
    include_video: also export video-only parameters (no diffusers model reads them).
  """
  flat = traverse_util.flatten_dict(nn.unbox(params), sep='/')
  out = {}
  for path, value in flat.items():
    if is_video_only(path) and not include_video:
      continue
    key = flax_path_to_torch_key(path)
    ndim = torch_ndims.get(key) if torch_ndims else None
    out[key] = np.ascontiguousarray(_to_torch(path.rsplit('/', 1)[-1], np.asarray(value), ndim))
  return out


def refuse_pickles(folder: str) -> None:
  """Raises if a model folder holds only pickle weights (never loaded: arbitrary code execution)."""
  names = os.listdir(folder)
  if any(n.endswith('.safetensors') for n in names):
    return
  pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise ConversionError(
        f'{folder} holds only pickle weights ({", ".join(sorted(pickles))}); they are never loaded. '
        'Convert them to safetensors first, e.g. in PyTorch: '
        '`Model.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`.')
  raise ConversionError(f'no *.safetensors weights in {folder}')


def load_safetensors_folder(folder: str) -> Dict[str, np.ndarray]:
  """Reads every `*.safetensors` file of a model folder (sharded checkpoints included)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'model folder not found: {folder}')
  refuse_pickles(folder)
  files = sorted(n for n in os.listdir(folder) if n.endswith('.safetensors'))
  # Variants (`name.fp16.safetensors`, `name.non_ema.safetensors`) only when there is no plain file.
  plain = [n for n in files if n.count('.') == 1]
  state: Dict[str, np.ndarray] = {}
  for name in plain or files:
    state.update(load_file(os.path.join(folder, name)))
  return state


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)


def torch_ndims_of(state_dict: Mapping[str, np.ndarray]) -> Dict[str, int]:
  return {k: v.ndim for k, v in state_dict.items()}


def iter_paths(params: Any) -> Iterable[str]:
  return traverse_util.flatten_dict(nn.unbox(params), sep='/').keys()


def refuse_pickle_args(*paths: Optional[str]) -> None:
  for path in paths:
    if path and os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
      raise ConversionError(f'{path} is a pickle checkpoint and is never loaded (it can run arbitrary '
                            'code): convert it to safetensors first, e.g. in PyTorch with diffusers '
                            '`StableDiffusionPipeline.from_single_file(path).save_pretrained(out, '
                            'safe_serialization=True)`, then pass that folder.')
