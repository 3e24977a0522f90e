r"""Weight import from diffusers / transformers folders (safetensors) and export back
(the `python -m magicvideo_jax.convert` CLI).

SRC is a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), each
model folder holding `config.json` and `*.safetensors`. A `StableDiffusionUpscalePipeline` folder (SD x4
upscaler: class-embedded noise level, only-cross-attention blocks, 3-level VAE) also has
`low_res_scheduler/`, whose noise schedule becomes the config's `upscaler` section (read by
`magicvideo_jax.sampling.upscaler`). DST becomes a checkpoint folder that the rest of the project loads
(`magicvideo_jax.weights.checkpoint.load_pretrained`): `config.json` (our config: model, diffusion and sampling
from the scheduler config, data), Orbax params and the tokenizer files. Export writes a folder
`diffusers.DiffusionPipeline.from_pretrained` loads (a StableDiffusionPipeline: our image-part weights as
diffusers / transformers safetensors, a DDIMScheduler config on our schedule, a word-level tokenizer also
as a `PreTrainedTokenizerFast`, `model_index.json`), in the reference folder's layout and CLIP key style
when `--reference_dir` is given, and beside it `magicvideo_video_layers/` (`VIDEO_LAYERS_DIR`): our
config.json and the video-only tensors, `<model>.<torch key>` in `video_layers.safetensors`. Importing
such a folder reads both back, so export -> import gives the same video model exactly.

Our Linen trees mirror the PyTorch state dicts, so the mapping is by name:
  torch `down_blocks.0.resnets.1.conv1.weight` <-> flax `down_blocks_0/resnets_1/conv1/kernel`
with `weight` -> `kernel` (transposed), `scale` (norms) or `embedding`, and `bias` -> `bias`.
transformers 5 writes CLIPTextModel without SD's `text_model.` prefix; both styles import.
Video-only parameters (a path component containing 'temporal' or 'adaptor', or starting with 'fps_',
or the `embedding_to_context` layer of models conditioned on CLIP embeddings, context.py) do not exist
in image checkpoints: importing a folder without `magicvideo_video_layers/`, `surgery.grow_video_params`
initialises the U-Net's and VAE's (identity at init) in one small jitted `apply`, so the converted video
model equals the image model frame by frame.
Pickle checkpoints (.ckpt, .bin, .pt, .pth) are never loaded; a missing, unexpected or mis-shaped tensor
is a `ConversionError` naming it.
"""

import json
import os
import shutil
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_collections
import numpy as np

from magicvideo_jax import config as common
from magicvideo_jax import diffusion
from magicvideo_jax import models as models_lib
from magicvideo_jax import tokenizer as tok_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import hub
from magicvideo_jax.weights import surgery
from magicvideo_jax.weights.torch_layout import (PICKLE_SUFFIXES, ConversionError, load_safetensors_folder,
                                                 params_to_state_dict, save_safetensors,
                                                 state_dict_to_params)


Params = Dict[str, Any]


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
# The video layers and our config beside an exported pipeline (`export_diffusers`).
VIDEO_LAYERS_DIR = 'magicvideo_video_layers'
VIDEO_LAYERS_FILE = 'video_layers.safetensors'
DIFFUSERS_VERSION = '0.42.1'  # The diffusers release exports are tested with.
MODEL_FILES = {'unet': 'diffusion_pytorch_model.safetensors',
               'vae': 'diffusion_pytorch_model.safetensors', 'text_encoder': 'model.safetensors'}


def _read_json(path: str) -> Dict[str, Any]:
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
  out = common.vae_sd15().to_dict()
  out.update({k: cfg[k] for k in _VAE_KEYS if k in cfg and cfg[k] is not None})
  return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def text_config_from_transformers(cfg: Mapping[str, Any]) -> Dict[str, Any]:
  cfg = dict(cfg.get('text_config', cfg))
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
  plus an `upscaler` section for an upscale pipeline folder. A folder we exported carries our own
  config beside its video layers (`VIDEO_LAYERS_DIR/config.json`): that one, whatever `num_frames`."""
  stored = os.path.join(src, VIDEO_LAYERS_DIR, 'config.json')
  if os.path.isfile(stored):
    with open(stored) as f:
      return common.fill_defaults(ckpt_lib.config_from_json(f.read()))
  unet_cfg = _read_json(os.path.join(src, 'unet', 'config.json'))
  vae_cfg = _read_json(os.path.join(src, 'vae', 'config.json'))
  text_cfg = _read_json(os.path.join(src, 'text_encoder', 'config.json'))
  sched_path = os.path.join(src, 'scheduler', 'scheduler_config.json')
  if os.path.isfile(sched_path):
    diffusion_cfg, sampling = scheduler_config_from_diffusers(_read_json(sched_path))
  else:  # No scheduler folder: SD 1.x's schedule.
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
  return common.fill_defaults(ml_collections.ConfigDict(sections))


def load_model_state(folder: str, name: str) -> Tuple[Dict[str, np.ndarray], str]:
  """(state dict, prefix) of one model folder of a diffusers pipeline (`unet`, `vae`, `text_encoder`).

  The prefix maps a transformers 5 CLIPTextModel file (no `text_model.` prefix) onto our tree.
  """
  state = load_safetensors_folder(folder)
  prefix = ''
  if name == 'text_encoder' and not any(k.startswith('text_model.') for k in state):
    prefix = 'text_model'
  return state, prefix


def load_video_layers(src: str) -> Dict[str, Dict[str, np.ndarray]]:
  """{model: state dict} of an exported folder's `VIDEO_LAYERS_DIR` ({} when it has none)."""
  path = os.path.join(src, VIDEO_LAYERS_DIR, VIDEO_LAYERS_FILE)
  if not os.path.isfile(path):
    return {}
  out: Dict[str, Dict[str, np.ndarray]] = {}
  for key, value in load_safetensors_folder(os.path.dirname(path)).items():
    name, _, torch_key = key.partition('.')
    out.setdefault(name, {})[torch_key] = value
  return out


def convert_diffusers_folder(src: str, num_frames: int = 16, seed: int = 0):
  """(config, params, tokenizer) of a diffusers SD folder (or a Hub repository id in the local
  Hugging Face cache, `hub.resolve`); video-only params at identity init, or an export's own.

  Raises:
    FileNotFoundError: `src` or one of its model folders does not exist (a repository id: is not
      in the cache; the message names the command that downloads it).
    ConversionError: pickle-only weights, an unsupported config, or a missing / unexpected /
      mis-shaped tensor (named in the message).
  """
  src = check_pipeline_folder(src)
  config = model_config_from_diffusers(src, num_frames)
  modules = models_lib.build_models(config.model)
  video = load_video_layers(src)
  params = load_pipeline_params(src, surgery.abstract_params_for(config, modules), video)
  if not video:  # An image checkpoint: the video layers at their identity init.
    params = surgery.grow_video_params(config, params, modules, seed)
  tokenizer = tok_lib.load_tokenizer(os.path.join(src, 'tokenizer'),
                                     config.model.text_encoder.max_position_embeddings)
  return config, params, tokenizer


def check_pipeline_folder(src: str) -> str:
  """The folder `src` names (a Hub id: its snapshot in the local cache, `hub.resolve`); raises unless
  it is one (a pickle file is refused with the way to convert it)."""
  if os.path.isfile(src) and src.endswith(PICKLE_SUFFIXES):
    raise ConversionError(f'{src} is a pickle checkpoint; it is never loaded (it can run arbitrary '
                          'code). Convert it to a diffusers folder with safetensors weights first, '
                          'e.g. with diffusers `StableDiffusionPipeline.from_single_file(path)'
                          '.save_pretrained(out, safe_serialization=True)`.')
  src = hub.resolve(src)
  if not os.path.isdir(src):
    raise FileNotFoundError(f'diffusers folder not found: {src}')
  return src


def load_pipeline_params(src: str, template: Mapping[str, Any],
                         video: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None) -> Params:
  """{'unet', 'vae', 'text_encoder'} params of a diffusers folder on `template`'s names and shapes,
  the video-only leaves left out; with `video` (an export's `load_video_layers`), every group and
  leaf of `template`, from both."""
  params = {}
  for name in (template if video else MODEL_FILES):
    state, prefix = load_model_state(os.path.join(src, name), name) if name in MODEL_FILES else ({}, '')
    state.update({k[len(prefix) + 1:] if prefix and k.startswith(prefix + '.') else k: v
                  for k, v in (video or {}).get(name, {}).items()})
    try:
      params[name] = state_dict_to_params(state, template[name], prefix=prefix,
                                          allow_missing_video=not video)
    except ConversionError as e:
      raise ConversionError(f'{os.path.join(src, name)}: {e}') from None
  return params


def export_diffusers(params: Mapping[str, Any], config, dst: str,
                     reference_dir: Optional[str] = None, tokenizer: Any = None) -> None:
  """Writes a folder `diffusers.DiffusionPipeline.from_pretrained` loads (a StableDiffusionPipeline:
  `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json`), plus the video
  layers and our config in `magicvideo_video_layers/` (`VIDEO_LAYERS_DIR`), which diffusers ignores and
  `convert_diffusers_folder` reads back, so export -> import gives the same model exactly.

  With `reference_dir` (the diffusers folder the weights came from) its configs and other files are
  copied, its tensor layouts used (1x1 conv vs Linear) and its CLIP key style kept (with or without
  `text_model.`); otherwise configs are written from ours (the scheduler: a DDIMScheduler on
  `config.diffusion`'s schedule), CLIP keys carry SD's `text_model.` prefix, and a word-level tokenizer
  is also written as a `PreTrainedTokenizerFast`.
  """
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
      _write_json(os.path.join(out_dir, 'config.json'), _diffusers_config(name, config, tokenizer))
    save_safetensors(state, os.path.join(out_dir, filename))
  _export_video_layers(params, config, dst)
  from_reference = lambda name: bool(reference_dir) and os.path.exists(os.path.join(reference_dir, name))
  for extra in ('tokenizer', 'scheduler', 'low_res_scheduler', 'model_index.json'):
    if from_reference(extra):  # The reference's own files, as they are.
      path, target = os.path.join(reference_dir, extra), os.path.join(dst, extra)
      if os.path.isdir(path):
        shutil.copytree(path, target, dirs_exist_ok=True)
      else:
        shutil.copy(path, target)
  if tokenizer is not None and not from_reference('tokenizer'):
    if isinstance(tokenizer, tok_lib.WordTokenizer):
      tokenizer.save_transformers(os.path.join(dst, 'tokenizer'))
    else:
      tokenizer.save(os.path.join(dst, 'tokenizer'))
  if not from_reference('scheduler'):
    _write_json(os.path.join(dst, 'scheduler', 'scheduler_config.json'),
                scheduler_config_for_diffusers(config))
  if 'upscaler' in config and not from_reference('low_res_scheduler'):
    upscaler = config.upscaler  # An upscale pipeline: its low-res noise schedule (DDPM add_noise).
    low_res = {k: list(v) if isinstance(v, tuple) else v
               for k, v in upscaler.noise_schedule.to_dict().items()}
    _write_json(os.path.join(dst, 'low_res_scheduler', 'scheduler_config.json'),
                dict(low_res, _class_name='DDPMScheduler'))
  if not from_reference('model_index.json'):
    _write_json(os.path.join(dst, 'model_index.json'), model_index(config, tokenizer))


def scheduler_config_for_diffusers(config) -> Dict[str, Any]:
  """A DDIMScheduler config on our `config.diffusion` schedule (what `scheduler_config_from_diffusers`
  reads back as the same schedule)."""
  ours = config.diffusion
  out = dict(_class_name='DDIMScheduler', _diffusers_version=DIFFUSERS_VERSION)
  for key in ('num_train_timesteps', 'beta_schedule', 'beta_start', 'beta_end', 'prediction_type',
              'timestep_spacing', 'steps_offset', 'set_alpha_to_one', 'rescale_betas_zero_snr'):
    out[key] = ours[key]
  trained = ours.get('trained_betas', None)
  out['trained_betas'] = list(trained) if trained else None
  out.update(clip_sample=bool(config.sampling.clip_sample),
             clip_sample_range=float(config.sampling.get('clip_sample_range', 1.0)),
             thresholding=False)
  return out


def model_index(config, tokenizer: Any = None) -> Dict[str, Any]:
  """`model_index.json` of the exported pipeline: diffusers' pipeline class and its components."""
  upscale = 'upscaler' in config
  tokenizer_class = ('PreTrainedTokenizerFast' if isinstance(tokenizer, tok_lib.WordTokenizer)
                     else 'CLIPTokenizer')
  out = dict(_class_name='StableDiffusionUpscalePipeline' if upscale else 'StableDiffusionPipeline',
             _diffusers_version=DIFFUSERS_VERSION, scheduler=['diffusers', 'DDIMScheduler'],
             text_encoder=['transformers', 'CLIPTextModel'],
             tokenizer=['transformers', tokenizer_class],
             unet=['diffusers', 'UNet2DConditionModel'], vae=['diffusers', 'AutoencoderKL'])
  if upscale:
    out.update(low_res_scheduler=['diffusers', 'DDPMScheduler'],
               max_noise_level=int(config.upscaler.max_noise_level))
  else:
    out.update(safety_checker=[None, None], feature_extractor=[None, None],
               image_encoder=[None, None], requires_safety_checker=False)
  return out


def _export_video_layers(params: Mapping[str, Any], config, dst: str) -> None:
  """`VIDEO_LAYERS_DIR/`: our config.json and the tensors no diffusers model has (`VIDEO_LAYERS_FILE`:
  `<model>.<torch key>`, e.g. `unet.mid_block.resnets.0.conv1_adaptor.scale`; every tensor of a
  parameter group other than unet / vae / text_encoder)."""
  state = {}
  for name, group in params.items():
    if name in MODEL_FILES:
      image = params_to_state_dict(group)
      group_state = {k: v for k, v in params_to_state_dict(group, include_video=True).items()
                     if k not in image}
    else:
      group_state = params_to_state_dict(group, include_video=True)
    state.update({f'{name}.{k}': v for k, v in group_state.items()})
  folder = os.path.join(dst, VIDEO_LAYERS_DIR)
  os.makedirs(folder, exist_ok=True)
  save_safetensors(state, os.path.join(folder, VIDEO_LAYERS_FILE))
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    f.write(ckpt_lib.config_to_json(config))


def _write_json(path: str, content: Mapping[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(content, f, indent=1)


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


