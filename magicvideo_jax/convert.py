r"""Weight import from diffusers / transformers folders (safetensors) and export back.

    python -m magicvideo_jax.convert --diffusers_dir SRC --output DST [--num_frames 16]

SRC is a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), each
model folder holding `config.json` and `*.safetensors`. DST becomes a checkpoint folder that the rest of the
project loads (`magicvideo_jax.checkpoint.load_pretrained`): `config.json` (our model config), Orbax params
and the tokenizer files.

Our Linen trees mirror the PyTorch state dicts, so the mapping is by name:
  torch `down_blocks.0.resnets.1.conv1.weight` <-> flax `down_blocks_0/resnets_1/conv1/kernel`
with `weight` -> `kernel` (transposed), `scale` (norms) or `embedding`, and `bias` -> `bias`.
Video-only parameters (a path component containing 'temporal' or 'adaptor', or starting with 'fps_')
do not exist in image checkpoints and keep their (identity) init.
Pickle checkpoints (.ckpt, .bin, .pt, .pth) are never loaded.
"""

import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

VIDEO_ONLY_PATTERN = re.compile(r'(^|/)([^/]*(temporal|adaptor)[^/]*|fps_[^/]*)(/|$)')
PICKLE_SUFFIXES = ('.ckpt', '.bin', '.pt', '.pth', '.pkl', '.pickle')
# Non-parameter buffers that some PyTorch checkpoints carry.
IGNORED_TORCH_KEYS = re.compile(r'(position_ids|num_batches_tracked)$')

Params = Dict[str, Any]


class ConversionError(ValueError):
  """A checkpoint does not fit the model: names the offending tensor."""


def is_video_only(path: str) -> bool:
  """True for parameters that image checkpoints do not have (adaptors, temporal layers, fps embedding)."""
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
) -> Params:
  """Maps a PyTorch state dict onto a Flax params tree.

  Args:
    state_dict: torch key -> numpy array (e.g. `safetensors.numpy.load_file`).
    params_template: a params tree (arrays or `jax.ShapeDtypeStruct`, boxed or not) fixing names and shapes.
    keep_init: optional params tree of the same structure whose video-only leaves are used as they are
      (their identity init); without it, video-only leaves missing from `state_dict` raise.
    prefix: prepended to every torch key's path (e.g. to load a bare model's weights into a sub-tree).

  Returns:
    A nested dict of numpy arrays with the template's structure and dtypes.

  Raises:
    ConversionError: naming an unexpected, missing or mis-shaped tensor.
  """
  import flax.linen as nn  # Local: keeps `python -m magicvideo_jax.convert --help` fast.
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
  missing = [p for p in template if p not in out]
  for path in missing:
    if is_video_only(path) and path in init:
      out[path] = np.asarray(init[path])
  still_missing = [p for p in template if p not in out]
  if still_missing:
    shown = ', '.join(still_missing[:8]) + (' ...' if len(still_missing) > 8 else '')
    raise ConversionError(f'{len(still_missing)} model parameters missing from the checkpoint: {shown}')
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
    'upsamplers', 'to_out', 'net', 'layers',
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
  import flax.linen as nn
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
  from safetensors.numpy import load_file
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'model folder not found: {folder}')
  refuse_pickles(folder)
  state: Dict[str, np.ndarray] = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith('.safetensors'):
      state.update(load_file(os.path.join(folder, name)))
  return state


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)


def torch_ndims_of(state_dict: Mapping[str, np.ndarray]) -> Dict[str, int]:
  return {k: v.ndim for k, v in state_dict.items()}


def iter_paths(params: Any) -> Iterable[str]:
  import flax.linen as nn
  return traverse_util.flatten_dict(nn.unbox(params), sep='/').keys()


# ----------------------------------------------------------------------------------------------------
# Whole folders: diffusers layout -> our checkpoint folder, and back.

_UNET_KEYS = ('in_channels', 'out_channels', 'block_out_channels', 'down_block_types',
              'up_block_types', 'layers_per_block', 'attention_head_dim', 'cross_attention_dim',
              'norm_num_groups', 'norm_eps', 'flip_sin_to_cos', 'freq_shift', 'use_linear_projection')
_VAE_KEYS = ('in_channels', 'out_channels', 'latent_channels', 'block_out_channels',
             'layers_per_block', 'norm_num_groups', 'scaling_factor')
_TEXT_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads', 'max_position_embeddings', 'layer_norm_eps', 'hidden_act')
# diffusers options this port does not implement, with the value it requires.
_UNET_REQUIRED = dict(class_embed_type=None, addition_embed_type=None, time_cond_proj_dim=None,
                      encoder_hid_dim=None, num_class_embeds=None, only_cross_attention=False,
                      dual_cross_attention=False, resnet_time_scale_shift='default',
                      mid_block_type='UNetMidBlock2DCrossAttn', conv_in_kernel=3, conv_out_kernel=3,
                      center_input_sample=False, transformer_layers_per_block=1,
                      num_attention_heads=None, act_fn='silu')


def _read_json(path: str) -> Dict[str, Any]:
  import json
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found')
  with open(path) as f:
    return json.load(f)


def unet_config_from_diffusers(cfg: Mapping[str, Any], num_frames: int = 16) -> Dict[str, Any]:
  """Our U-Net config from a diffusers `unet/config.json`; video extensions on at identity init."""
  for key, required in _UNET_REQUIRED.items():
    if key in cfg and cfg[key] != required and not (key == 'transformer_layers_per_block'
                                                    and cfg[key] in (1, [1] * len(cfg.get('block_out_channels', [])))):
      raise ConversionError(f'unet/config.json: {key}={cfg[key]!r} is not supported (needs {required!r})')
  from configs import common  # pylint: disable=g-import-not-at-top
  out = common.unet_sd15().to_dict()
  out.update({k: cfg[k] for k in _UNET_KEYS if k in cfg})
  out['num_frames'] = num_frames
  return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> Dict[str, Any]:
  bad = [t for t in cfg.get('down_block_types', []) if t != 'DownEncoderBlock2D']
  bad += [t for t in cfg.get('up_block_types', []) if t != 'UpDecoderBlock2D']
  if bad or cfg.get('use_quant_conv', True) is False or cfg.get('mid_block_add_attention', True) is False:
    raise ConversionError(f'vae/config.json: unsupported autoencoder variant ({bad or cfg})')
  from configs import common  # pylint: disable=g-import-not-at-top
  out = common.vae_sd15().to_dict()
  out.update({k: cfg[k] for k in _VAE_KEYS if k in cfg and cfg[k] is not None})
  return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def text_config_from_transformers(cfg: Mapping[str, Any]) -> Dict[str, Any]:
  cfg = dict(cfg.get('text_config', cfg))
  from configs import common  # pylint: disable=g-import-not-at-top
  out = common.text_encoder_sd15().to_dict()
  out.update({k: cfg[k] for k in _TEXT_KEYS if k in cfg})
  return out


def diffusion_config_from_diffusers(cfg: Mapping[str, Any]) -> Dict[str, Any]:
  from configs import common  # pylint: disable=g-import-not-at-top
  out = common.diffusion_sd15().to_dict()
  for key in out:
    if key in cfg and cfg[key] is not None:
      out[key] = cfg[key]
  if cfg.get('trained_betas') is not None:
    out['trained_betas'] = tuple(cfg['trained_betas'])
  return out


def model_config_from_diffusers(src: str, num_frames: int = 16):
  """Our full config (model, diffusion, sampling, tokenizer, data) for a diffusers pipeline folder."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  unet_cfg = _read_json(os.path.join(src, 'unet', 'config.json'))
  vae_cfg = _read_json(os.path.join(src, 'vae', 'config.json'))
  text_cfg = _read_json(os.path.join(src, 'text_encoder', 'config.json'))
  sched_path = os.path.join(src, 'scheduler', 'scheduler_config.json')
  sched_cfg = _read_json(sched_path) if os.path.isfile(sched_path) else {}
  unet = unet_config_from_diffusers(unet_cfg, num_frames)
  vae = vae_config_from_diffusers(vae_cfg)
  sample_size = int(unet_cfg.get('sample_size', 32)) * 2 ** (len(vae['block_out_channels']) - 1)
  return ml_collections.ConfigDict(dict(
      model=dict(text_encoder=text_config_from_transformers(text_cfg), vae=vae, unet=unet,
                 dtype='float32', param_dtype='float32', attention_impl=None, remat=False),
      diffusion=diffusion_config_from_diffusers(sched_cfg),
      sampling=dict(sampler='ddim', num_inference_steps=50, guidance_scale=7.5, eta=0.0),
      tokenizer=dict(kind='clip', path=''),
      data=dict(num_frames=num_frames, resolution=sample_size, fps=8.0),
  ))


def abstract_params_for(config) -> Dict[str, Any]:
  """Unboxed ShapeDtypeStructs of {'text_encoder', 'vae', 'unet'} (nothing allocated)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import train  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  modules = models_lib.build_models(config.model)
  init = lambda key: train.init_params(modules, _init_config(config), key)
  return nn.unbox(jax.eval_shape(init, jax.random.key(0)))


def _init_config(config):
  """Smallest shapes that create every parameter (init cost does not depend on resolution)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  small = ml_collections.ConfigDict(config.to_dict())
  small.data.resolution = 2 ** (len(config.model.vae.block_out_channels) - 1) * 2 ** (
      len(config.model.unet.block_out_channels) - 1)
  small.data.num_frames = 1
  return small


def init_video_params(config, seed: int = 0) -> Dict[str, Any]:
  """Freshly initialised params of the three models (used for the video-only leaves' identity init)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import train  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  modules = models_lib.build_models(config.model)
  params = jax.jit(lambda k: nn.unbox(train.init_params(modules, _init_config(config), k)))(
      jax.random.key(seed))
  return jax.tree.map(np.asarray, params)


def convert_diffusers_folder(src: str, num_frames: int = 16):
  """(config, params, tokenizer) of a diffusers SD folder; video-only params at identity init."""
  from magicvideo_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if os.path.isfile(src) and src.endswith(PICKLE_SUFFIXES):
    raise ConversionError(f'{src} is a pickle checkpoint; it is never loaded (it can run arbitrary '
                          'code). Convert it to a diffusers folder with safetensors weights first.')
  if not os.path.isdir(src):
    raise FileNotFoundError(f'diffusers folder not found: {src}')
  config = model_config_from_diffusers(src, num_frames)
  template = abstract_params_for(config)
  video_only = [p for p in iter_paths(template) if is_video_only(p)]
  init = init_video_params(config) if video_only else None
  params = {}
  for name, sub in (('unet', 'unet'), ('vae', 'vae'), ('text_encoder', 'text_encoder')):
    state = load_safetensors_folder(os.path.join(src, sub))
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix SD's files carry.
    prefix = 'text_model' if name == 'text_encoder' and not any(
        k.startswith('text_model.') for k in state) else ''
    params[name] = state_dict_to_params(state, template[name], prefix=prefix,
                                        keep_init=init[name] if init is not None else None)
  tokenizer = tok_lib.CLIPTokenizer(os.path.join(src, 'tokenizer'),
                                    config.model.text_encoder.max_position_embeddings)
  return config, params, tokenizer


def export_diffusers(params: Mapping[str, Any], config, dst: str,
                     reference_dir: Optional[str] = None) -> None:
  """Writes our image-part params as diffusers/transformers safetensors (`unet/`, `vae/`,
  `text_encoder/` + config.json each). With `reference_dir` (the diffusers folder the weights came
  from) its configs are copied and its tensor layouts used; otherwise configs are written from ours."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  files = {'unet': 'diffusion_pytorch_model.safetensors', 'vae': 'diffusion_pytorch_model.safetensors',
           'text_encoder': 'model.safetensors'}
  for name, filename in files.items():
    ndims = None
    out_dir = os.path.join(dst, name)
    os.makedirs(out_dir, exist_ok=True)
    if reference_dir:
      ref = os.path.join(reference_dir, name)
      ndims = torch_ndims_of(load_safetensors_folder(ref))
      shutil.copy(os.path.join(ref, 'config.json'), os.path.join(out_dir, 'config.json'))
    else:
      with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(_diffusers_config(name, config), f, indent=1)
    state = params_to_state_dict(params[name], ndims)
    if name == 'text_encoder' and ndims is not None and not any(k.startswith('text_model.') for k in ndims):
      state = {k[len('text_model.'):]: v for k, v in state.items()}
    save_safetensors(state, os.path.join(out_dir, filename))


def _diffusers_config(name: str, config) -> Dict[str, Any]:
  mc = config.model
  if name == 'unet':
    out = {k: mc.unet[k] for k in _UNET_KEYS}
    out.update(_class_name='UNet2DConditionModel', sample_size=config.data.resolution // 2 ** (
        len(mc.vae.block_out_channels) - 1))
  elif name == 'vae':
    out = {k: mc.vae[k] for k in _VAE_KEYS}
    levels = len(mc.vae.block_out_channels)
    out.update(_class_name='AutoencoderKL', down_block_types=['DownEncoderBlock2D'] * levels,
               up_block_types=['UpDecoderBlock2D'] * levels, act_fn='silu',
               sample_size=config.data.resolution)
  else:
    out = {k: mc.text_encoder[k] for k in _TEXT_KEYS}
    out.update(architectures=['CLIPTextModel'], model_type='clip_text_model')
  return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def main(argv=None) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m magicvideo_jax.convert',
      description='Convert a diffusers SD folder (safetensors) to a magicvideo_jax checkpoint folder, '
                  'or export our image-part weights back to diffusers safetensors.')
  parser.add_argument('--diffusers_dir', help='diffusers folder to import (unet/, vae/, text_encoder/, '
                      'tokenizer/, scheduler/)')
  parser.add_argument('--output', required=True, help='folder to write')
  parser.add_argument('--num_frames', type=int, default=16,
                      help='frames the video layers support (adaptor rows)')
  parser.add_argument('--export_from', help='our checkpoint folder to export as diffusers safetensors')
  parser.add_argument('--reference_dir', help='with --export_from: the diffusers folder whose configs '
                      'and tensor layouts to reuse')
  args = parser.parse_args(argv)
  from magicvideo_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if bool(args.diffusers_dir) == bool(args.export_from):
    parser.error('give exactly one of --diffusers_dir (import) or --export_from (export)')
  try:
    if args.diffusers_dir:
      for p in os.listdir(args.diffusers_dir) if os.path.isdir(args.diffusers_dir) else []:
        if p.endswith(PICKLE_SUFFIXES):
          raise ConversionError(f'{p}: pickle checkpoints are never loaded; convert it to a diffusers '
                                'folder with safetensors weights first.')
      config, params, tokenizer = convert_diffusers_folder(args.diffusers_dir, args.num_frames)
      ckpt_lib.save_pretrained(args.output, config, params, tokenizer)
      print(f'wrote {args.output}')
    else:
      config, params, _ = ckpt_lib.load_pretrained(args.export_from)
      export_diffusers(params, config, args.output, args.reference_dir)
      print(f'wrote {args.output}')
  except (ConversionError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}')


if __name__ == '__main__':
  main()
