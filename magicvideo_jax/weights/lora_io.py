r"""LoRA adapters <-> the diffusers / PEFT safetensors layout.

A LoRA folder holds up to two files:

  pytorch_lora_weights.safetensors   the image parts, what diffusers' `load_lora_weights` reads:
      unet.<module>.lora_A.weight, unet.<module>.lora_B.weight
      text_encoder.<module>.lora_A.weight, ...        (module names as in diffusers / transformers)
    with the safetensors metadata `lora_adapter_metadata` = {"unet.r", "unet.lora_alpha",
    "unet.target_modules", "text_encoder.r", ...} (diffusers' `save_lora_weights` format).
  magicvideo_lora_weights.safetensors  adapters on video-only layers (temporal attention, frame
    adaptors), which no diffusers model has: the same key style and metadata, in a file of its own
    so that diffusers never sees them.

Text-encoder modules are named as in transformers 5's `CLIPTextModel` (`encoder.layers.0...`, no
`text_model.`: PEFT matches the live model's module names); both styles are read.

Layouts (PyTorch <- ours): Linear lora_A.weight [r, in] = A.T, lora_B.weight [out, r] = B.T;
Conv2d lora_A.weight [r, in, kh, kw] = A transposed (3, 2, 0, 1), lora_B.weight [out, r, 1, 1].
On import, each module's `lora_alpha / r` (from the metadata; without it alpha = r, as diffusers
reads such files) is multiplied into lora_B, so imported adapters have scale 1.
"""

import collections
import json
import os
from typing import Any, Dict, Mapping, Tuple

from flax import traverse_util
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from magicvideo_jax import lora as lora_lib
from magicvideo_jax.weights import torch_layout

IMAGE_FILE = 'pytorch_lora_weights.safetensors'
VIDEO_FILE = 'magicvideo_lora_weights.safetensors'
METADATA_KEY = 'lora_adapter_metadata'
PARTS = ('unet', 'text_encoder')  # The models whose adapters the files hold.
TEXT_MODEL = 'text_model'  # The root of our CLIP text tree, absent from transformers 5's modules.


def _torch_module(module_path: str) -> str:
  """'down_blocks_0/attentions_0/proj_in' -> 'down_blocks.0.attentions.0.proj_in'."""
  return torch_layout.flax_path_to_torch_key(module_path + '/kernel')[:-len('.weight')]


def to_state_dicts(lora_params: Any, alpha: float, rank: int
                   ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, Any]]:
  """(image state dict, video-only state dict, metadata) of a `params['lora']` tree."""
  image, video = {}, {}
  targets = collections.defaultdict(list)
  for module, (lora_a, lora_b) in lora_lib.adapters(lora_params).items():
    part, _, inner = module.partition('/')
    if part not in PARTS:
      raise ValueError(f'LoRA adapter on {module}: only {PARTS} adapters can be exported')
    lora_a, lora_b = np.asarray(lora_a, np.float32), np.asarray(lora_b, np.float32)
    if lora_a.ndim == 4:
      a, b = np.transpose(lora_a, (3, 2, 0, 1)), lora_b.T[:, :, None, None]
    else:
      a, b = lora_a.T, lora_b.T
    name = _torch_module(inner)
    if part == 'text_encoder':
      name = name.removeprefix(TEXT_MODEL + '.')
    out = video if torch_layout.is_video_only(inner) else image
    out[f'{part}.{name}.lora_A.weight'] = np.ascontiguousarray(a)
    out[f'{part}.{name}.lora_B.weight'] = np.ascontiguousarray(b)
    targets[part].append(name)
  metadata = {}
  for part, names in targets.items():
    metadata.update({f'{part}.r': int(rank), f'{part}.lora_alpha': float(alpha),
                     f'{part}.target_modules': sorted(names)})
  return image, video, metadata


def save(folder: str, lora_params: Any, alpha: float, rank: int) -> Dict[str, int]:
  """Writes the LoRA folder; {file name: tensors written}."""
  image, video, metadata = to_state_dicts(lora_params, alpha, rank)
  os.makedirs(folder, exist_ok=True)
  header = {'format': 'pt', METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
  written = {}
  for name, state in ((IMAGE_FILE, image), (VIDEO_FILE, video)):
    path = os.path.join(folder, name)
    if state:
      save_file(state, path, metadata=header)
      written[name] = len(state)
    elif os.path.exists(path):
      os.remove(path)  # A stale file from an earlier export would be read back.
  return written


def _read(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  with safe_open(path, framework='numpy') as f:
    header = f.metadata() or {}
    state = {k: f.get_tensor(k) for k in f.keys()}
  return state, json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}


def _files(path: str):
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'LoRA weights not found: {path}')
  torch_layout.refuse_pickles(path)
  files = [os.path.join(path, n) for n in (IMAGE_FILE, VIDEO_FILE)
           if os.path.isfile(os.path.join(path, n))]
  if not files:
    raise FileNotFoundError(f'{path} holds neither {IMAGE_FILE} nor {VIDEO_FILE}')
  return files


def load(path: str, params: Mapping[str, Any]) -> Any:
  """A `params['lora']` tree (scale 1: alpha / r folded into lora_B) from a LoRA file or folder,
  checked against the model parameters `params` (names and shapes).

  Raises:
    torch_layout.ConversionError: a key that is not a PEFT LoRA tensor of a unet / text_encoder
      module we have, a missing half of a pair, or mis-shaped tensors.
  """
  torch_layout.refuse_pickle_args(path)
  flat_params = traverse_util.flatten_dict(params, sep='/')
  pairs: Dict[str, Dict[str, np.ndarray]] = collections.defaultdict(dict)
  alphas: Dict[str, float] = {}
  for file in _files(path):
    state, metadata = _read(file)
    for key, value in state.items():
      part, _, rest = key.partition('.')
      stem, dot, half = rest.rpartition('.lora_')
      if part not in PARTS or not dot or half not in ('A.weight', 'B.weight'):
        raise torch_layout.ConversionError(
            f'{file}: {key!r} is not a PEFT LoRA tensor of {" or ".join(PARTS)} '
            '(<part>.<module>.lora_A.weight / lora_B.weight)')
      module_key = stem + '.weight'
      module_path, _ = torch_layout.torch_key_to_path(module_key)
      module = '/'.join((part,) + module_path)
      pairs[module][half[0]] = np.asarray(value, np.float32)
      rank = int(value.shape[0]) if half[0] == 'A' else int(value.shape[1])
      alphas[module] = float(metadata.get(f'{part}.lora_alpha', rank))
  out = {}
  for module, halves in pairs.items():
    alpha = alphas[module]
    if set(halves) != {'A', 'B'}:
      raise torch_layout.ConversionError(f'LoRA of {module} has only lora_{"".join(halves)}')
    kernel = flat_params.get(f'{module}/kernel')
    if kernel is None and module.startswith('text_encoder/'):
      module = module.replace('text_encoder/', f'text_encoder/{TEXT_MODEL}/', 1)
      kernel = flat_params.get(f'{module}/kernel')
    if kernel is None:
      raise torch_layout.ConversionError(f'LoRA adapter for {module}, which the model does not have')
    a, b = halves['A'], halves['B']
    rank = a.shape[0]
    if a.ndim == 4:
      lora_a, lora_b = np.transpose(a, (2, 3, 1, 0)), b[:, :, 0, 0].T
    else:
      lora_a, lora_b = a.T, b.T
    if lora_a.ndim != kernel.ndim and kernel.ndim == 4:  # A Linear LoRA on a 1x1 conv of ours.
      lora_a = lora_a[None, None]
    if kernel.ndim == 2 and lora_a.ndim == 4:  # A 1x1-conv LoRA on a Dense of ours.
      lora_a = lora_a[0, 0]
    if lora_a.shape[:-1] != kernel.shape[:-1] or lora_b.shape != (rank, kernel.shape[-1]):
      raise torch_layout.ConversionError(
          f'LoRA of {module}: lora_A {a.shape} / lora_B {b.shape} do not fit its kernel '
          f'{tuple(kernel.shape)}')
    out[f'{module}/{lora_lib.A}'] = lora_a
    out[f'{module}/{lora_lib.B}'] = lora_b * (alpha / rank)
  return traverse_util.unflatten_dict(out, sep='/')


def export_from_run(params: Mapping[str, Any], config, folder: str) -> Dict[str, int]:
  """Writes the adapters a LoRA training run's params hold (`params['lora']`)."""
  if not params.get(lora_lib.KEY) or not lora_lib.enabled(config):
    raise ValueError('the checkpoint has no LoRA adapters (it was not trained with config.lora.rank '
                     '> 0)')
  return save(folder, params[lora_lib.KEY], lora_lib.alpha(config), int(config.lora.rank))
