r"""AnimateDiff motion modules: a diffusers `MotionAdapter` folder <-> our U-Net's motion modules.

    python -m magicvideo_jax.convert --diffusers_dir SD --motion_adapter_dir MA --output CK
    python -m magicvideo_jax.convert --export_motion_adapter CK --output MA_OUT

A MotionAdapter folder holds `config.json` and `diffusion_pytorch_model.safetensors`. Its tensors are
named as the motion modules of diffusers' `UNetMotionModel` (`down_blocks.0.motion_modules.1.
transformer_blocks.0.attn1.to_q.weight`, `mid_block.motion_modules.0...`, `up_blocks.N...`), which
are our U-Net's with temporal_attention='animatediff' (`down_blocks_0/motion_modules_1/...`), so the
mapping is by name (`torch_layout`). The frame-position tables (`pos_embed.pe`) are carried as they
are, so an import followed by an export gives the adapter back bit for bit (in float32).
The SD folder gives the image weights; the adaptors and fps embedding stay at their identity init.
Pickle files are never loaded; an adapter that does not fit the SD U-Net is a `ConversionError`.
"""

import json
from typing import Any, Dict, Mapping, Tuple

from etils import epath
from flax import traverse_util
import flax.linen as nn
import ml_collections
import numpy as np
from safetensors import numpy as safetensors_numpy

from magicvideo_jax import models as models_lib
from magicvideo_jax import tokenizer as tok_lib
from magicvideo_jax.weights import convert
from magicvideo_jax.weights import surgery
from magicvideo_jax.weights.torch_layout import (PICKLE_SUFFIXES, ConversionError,
                                                 params_to_state_dict, state_dict_to_params)

Params = Dict[str, Any]

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'
MOTION_KEY = 'motion_modules'

# diffusers' `MotionAdapter.__init__` defaults (0.42), for keys a config.json leaves out.
ADAPTER_DEFAULTS = dict(
    block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
    motion_transformer_layers_per_block=1, motion_mid_block_layers_per_block=1,
    motion_transformer_layers_per_mid_block=1, motion_num_attention_heads=8,
    motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
    conv_in_channels=None)


def _one_int(cfg: Mapping[str, Any], key: str, count: int) -> int:
  """An int config value, or a list of `count` equal ints (the only per-block form we build)."""
  value = cfg[key]
  if isinstance(value, int):
    return value
  values = list(value)
  if len(values) != count or len(set(values)) != 1 or not all(isinstance(v, int) for v in values):
    raise ConversionError(f'motion adapter config: {key}={value!r} is not supported (one int, or '
                          f'{count} equal ints)')
  return values[0]


def unet_config_with_adapter(unet: Mapping[str, Any], adapter_cfg: Mapping[str, Any]
                             ) -> Dict[str, Any]:
  """Our `model.unet` section with AnimateDiff's motion modules as `adapter_cfg` (a MotionAdapter
  config.json) describes them.

  Raises:
    ConversionError: the adapter does not fit the U-Net (levels, channels, layers per block) or uses
      an option this port does not build (PIA's conv_in, several mid-block motion modules).
  """
  name = adapter_cfg.get('_class_name', 'MotionAdapter')
  if name != 'MotionAdapter':
    raise ConversionError(f'motion adapter config: _class_name={name!r}, expected "MotionAdapter"')
  cfg = dict(ADAPTER_DEFAULTS, **{k: v for k, v in adapter_cfg.items() if not k.startswith('_')})
  channels = tuple(cfg['block_out_channels'])
  levels = len(channels)
  if channels != tuple(unet['block_out_channels']):
    raise ConversionError(f'motion adapter block_out_channels {channels} do not match the SD U-Net\'s '
                          f'{tuple(unet["block_out_channels"])}: the adapter is for another base model')
  layers = _one_int(cfg, 'motion_layers_per_block', levels)
  if layers != unet['layers_per_block']:
    raise ConversionError(f'motion adapter motion_layers_per_block={layers} does not match the SD '
                          f'U-Net\'s layers_per_block={unet["layers_per_block"]}')
  if cfg['conv_in_channels']:
    raise ConversionError(f'motion adapter conv_in_channels={cfg["conv_in_channels"]} (PIA) is not '
                          'supported')
  mid_layers = 1
  if cfg['use_motion_mid_block']:
    if cfg['motion_mid_block_layers_per_block'] != 1:
      raise ConversionError('motion adapter motion_mid_block_layers_per_block='
                            f'{cfg["motion_mid_block_layers_per_block"]} is not supported (1)')
    mid_layers = _one_int(cfg, 'motion_transformer_layers_per_mid_block', 1)
  heads = cfg['motion_num_attention_heads']
  heads = heads if isinstance(heads, int) else tuple(int(h) for h in heads)
  if not isinstance(heads, int) and len(heads) != levels:
    raise ConversionError(f'motion adapter motion_num_attention_heads={heads!r}: one int or one per '
                          f'level ({levels})')
  for level, c in enumerate(channels):
    h = heads if isinstance(heads, int) else heads[level]
    if c % h:
      raise ConversionError(f'motion adapter: {c} channels at level {level} do not split into '
                            f'{h} heads')
  out = dict(unet)
  out.update(temporal_attention='animatediff', temporal_mask='none', temporal_position='none',
             motion_max_seq_length=int(cfg['motion_max_seq_length']),
             motion_num_attention_heads=heads,
             motion_transformer_layers_per_block=_one_int(
                 cfg, 'motion_transformer_layers_per_block', levels),
             motion_transformer_layers_per_mid_block=mid_layers,
             use_motion_mid_block=bool(cfg['use_motion_mid_block']))
  return out


def adapter_config(unet: Mapping[str, Any]) -> Dict[str, Any]:
  """The MotionAdapter config.json of our `model.unet` section (temporal_attention='animatediff')."""
  heads = unet['motion_num_attention_heads']
  return dict(
      _class_name='MotionAdapter',
      block_out_channels=list(unet['block_out_channels']),
      motion_layers_per_block=int(unet['layers_per_block']),
      motion_transformer_layers_per_block=int(unet['motion_transformer_layers_per_block']),
      motion_mid_block_layers_per_block=1,
      motion_transformer_layers_per_mid_block=int(unet['motion_transformer_layers_per_mid_block']),
      motion_num_attention_heads=heads if isinstance(heads, int) else list(heads),
      # diffusers' UNetMotionModel normalises with the U-Net's groups whatever this says.
      motion_norm_num_groups=int(unet['norm_num_groups']),
      motion_max_seq_length=int(unet['motion_max_seq_length']),
      use_motion_mid_block=bool(unet['use_motion_mid_block']),
      conv_in_channels=None)


def _is_motion(path: str) -> bool:
  return f'/{MOTION_KEY}_' in f'/{path}'


def state_to_params(state: Mapping[str, np.ndarray], unet_template: Any) -> Params:
  """The motion-module leaves of our U-Net from a MotionAdapter state dict (torch names).

  Raises:
    ConversionError: naming an unexpected, missing or mis-shaped tensor.
  """
  flat = traverse_util.flatten_dict(nn.unbox(unet_template), sep='/')
  motion = {p: v for p, v in flat.items() if _is_motion(p)}
  if not motion:
    raise ConversionError("the U-Net has no motion modules (temporal_attention='animatediff')")
  return state_dict_to_params(state, traverse_util.unflatten_dict(motion, sep='/'))


def params_to_state(unet_params: Any) -> Dict[str, np.ndarray]:
  """The MotionAdapter state dict (torch names and layouts) of our U-Net's motion modules."""
  flat = traverse_util.flatten_dict(nn.unbox(unet_params), sep='/')
  motion = traverse_util.unflatten_dict({p: v for p, v in flat.items() if _is_motion(p)}, sep='/')
  if not motion:
    raise ConversionError("this checkpoint has no motion modules (temporal_attention='animatediff')")
  return params_to_state_dict(motion, include_video=True)


def load_adapter_folder(folder: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(config, state dict) of a MotionAdapter folder; pickle weights are refused, never read."""
  root = epath.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f'motion adapter folder not found: {folder}')
  config_path = root / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f'{config_path} not found: {folder} is not a MotionAdapter folder')
  names = sorted(p.name for p in root.iterdir())
  files = [n for n in names if n.endswith('.safetensors')]
  if not files:
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    raise ConversionError(
        f'{folder}: no *.safetensors weights' + (
            f' (only pickle files, never loaded: {", ".join(pickles)}; save the adapter with '
            '`MotionAdapter.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`)'
            if pickles else ''))
  plain = [n for n in files if n.count('.') == 1]  # `.fp16.` variants only without a plain file.
  state: Dict[str, np.ndarray] = {}
  for name in plain or files:
    state.update(safetensors_numpy.load((root / name).read_bytes()))
  return json.loads(config_path.read_text()), state


def convert_with_motion_adapter(sd_dir: str, adapter_dir: str, num_frames: int = 16,
                                seed: int = 0) -> Tuple[ml_collections.ConfigDict, Params, Any]:
  """(config, params, tokenizer): the SD folder's model with the adapter's motion modules
  (temporal_attention='animatediff'); frame adaptors and fps embedding at identity init."""
  sd_dir = convert.check_pipeline_folder(sd_dir)
  adapter_cfg, state = load_adapter_folder(adapter_dir)
  config = convert.model_config_from_diffusers(sd_dir, num_frames)
  try:
    unet = unet_config_with_adapter(config.model.unet.to_dict(), adapter_cfg)
  except ConversionError as e:
    raise ConversionError(f'{adapter_dir}: {e}') from None
  with config.unlocked():
    config.model.unet = ml_collections.ConfigDict(unet)
  modules = models_lib.build_models(config.model)
  template = surgery.abstract_params_for(config, modules)
  params = convert.load_pipeline_params(sd_dir, template)
  try:
    motion = state_to_params(state, template['unet'])
  except ConversionError as e:
    raise ConversionError(f'{adapter_dir}: {e}') from None
  merged = traverse_util.flatten_dict(params['unet'], sep='/')
  merged.update(traverse_util.flatten_dict(motion, sep='/'))
  params['unet'] = traverse_util.unflatten_dict(merged, sep='/')
  params = surgery.grow_video_params(config, params, modules, seed)
  tokenizer = tok_lib.load_tokenizer(str(epath.Path(sd_dir) / 'tokenizer'),
                                     config.model.text_encoder.max_position_embeddings)
  return config, params, tokenizer


def export_motion_adapter(unet_params: Any, unet: Mapping[str, Any], dst: str) -> int:
  """Writes our motion modules as a MotionAdapter folder (config.json + safetensors, float32 as
  stored); returns the number of tensors."""
  if unet.get('temporal_attention') != 'animatediff':
    raise ConversionError("this checkpoint has no motion modules (model.unet.temporal_attention="
                          f"{unet.get('temporal_attention')!r}, not 'animatediff')")
  state = params_to_state(unet_params)
  root = epath.Path(dst)
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_FILE).write_text(json.dumps(adapter_config(unet), indent=1))
  tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
  (root / WEIGHTS_FILE).write_bytes(safetensors_numpy.save(tensors))
  return len(tensors)
