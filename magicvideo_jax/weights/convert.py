r"""Weight import from diffusers / transformers folders (safetensors) and export back
(the `python -m magicvideo_jax.convert` CLI).

SRC is a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), each
model folder holding `config.json` and `*.safetensors`. A `StableDiffusionUpscalePipeline` folder (SD x4
upscaler: class-embedded noise level, only-cross-attention blocks, 3-level VAE) also has
`low_res_scheduler/`, whose noise schedule becomes the config's `upscaler` section (read by
`magicvideo_jax.sampling.upscaler`). DST becomes a checkpoint folder that the rest of the project loads
(`magicvideo_jax.weights.checkpoint.load_pretrained`): `config.json` (our config: model, diffusion and sampling
from the scheduler config, data), Orbax params and the tokenizer files. Export writes our
image-part weights back as diffusers / transformers safetensors, in the reference folder's layout and
CLIP key style when `--reference_dir` is given.

Our Linen trees mirror the PyTorch state dicts, so the mapping is by name:
  torch `down_blocks.0.resnets.1.conv1.weight` <-> flax `down_blocks_0/resnets_1/conv1/kernel`
with `weight` -> `kernel` (transposed), `scale` (norms) or `embedding`, and `bias` -> `bias`.
transformers 5 writes CLIPTextModel without SD's `text_model.` prefix; both styles import.
Video-only parameters (a path component containing 'temporal' or 'adaptor', or starting with 'fps_',
or the `embedding_to_context` layer of models conditioned on CLIP embeddings, context.py) do not exist
in image checkpoints and are not exported: `grow_video_params` initialises the U-Net's and VAE's
(identity at init) in one small jitted `apply`, so the converted video model equals the image model
frame by frame.
Pickle checkpoints (.ckpt, .bin, .pt, .pth) are never loaded; a missing, unexpected or mis-shaped tensor
is a `ConversionError` naming it.
"""

import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

VIDEO_ONLY_PATTERN = re.compile(
    r'(^|/)([^/]*(temporal|adaptor)[^/]*|fps_[^/]*|embedding_to_context)(/|$)')
PICKLE_SUFFIXES = ('.ckpt', '.bin', '.pt', '.pth', '.pkl', '.pickle')
# Non-parameter buffers that some PyTorch checkpoints carry.
IGNORED_TORCH_KEYS = re.compile(r'(position_ids|num_batches_tracked)$')

Params = Dict[str, Any]


class ConversionError(ValueError):
  """A checkpoint does not fit the model: names the offending tensor."""


def is_video_only(path: str) -> bool:
  """True for parameters that image checkpoints do not have (adaptors, temporal layers, fps embedding,
  the embedding-to-context layer of CLIP-embedding conditioning)."""
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
  files = sorted(n for n in os.listdir(folder) if n.endswith('.safetensors'))
  # Variants (`name.fp16.safetensors`, `name.non_ema.safetensors`) only when there is no plain file.
  plain = [n for n in files if n.count('.') == 1]
  state: Dict[str, np.ndarray] = {}
  for name in plain or files:
    state.update(load_file(os.path.join(folder, name)))
  return state


def load_clip_tower(folder: str, *, weights_prefix: str, projection: str, model_class: str,
                    read_config, abstract_params) -> Tuple[Dict[str, Any], Any]:
  """(config, params) of one CLIP tower with its projection from a transformers folder.

  The folder holds `{model_class}WithProjection` or a whole `CLIPModel`, whose tensors under
  `weights_prefix` (e.g. 'text_model.') and `projection` (e.g. 'text_projection') are selected.
  `read_config(config.json dict)` gives our config, `abstract_params(config)` the target tree.
  """
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config.json in {folder}: expected a transformers CLIPModel or '
                            f'{model_class}WithProjection folder (save_pretrained).')
  with open(path) as f:
    config = read_config(json.load(f))
  state = {k: v for k, v in load_safetensors_folder(folder).items()
           if k.startswith((weights_prefix, projection + '.'))}
  if not any(k.startswith(projection + '.') for k in state):
    raise ConversionError(
        f'{folder} has no `{projection}.weight`: embeddings need a CLIPModel or '
        f'{model_class}WithProjection checkpoint (a bare {model_class} stops before the projection).')
  try:
    params = state_dict_to_params(state, abstract_params(config))
  except ConversionError as e:
    raise ConversionError(f'{folder}: {e}') from None
  return config, params


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
              'norm_num_groups', 'norm_eps', 'flip_sin_to_cos', 'freq_shift', 'use_linear_projection',
              'num_class_embeds', 'only_cross_attention')
_VAE_KEYS = ('in_channels', 'out_channels', 'latent_channels', 'block_out_channels',
             'layers_per_block', 'norm_num_groups', 'scaling_factor')
_TEXT_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads', 'max_position_embeddings', 'layer_norm_eps', 'hidden_act')
# diffusers options this port does not implement, with the value it requires.
# (`upcast_attention` is accepted whatever its value: our attention computes its logits and softmax in
# float32 anyway.)
_UNET_REQUIRED = dict(class_embed_type=None, addition_embed_type=None, time_cond_proj_dim=None,
                      encoder_hid_dim=None, dual_cross_attention=False,
                      resnet_time_scale_shift='default', mid_block_type='UNetMidBlock2DCrossAttn',
                      conv_in_kernel=3, conv_out_kernel=3, center_input_sample=False,
                      transformer_layers_per_block=1, num_attention_heads=None, act_fn='silu',
                      downsample_padding=1, mid_block_scale_factor=1, class_embeddings_concat=False,
                      time_embedding_type='positional', time_embedding_dim=None,
                      time_embedding_act_fn=None, timestep_post_act=None, resnet_skip_time_act=False,
                      resnet_out_scale_factor=1.0, cross_attention_norm=None, attention_type='default')
# The upscale pipeline's call defaults (diffusers' StableDiffusionUpscalePipeline.__call__, 0.42).
_UPSCALER_DEFAULTS = dict(noise_level=20, max_noise_level=350, num_inference_steps=75,
                          guidance_scale=9.0)
# Scheduler defaults of the diffusers classes (keys absent from a scheduler_config.json).
_SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
    trained_betas=None, prediction_type='epsilon', timestep_spacing='leading', steps_offset=0,
    set_alpha_to_one=True, clip_sample=False, rescale_betas_zero_snr=False)
_SCHEDULER_CLASS_DEFAULTS = {
    'DDIMScheduler': dict(clip_sample=True),
    'PNDMScheduler': dict(set_alpha_to_one=False),
    'DPMSolverMultistepScheduler': dict(timestep_spacing='linspace'),
    'EulerDiscreteScheduler': dict(timestep_spacing='linspace'),
    'EulerAncestralDiscreteScheduler': dict(timestep_spacing='linspace'),
}
MODEL_FILES = {'unet': 'diffusion_pytorch_model.safetensors',
               'vae': 'diffusion_pytorch_model.safetensors', 'text_encoder': 'model.safetensors'}


def _read_json(path: str) -> Dict[str, Any]:
  import json  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found')
  with open(path) as f:
    return json.load(f)


def unet_config_from_diffusers(cfg: Mapping[str, Any], num_frames: int = 16) -> Dict[str, Any]:
  """Our U-Net config from a diffusers `unet/config.json`; video extensions on at identity init."""
  levels = len(cfg.get('block_out_channels', ()))
  for key, required in _UNET_REQUIRED.items():
    value = cfg.get(key, required)
    if key == 'transformer_layers_per_block' and value in (1, [1] * levels):
      continue
    if key == 'num_attention_heads' and value is not None and value == cfg.get('attention_head_dim'):
      continue  # Some SD 1.x configs spell the head count twice.
    if value != required:
      raise ConversionError(f'unet/config.json: {key}={value!r} is not supported (needs {required!r})')
  from magicvideo_jax import config as common  # pylint: disable=g-import-not-at-top
  out = common.unet_sd15().to_dict()
  out.update({k: cfg[k] for k in _UNET_KEYS if k in cfg})
  out['num_frames'] = num_frames
  return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> Dict[str, Any]:
  bad = [t for t in cfg.get('down_block_types', []) if t != 'DownEncoderBlock2D']
  bad += [t for t in cfg.get('up_block_types', []) if t != 'UpDecoderBlock2D']
  if bad or cfg.get('use_quant_conv', True) is False or cfg.get('use_post_quant_conv', True) is False \
      or cfg.get('mid_block_add_attention', True) is False or cfg.get('act_fn', 'silu') != 'silu':
    raise ConversionError(f'vae/config.json: unsupported autoencoder variant ({bad or dict(cfg)})')
  from magicvideo_jax import config as common  # pylint: disable=g-import-not-at-top
  out = common.vae_sd15().to_dict()
  out.update({k: cfg[k] for k in _VAE_KEYS if k in cfg and cfg[k] is not None})
  return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def text_config_from_transformers(cfg: Mapping[str, Any]) -> Dict[str, Any]:
  cfg = dict(cfg.get('text_config', cfg))
  from magicvideo_jax import config as common  # pylint: disable=g-import-not-at-top
  out = common.text_encoder_sd15().to_dict()
  out.update({k: cfg[k] for k in _TEXT_KEYS if k in cfg})
  return out


def scheduler_config_from_diffusers(cfg: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(our `diffusion` section, our `sampling` section) from a diffusers `scheduler_config.json`.

  The noise schedule (betas, timestep spacing, steps offset, set_alpha_to_one, prediction type) is
  taken as is; a DPMSolverMultistepScheduler selects our 'dpmsolver++' sampler (with its karras /
  lu_lambdas sigma spacing), any other class our DDIM sampler on the same schedule.
  """
  name = cfg.get('_class_name', 'DDIMScheduler')
  full = dict(_SCHEDULER_DEFAULTS, **_SCHEDULER_CLASS_DEFAULTS.get(name, {}))
  full.update({k: v for k, v in cfg.items() if k in full and v is not None})
  if cfg.get('thresholding'):
    raise ConversionError('scheduler_config.json: thresholding=True is not supported')
  diffusion_cfg = {k: full[k] for k in ('num_train_timesteps', 'beta_schedule', 'beta_start',
                                        'beta_end', 'prediction_type', 'timestep_spacing',
                                        'steps_offset', 'set_alpha_to_one',
                                        'rescale_betas_zero_snr')}
  if full['trained_betas'] is not None:
    diffusion_cfg['trained_betas'] = tuple(float(b) for b in full['trained_betas'])
  sampling = dict(sampler='ddim', num_inference_steps=50, guidance_scale=7.5, eta=0.0,
                  clip_sample=bool(full['clip_sample']),
                  clip_sample_range=float(cfg.get('clip_sample_range', 1.0)),
                  sigma_spacing=None, final_sigmas_type='zero')
  if name == 'DPMSolverMultistepScheduler':
    if cfg.get('algorithm_type', 'dpmsolver++') != 'dpmsolver++' or cfg.get('solver_order', 2) != 2:
      raise ConversionError('scheduler_config.json: only DPM-Solver++(2M) is implemented '
                            '(algorithm_type="dpmsolver++", solver_order=2)')
    sampling.update(sampler='dpmsolver++', clip_sample=False,
                    final_sigmas_type=cfg.get('final_sigmas_type', 'zero') or 'zero',
                    sigma_spacing=('karras' if cfg.get('use_karras_sigmas') else
                                   'lu_lambdas' if cfg.get('use_lu_lambdas') else None))
  return diffusion_cfg, sampling


def diffusion_config_from_diffusers(cfg: Mapping[str, Any]) -> Dict[str, Any]:
  return scheduler_config_from_diffusers(cfg)[0]


def upscaler_config_from_diffusers(src: str) -> Optional[Dict[str, Any]]:
  """Our `upscaler` section for a `StableDiffusionUpscalePipeline` folder (None for other folders).

  `noise_schedule`: the low-res scheduler's (a DDPMScheduler's) schedule, used only by its `add_noise`;
  `max_noise_level`: from `model_index.json`; `noise_level`: the pipeline's default.
  """
  path = os.path.join(src, 'low_res_scheduler', 'scheduler_config.json')
  if not os.path.isfile(path):
    return None
  from magicvideo_jax import diffusion  # pylint: disable=g-import-not-at-top
  low_res = _read_json(path)
  schedule = scheduler_config_from_diffusers(low_res)[0]
  if schedule['beta_schedule'] not in diffusion.BETA_SCHEDULES:
    raise ConversionError(f'{path}: beta_schedule={schedule["beta_schedule"]!r} is not supported '
                          f'(one of {diffusion.BETA_SCHEDULES})')
  index_path = os.path.join(src, 'model_index.json')
  index = _read_json(index_path) if os.path.isfile(index_path) else {}
  max_level = int(index.get('max_noise_level', _UPSCALER_DEFAULTS['max_noise_level']))
  return dict(noise_schedule=schedule, max_noise_level=max_level,
              noise_level=min(_UPSCALER_DEFAULTS['noise_level'], max_level))


def model_config_from_diffusers(src: str, num_frames: int = 16):
  """Our full config (model, diffusion, sampling, tokenizer, data) for a diffusers pipeline folder,
  plus an `upscaler` section for an upscale pipeline folder."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  unet_cfg = _read_json(os.path.join(src, 'unet', 'config.json'))
  vae_cfg = _read_json(os.path.join(src, 'vae', 'config.json'))
  text_cfg = _read_json(os.path.join(src, 'text_encoder', 'config.json'))
  sched_path = os.path.join(src, 'scheduler', 'scheduler_config.json')
  if os.path.isfile(sched_path):
    diffusion_cfg, sampling = scheduler_config_from_diffusers(_read_json(sched_path))
  else:  # No scheduler folder: SD 1.x's schedule.
    from magicvideo_jax import config as common  # pylint: disable=g-import-not-at-top
    diffusion_cfg = common.diffusion_sd15().to_dict()
    sampling = scheduler_config_from_diffusers({})[1]
  unet = unet_config_from_diffusers(unet_cfg, num_frames)
  vae = vae_config_from_diffusers(vae_cfg)
  sample_size = int(unet_cfg.get('sample_size', 32)) * 2 ** (len(vae['block_out_channels']) - 1)
  sections = dict(
      model=dict(text_encoder=text_config_from_transformers(text_cfg), vae=vae, unet=unet,
                 dtype='float32', param_dtype='float32', attention_impl=None, remat=False),
      diffusion=diffusion_cfg,
      sampling=sampling,
      tokenizer=dict(kind='clip', path=''),
      data=dict(num_frames=num_frames, resolution=sample_size, fps=8.0),
  )
  upscaler = upscaler_config_from_diffusers(src)
  if upscaler is not None:
    sections['upscaler'] = upscaler
    sampling.update(num_inference_steps=_UPSCALER_DEFAULTS['num_inference_steps'],
                    guidance_scale=_UPSCALER_DEFAULTS['guidance_scale'])
  return ml_collections.ConfigDict(sections)


def dummy_inputs(config) -> Dict[str, Any]:
  """Smallest inputs that create every parameter (parameter shapes do not depend on input sizes)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mc = config.model
  vae_factor = 2 ** (len(mc.vae.block_out_channels) - 1)
  latent = 2 ** (len(mc.unet.block_out_channels) - 1)
  return dict(
      input_ids=jnp.zeros((1, 1), jnp.int32),
      image=jnp.zeros((1, latent * vae_factor, latent * vae_factor, mc.vae.in_channels), jnp.float32),
      latents=jnp.zeros((1, 1, latent, latent, mc.unet.in_channels), jnp.float32),
      timesteps=jnp.zeros((1,), jnp.int32),
      context=jnp.zeros((1, 1, mc.unet.cross_attention_dim), jnp.float32),
      fps=jnp.ones((1,), jnp.float32),
      class_labels=jnp.zeros((1,), jnp.int32),
  )


def _unet_kwargs(config, x: Mapping[str, Any]) -> Dict[str, Any]:
  """Keyword inputs of `UNet.__call__` that create every parameter: fps, and class labels when the
  U-Net has a class embedding (the upscaler's noise level)."""
  kwargs = dict(fps=x['fps'])
  if config.model.unet.get('num_class_embeds'):
    kwargs['class_labels'] = x['class_labels']
  return kwargs


def abstract_params_for(config, modules: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Unboxed ShapeDtypeStructs of {'text_encoder', 'vae', 'unet'} (nothing allocated or compiled)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  modules = modules or models_lib.build_models(config.model)
  x = dummy_inputs(config)
  key = jax.random.key(0)
  shapes = lambda f: nn.unbox(jax.eval_shape(f, key)['params'])
  return dict(
      text_encoder=shapes(lambda k: modules['text_encoder'].init(k, x['input_ids'])),
      vae=shapes(lambda k: modules['vae'].init(k, x['image'])),
      unet=shapes(lambda k: modules['unet'].init(k, x['latents'], x['timesteps'], x['context'],
                                                 **_unet_kwargs(config, x))),
  )


def grow_params(module, params: Any, *args, seed: int = 0, method: Any = None, **kwargs) -> Params:
  """`params` completed with `module`'s init of the leaves they lack (the video-only ones).

  Runs `module.apply(..., *args, mutable=['params'])` once under `jax.jit`: only the missing leaves are
  drawn (a full `init` compiles every image parameter's initialiser too, several times slower).
  `args`/`kwargs` are example inputs that reach every missing parameter. Returns numpy arrays, unboxed.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  def grow(p, key):
    _, variables = module.apply({'params': p}, *args, rngs={'params': key}, mutable=['params'],
                                method=method, **kwargs)
    return nn.unbox(variables['params'])

  grown = jax.jit(grow)(params, jax.random.key(seed))
  return jax.tree.map(np.asarray, grown)


def grow_video_params(config, params: Mapping[str, Any], modules: Optional[Mapping[str, Any]] = None,
                      seed: int = 0) -> Dict[str, Any]:
  """Initialises the video-only leaves (U-Net adaptors, temporal layers, fps embedding; VideoVAE
  temporal layers) that `params` {'text_encoder', 'vae', 'unet'} lack, at their identity init."""
  from magicvideo_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  modules = modules or models_lib.build_models(config.model)
  template = abstract_params_for(config, modules)
  x = dummy_inputs(config)
  out = dict(params)
  for name in ('unet', 'vae'):
    have = set(iter_paths(params[name]))
    if all(p in have for p in iter_paths(template[name])):
      continue
    if name == 'unet':
      out[name] = grow_params(modules['unet'], params['unet'], x['latents'], x['timesteps'],
                              x['context'], seed=seed, **_unet_kwargs(config, x))
    else:
      out[name] = grow_params(modules['vae'], params['vae'], x['image'], seed=seed)
  return out


def load_model_state(folder: str, name: str) -> Tuple[Dict[str, np.ndarray], str]:
  """(state dict, prefix) of one model folder of a diffusers pipeline (`unet`, `vae`, `text_encoder`).

  The prefix maps a transformers 5 CLIPTextModel file (no `text_model.` prefix) onto our tree.
  """
  state = load_safetensors_folder(folder)
  prefix = ''
  if name == 'text_encoder' and not any(k.startswith('text_model.') for k in state):
    prefix = 'text_model'
  return state, prefix


def convert_diffusers_folder(src: str, num_frames: int = 16, seed: int = 0):
  """(config, params, tokenizer) of a diffusers SD folder; video-only params at identity init.

  Raises:
    FileNotFoundError: `src` or one of its model folders does not exist.
    ConversionError: pickle-only weights, an unsupported config, or a missing / unexpected /
      mis-shaped tensor (named in the message).
  """
  from magicvideo_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if os.path.isfile(src) and src.endswith(PICKLE_SUFFIXES):
    raise ConversionError(f'{src} is a pickle checkpoint; it is never loaded (it can run arbitrary '
                          'code). Convert it to a diffusers folder with safetensors weights first, '
                          'e.g. with diffusers `StableDiffusionPipeline.from_single_file(path)'
                          '.save_pretrained(out, safe_serialization=True)`.')
  if not os.path.isdir(src):
    raise FileNotFoundError(f'diffusers folder not found: {src}')
  config = model_config_from_diffusers(src, num_frames)
  modules = models_lib.build_models(config.model)
  template = abstract_params_for(config, modules)
  params = {}
  for name in MODEL_FILES:
    state, prefix = load_model_state(os.path.join(src, name), name)
    try:
      params[name] = state_dict_to_params(state, template[name], prefix=prefix,
                                          allow_missing_video=True)
    except ConversionError as e:
      raise ConversionError(f'{os.path.join(src, name)}: {e}') from None
  params = grow_video_params(config, params, modules, seed)
  tokenizer = tok_lib.load_tokenizer(os.path.join(src, 'tokenizer'),
                                     config.model.text_encoder.max_position_embeddings)
  return config, params, tokenizer


def export_diffusers(params: Mapping[str, Any], config, dst: str,
                     reference_dir: Optional[str] = None, tokenizer: Any = None) -> None:
  """Writes our image-part params as diffusers/transformers safetensors (`unet/`, `vae/`,
  `text_encoder/`, each with config.json; plus `tokenizer/`, `scheduler/`, `model_index.json`).

  With `reference_dir` (the diffusers folder the weights came from) its configs and other files are
  copied, its tensor layouts used (1x1 conv vs Linear) and its CLIP key style kept (with or without
  `text_model.`); otherwise configs are written from ours and CLIP keys carry SD's `text_model.` prefix.
  Video-only parameters are not exported (no diffusers model has them).
  """
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  os.makedirs(dst, exist_ok=True)
  for name, filename in MODEL_FILES.items():
    ndims = None
    out_dir = os.path.join(dst, name)
    os.makedirs(out_dir, exist_ok=True)
    state = params_to_state_dict(params[name])
    if reference_dir:
      ref = os.path.join(reference_dir, name)
      ref_state, prefix = load_model_state(ref, name)
      ndims = {(f'{prefix}.{k}' if prefix else k): v.ndim for k, v in ref_state.items()}
      state = params_to_state_dict(params[name], ndims)
      if prefix:
        state = {k[len(prefix) + 1:]: v for k, v in state.items()}
      shutil.copy(os.path.join(ref, 'config.json'), os.path.join(out_dir, 'config.json'))
    else:
      with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump(_diffusers_config(name, config, tokenizer), f, indent=1)
    save_safetensors(state, os.path.join(out_dir, filename))
  if reference_dir:
    for extra in ('tokenizer', 'scheduler', 'low_res_scheduler', 'model_index.json'):
      path = os.path.join(reference_dir, extra)
      target = os.path.join(dst, extra)
      if os.path.isdir(path):
        shutil.copytree(path, target, dirs_exist_ok=True)
      elif os.path.isfile(path):
        shutil.copy(path, target)
    return
  if tokenizer is not None:
    tokenizer.save(os.path.join(dst, 'tokenizer'))
  os.makedirs(os.path.join(dst, 'scheduler'), exist_ok=True)
  with open(os.path.join(dst, 'scheduler', 'scheduler_config.json'), 'w') as f:
    sched = {k: list(v) if isinstance(v, tuple) else v for k, v in config.diffusion.to_dict().items()}
    json.dump(dict(sched, _class_name='DDIMScheduler', clip_sample=bool(
        config.get('sampling', {}).get('clip_sample', False))), f, indent=1)
  upscaler = config.get('upscaler', None)
  if upscaler is not None:  # An upscale pipeline: its low-res noise schedule (DDPM add_noise).
    os.makedirs(os.path.join(dst, 'low_res_scheduler'), exist_ok=True)
    with open(os.path.join(dst, 'low_res_scheduler', 'scheduler_config.json'), 'w') as f:
      low_res = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in upscaler.noise_schedule.to_dict().items()}
      json.dump(dict(low_res, _class_name='DDPMScheduler'), f, indent=1)


def _diffusers_config(name: str, config, tokenizer: Any = None) -> Dict[str, Any]:
  mc = config.model
  if name == 'unet':
    out = {k: mc.unet[k] for k in _UNET_KEYS if k in mc.unet}
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
    hf = getattr(tokenizer, 'tokenizer', None)  # The special tokens' ids (CLIP tokenizers only).
    for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
      if getattr(hf, key, None) is not None:
        out[key] = int(getattr(hf, key))
  return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def refuse_pickle_args(*paths: Optional[str]) -> None:
  for path in paths:
    if path and os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
      raise ConversionError(f'{path} is a pickle checkpoint and is never loaded (it can run arbitrary '
                            'code): convert it to safetensors first, e.g. in PyTorch with diffusers '
                            '`StableDiffusionPipeline.from_single_file(path).save_pretrained(out, '
                            'safe_serialization=True)`, then pass that folder.')
