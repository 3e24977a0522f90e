"""MagicVideoPipeline: prompt -> video, the whole denoising loop in one jit.

    pipe = MagicVideoPipeline.from_pretrained('path/to/checkpoint')   # or a diffusers SD folder
    video = pipe('a red circle moving left', num_frames=16, seed=0)   # [1, F, H, W, 3] uint8
    out = pipe(prompt_embeds=pipe.encode_prompt(['a red circle']), num_videos_per_prompt=2,
               output_type='pil', return_dict=True)                 # out.frames: 2 lists of frames

The text encoder runs in one `jax.jit` (`encode_prompt`), the DDIM / DPM-Solver++ loop with
classifier-free guidance (unconditional or negative-prompt batch and conditional batch concatenated)
in a second, the VAE decode in a third. Each is compiled once per shape and static option (sampler,
steps, eta, guidance on/off, step callback on/off) and cached in `pipe.compiled`; prompts, prompt
embeddings, seeds, initial latents, fps, the guidance scale and which step callback are traced or
looked up at run time, so new ones do not recompile (`pipe.trace_count` counts traces of the
denoising function).

The prompt batch is sharded over the mesh's ('data', 'fsdp') axes (padded to a multiple of the device
count); parameters are replicated.

The cascade (`magicvideo_jax/cascade.py`): given an interpolation and / or a super-resolution stage
(`from_pretrained(base, interpolation=DIR, upscaler=DIR)` or a cascade folder with base/,
interpolation/, upscaler/), the call runs base -> interpolation -> SR, each with its own steps and
guidance (`interpolation_steps`, `upscale_steps`, ...).
"""

import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import einops
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from magicvideo_jax import context as context_lib
from magicvideo_jax import diffusion
from magicvideo_jax import lora as lora_lib
from magicvideo_jax import models as models_lib
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax.sampling import cascade
from magicvideo_jax.sampling import image_to_video
from magicvideo_jax.sampling import long_video as long_video_lib
from magicvideo_jax.sampling import request as request_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import convert
from magicvideo_jax.weights import hub
from magicvideo_jax.weights import lora_io
from magicvideo_jax.weights import torch_layout

DEFAULT_DIFFUSERS_FRAMES = 16


# --------------------------------------------------------------------------------------------------
# Checkpoint folders and request validation (no weights needed: the CLI checks before loading).


def checkpoint_kind(path: str) -> Tuple[str, str]:
  """('pretrained' | 'diffusers', folder) of a checkpoint folder, a training workdir, a diffusers
  folder, or a Hub repository id in the local Hugging Face cache (`weights/hub.py`). Raises
  FileNotFoundError naming what was expected."""
  path = hub.resolve(path)
  if os.path.isfile(path):
    if path.endswith(torch_layout.PICKLE_SUFFIXES):
      raise torch_layout.ConversionError(
          f'{path} is a pickle checkpoint and is never loaded (it can run arbitrary code): convert it '
          'to safetensors first (a diffusers folder, e.g. `StableDiffusionPipeline.from_single_file('
          'path).save_pretrained(out, safe_serialization=True)` in PyTorch) and pass that folder.')
    raise FileNotFoundError(f'{path} is a file; expected a checkpoint folder (config.json + params/) '
                            'or a diffusers folder (unet/, vae/, text_encoder/, tokenizer/)')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint folder not found: {path}')
  folder = ckpt_lib.model_folder(path)
  if folder is not None:
    return 'pretrained', folder
  if os.path.isfile(os.path.join(path, 'unet', 'config.json')):
    return 'diffusers', path
  raise FileNotFoundError(
      f'{path} is neither a magicvideo_jax checkpoint folder (config.json + params/), a training '
      'workdir with an exported model/, nor a diffusers folder (unet/config.json ...)')


def load_config(path: str, num_frames: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config of a checkpoint (for a diffusers folder: what conversion would give); no weights."""
  kind, folder = checkpoint_kind(path)
  if kind == 'pretrained':
    return ckpt_lib.load_config(folder)
  return convert.model_config_from_diffusers(folder, num_frames or DEFAULT_DIFFUSERS_FRAMES)


def is_video_model(config: ml_collections.ConfigDict) -> bool:
  unet = config.model.unet
  return bool(unet.get('frame_adaptor', False) or unet.get('temporal_attention', 'none') != 'none'
              or unet.get('fps_embedding', False))


def max_frames(config: ml_collections.ConfigDict) -> Optional[int]:
  """The longest clip the model supports (None: any number of independent frames)."""
  limits = []
  if is_video_model(config):
    limits.append(int(config.model.unet.get('num_frames', 1)))
    if config.model.unet.get('temporal_attention') == 'animatediff':  # Its frame-position table.
      limits.append(int(config.model.unet.get('motion_max_seq_length', 32)))
  if models_lib.uses_video_vae(config.model):
    vv = config.model.video_vae
    limits.append(int(vv.get('num_frames', config.model.unet.get('num_frames', 16))))
  return min(limits) if limits else None


def size_multiple(config: ml_collections.ConfigDict) -> Tuple[int, int]:
  """(VAE factor, required multiple of height / width): the VAE factor times the U-Net's."""
  vae_factor = 2 ** (len(config.model.vae.block_out_channels) - 1)
  return vae_factor, vae_factor * 2 ** (len(config.model.unet.block_out_channels) - 1)


def validate_request(config: ml_collections.ConfigDict, *, windowed: bool = False,
                     **settings) -> request_lib.Request:
  """The base stage's request (`request.resolve` with the clip size) checked against the model: a
  ValueError names the offending argument and what the model supports. `windowed`: the U-Net runs
  on windows of the model's length, so num_frames may exceed it."""
  req = request_lib.resolve(config, geometry=True, **settings)
  limit = max_frames(config)
  if limit is not None and req.num_frames > limit and not windowed:
    keys = 'config.model.unet.num_frames'
    if config.model.unet.get('temporal_attention') == 'animatediff':
      keys += ' / motion_max_seq_length'
    raise ValueError(f'num_frames={req.num_frames} is more than this model makes at once ({limit}, '
                     f"{keys}): long_video='causal' or 'freenoise' (sample --long_video) "
                     'generates longer videos')
  vae_factor, multiple = size_multiple(config)
  for name, size in (('height', req.height), ('width', req.width)):
    if size % multiple:
      raise ValueError(f'{name}={size!r} must be a positive multiple of {multiple} (VAE downsampling '
                       f'factor {vae_factor} x U-Net downsampling factor {multiple // vae_factor})')
  return req


# --------------------------------------------------------------------------------------------------
# The pipeline.


@dataclasses.dataclass
class MagicVideoPipelineOutput:
  """What `pipe(..., return_dict=True)` returns (as diffusers' pipeline outputs).

  frames: the videos in the call's output_type: numpy `[B, F, H, W, 3]` ('uint8', 'float', 'np'), a
    list per video of lists of `PIL.Image` frames ('pil'), or the latents `[B, F, h, w, c]` ('latent').
  """
  frames: Union[np.ndarray, List[List[Any]]]


class MagicVideoPipeline:
  """Text-to-video sampling with a converted or trained checkpoint.

  Attributes:
    config: the checkpoint's config (model, diffusion, sampling, data sections).
    params: {'text_encoder', 'vae', 'unet'} params (and 'clip', the dual encoder of a model
      conditioned on CLIP embeddings), replicated over `mesh`: what sampling uses, LoRA adapters
      added. Assigning params with a 'lora' entry (a LoRA run's) adds those adapters at
      alpha / rank; `load_lora_weights` adds adapters on top at their own scale.
    compiled: cache of compiled executables, keyed by (stage, shape, static options).
    trace_count: how many times the denoising function was traced (tests check it stays put).
    interpolator, upscaler: the cascade's later stages (`interpolation.KeyframeInterpolator`,
      `upscaler.VideoUpscaler`), or None.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Dict[str, Any], tokenizer: Any, *,
               modules: Optional[Dict[str, Any]] = None, mesh: Optional[jax.sharding.Mesh] = None,
               schedule: Optional[diffusion.Schedule] = None, verbose: bool = False,
               interpolator: Any = None, upscaler: Any = None):
    self.config = config
    self.interpolator, self.upscaler = interpolator, upscaler
    self.tokenizer = tokenizer
    self.modules = modules or models_lib.build_models(config.model)
    self.schedule = schedule or diffusion.Schedule.from_config(config.diffusion)
    self.mesh = mesh or sharding_lib.create_mesh({'data': -1, 'fsdp': 1})
    self.verbose = verbose
    self.params_sharding = NamedSharding(self.mesh, P())  # Replicated.
    self._adapters: Dict[str, Tuple[Any, float]] = {}  # name -> (lora tree, scale).
    self.params = params
    self.video_vae = models_lib.uses_video_vae(config.model)
    self.max_frames = max_frames(config)
    self.vae_factor = size_multiple(config)[0]
    # A first-frame-conditioned model (sampling/image_to_video.py) takes the condition channels too.
    self.image_conditioned = image_to_video.is_image_to_video_config(config)
    if self.image_conditioned:
      image_to_video.check_unet(config)
    self.latent_channels = int(config.model.unet.out_channels if self.image_conditioned
                               else config.model.unet.in_channels)
    self.compiled: Dict[Any, Any] = {}
    self.trace_count = 0
    self._context_spec: Optional[jax.ShapeDtypeStruct] = None  # Of one encoded prompt.
    self._step_callback: Optional[Callable[[int, int], None]] = None  # The current call's.
    self._step_callback_error: Optional[BaseException] = None
    self._encode = jax.jit(self._encode_text)
    self._denoise = jax.jit(self._denoise_impl, static_argnames=(
        'num_inference_steps', 'sampler', 'eta', 'do_cfg', 'use_fps', 'show_progress',
        'use_callback', 'sigma_spacing', 'final_sigmas_type', 'clip_sample', 'temporal_window'))
    self._decode = jax.jit(self._decode_impl, static_argnames=('use_video_vae',))
    self._encode_frames = jax.jit(lambda params, frames: models_lib.encode_frames(
        self.modules['vae'], params['vae'], frames, self.config.model.vae.scaling_factor))

  # ------------------------------------------------------------------------------------------------
  # Loading.

  @classmethod
  def from_pretrained(cls, path: str, *, num_frames: Optional[int] = None,
                      mesh: Optional[jax.sharding.Mesh] = None, verbose: bool = False,
                      interpolation: Optional[str] = None, upscaler: Optional[str] = None,
                      **overrides) -> 'MagicVideoPipeline':
    """From a checkpoint folder (convert / training export), a training workdir, a diffusers folder,
    or a Hub repository id (`org/name`) already in the local Hugging Face cache (`weights/hub.py`).

    With `interpolation` / `upscaler` (checkpoint folders or workdirs), or when `path` is a cascade
    folder (base/, interpolation/, upscaler/), the pipeline runs those stages after the base
    (`magicvideo_jax/cascade.py`).

    A diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) is converted on the
    fly; its video layers get their identity init for `num_frames` frames (default 16), and its
    scheduler config (betas, spacing, offset, set_alpha_to_one, prediction type, DDIM or DPM-Solver++)
    is honoured. `overrides` replace keys of `config.model` (e.g. dtype='bfloat16').

    Raises:
      FileNotFoundError: `path` is missing or not a checkpoint.
      torch_layout.ConversionError: a diffusers folder that does not fit (named tensor or config key).
    """
    t0 = time.time()
    path, interpolation, upscaler = cascade.resolve_folders(path, interpolation, upscaler)
    kind, folder = checkpoint_kind(path)
    if verbose:
      print(f'loading {folder} ({kind}) ...', file=sys.stderr, flush=True)
    if kind == 'pretrained':
      config, params, tokenizer = ckpt_lib.load_pretrained(folder)
    else:
      config, params, tokenizer = convert.convert_diffusers_folder(
          folder, num_frames=num_frames or DEFAULT_DIFFUSERS_FRAMES)
    for key, value in overrides.items():
      config.model[key] = value
    if models_lib.is_cmd(config.model) and not issubclass(cls, CMDPipeline):
      cls = CMDPipeline  # A CMD checkpoint samples with its own pipeline.
    elif issubclass(cls, CMDPipeline) and not models_lib.is_cmd(config.model):
      raise ValueError(f'{path} is not a CMD checkpoint; load it with MagicVideoPipeline')
    interpolator, upscaler = cascade.load_stages(interpolation, upscaler)
    pipe = cls(config, params, tokenizer, mesh=mesh, verbose=verbose, interpolator=interpolator,
               upscaler=upscaler)
    stages = [name for name, folder in (('interpolation', interpolation), ('upscaler', upscaler))
              if folder]
    pipe.log(f'loaded {path} ({kind}){" + " + ", ".join(stages) if stages else ""} in '
              f'{time.time() - t0:.1f} s')
    return pipe

  # ------------------------------------------------------------------------------------------------
  # Parameters and LoRA adapters.

  @property
  def params(self) -> Dict[str, Any]:
    return self._params

  @params.setter
  def params(self, params: Dict[str, Any]) -> None:
    base = lora_lib.fold(params, lora_lib.scale(self.config))
    self._base_params = jax.device_put(base, self.params_sharding)
    self._apply_adapters()

  def _apply_adapters(self) -> None:
    params = self._base_params
    for lora_params, scale in self._adapters.values():
      params = self._fold(params, lora_params, scale)
    self._params = params

  @staticmethod
  @jax.jit
  def _fold(params, lora_params, scale):
    return lora_lib.fold(params, scale, lora_params)

  def load_lora_weights(self, path: str, scale: float = 1.0,
                        adapter_name: str = 'default') -> 'MagicVideoPipeline':
    """Adds the adapters of a LoRA file or folder (diffusers / PEFT safetensors layout:
    `weights/lora_io.py`) at `scale`; loading under an existing `adapter_name` replaces it.
    The base weights are kept: `set_lora_scale`, `unload_lora_weights` change or drop adapters
    without reloading; `fuse_lora` makes them part of the base. No recompilation."""
    lora_params = lora_io.load(path, jax.device_get(self._base_params))
    self._adapters[adapter_name] = (jax.device_put(lora_params, self.params_sharding), float(scale))
    self._apply_adapters()
    self.log(f'LoRA {adapter_name!r}: {lora_lib.count(lora_params):,} parameters on '
             f'{len(lora_lib.adapters(lora_params))} kernels from {path}, scale {scale}')
    return self

  def set_lora_scale(self, scale: float, adapter_name: str = 'default') -> None:
    if adapter_name not in self._adapters:
      raise KeyError(f'no LoRA adapter named {adapter_name!r}; loaded: {sorted(self._adapters)}')
    self._adapters[adapter_name] = (self._adapters[adapter_name][0], float(scale))
    self._apply_adapters()

  def unload_lora_weights(self) -> None:
    """Drops every adapter that `load_lora_weights` added (the base weights come back)."""
    self._adapters = {}
    self._apply_adapters()

  def fuse_lora(self) -> None:
    """Adds the loaded adapters to the base weights for good (then nothing is left to unload)."""
    self._base_params, self._adapters = self._params, {}

  @property
  def lora_adapters(self) -> Dict[str, float]:
    """Name -> scale of the adapters loaded with `load_lora_weights`."""
    return {name: scale for name, (_, scale) in self._adapters.items()}

  # ------------------------------------------------------------------------------------------------
  # The jitted pieces.

  def _encode_text(self, params, input_ids):
    # Text tokens, or (models trained on CLIP embeddings) the prompt's CLIP text embedding as
    # context tokens, "" giving the zero embedding: see context.py.
    return context_lib.text_context(self.config.model, self.modules, params, input_ids)

  def _denoise_impl(self, params, context, uncond_context, latents, key, fps, guidance_scale,
                    known=None, known_noise=None, condition=None, *,
                    num_inference_steps: int, sampler: str, eta: float, do_cfg: bool, use_fps: bool,
                    show_progress: bool, use_callback: bool, sigma_spacing: Optional[str],
                    final_sigmas_type: str, clip_sample: Optional[float],
                    temporal_window: Optional[Tuple[int, int]] = None):
    """Unit-noise latents `[B, F, h, w, c]` -> denoised latents (as the U-Net sees them, scaled),
    conditioned on encoded prompts `[B, L, D]` (`_encode_text`; uncond_context used with do_cfg).

    With `known` `[B, k, h, w, c]` (clean scaled latents) the first k frames are given: every model
    call sees them noised to its timestep with the fixed `known_noise` (latent inpainting, as
    RePaint without resampling), and the result holds them exactly. Under directed temporal
    attention the given frames lead and the rest follow them.

    With `temporal_window` (length, stride) the U-Net runs on overlapping windows of the frames,
    fused frame by frame (`long_video.fuse_windows`).

    With `condition` `[B, F, h, w, c + 1]` (an image-to-video model's) it is concatenated to the
    latents at every call, the same in both halves of guidance.
    """
    self.trace_count += 1  # Python side effect: runs once per trace, not per call.
    unet = self.modules['unet']
    if do_cfg:  # Unconditional (or negative) first, as diffusers.
      context = jnp.concatenate([uncond_context, context], axis=0)
      fps = jnp.concatenate([fps, fps], axis=0)
      condition = None if condition is None else jnp.concatenate([condition, condition], axis=0)
    fps = fps if use_fps else None

    def apply(x_in, timesteps):
      if show_progress:
        jax.debug.callback(self._on_step, timesteps[0])
      if temporal_window is None:
        return unet.apply({'params': params['unet']}, x_in.astype(unet.dtype), timesteps, context,
                          fps=fps)
      return long_video_lib.fuse_windows(
          lambda windows, repeat: unet.apply({'params': params['unet']}, windows.astype(unet.dtype),
                                             repeat(timesteps), repeat(context), fps=repeat(fps)),
          x_in, *temporal_window)

    model_fn = diffusion.guided_model_fn(apply, guidance_scale if do_cfg else None,
                                         condition=condition)
    if known is not None:
      guided, k = model_fn, known.shape[1]

      def model_fn(x, t):  # pylint: disable=function-redefined
        given = diffusion.add_noise(self.schedule, known, known_noise, jnp.broadcast_to(
            t, known.shape[:1]))
        return guided(x.at[:, :k].set(given), t)

    options = diffusion.sampler_options(sampler, eta=eta, key=key,
                                        clip_sample=clip_sample is not None,
                                        sigma_spacing=sigma_spacing,
                                        final_sigmas_type=final_sigmas_type)
    # The host callback gets one latent value of the step's result, so it runs after the step.
    on_step = (lambda i, x: jax.debug.callback(self._on_step_end, i, x[(0,) * x.ndim])
               ) if use_callback else None
    x = diffusion.sample_loop(model_fn, latents, self.schedule, num_inference_steps,
                              sampler=sampler, on_step=on_step, **options)
    if known is not None:
      x = x.at[:, :known.shape[1]].set(known)
    return x

  def _decode_impl(self, params, latents, use_video_vae: bool = True):
    """Scaled latents `[B, F, h, w, c]` -> frames `[B, F, H, W, 3]` in [0, 1].

    With a VideoVAE and `use_video_vae=False`, the frames go through the image decoder alone (the same
    parameters without the temporal layers), for comparisons.
    """
    vae = self.modules['vae']
    z = latents / self.config.model.vae.scaling_factor
    if self.video_vae and not use_video_vae:
      vae = models_lib.build_vae(_without_video_vae(self.config.model))
    if self.video_vae and use_video_vae:  # The temporal decoder sees whole clips.
      frames = vae.apply({'params': params['vae']}, z, method='decode_video')
    else:
      b = latents.shape[0]
      z = einops.rearrange(z, 'b f h w c -> (b f) h w c')
      frames = vae.apply({'params': params['vae']}, z, method='decode')
      frames = einops.rearrange(frames, '(b f) h w c -> b f h w c', b=b)
    return jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  # ------------------------------------------------------------------------------------------------
  # The call.

  def __call__(self, prompt: Union[None, str, Sequence[str]] = None,
               negative_prompt: Union[None, str, Sequence[str]] = None,
               num_frames: Optional[int] = None,
               height: Optional[int] = None, width: Optional[int] = None,
               num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
               eta: Optional[float] = None, fps: Optional[float] = None, seed: int = 0,
               latents: Optional[np.ndarray] = None, sampler: Optional[str] = None,
               output_type: str = 'uint8', sigma_spacing: Optional[str] = None,
               use_video_vae: bool = True, interpolate: bool = True, upscale: bool = True,
               interpolation_steps: Optional[int] = None,
               interpolation_guidance_scale: Optional[float] = None,
               upscale_steps: Optional[int] = None, upscale_guidance_scale: Optional[float] = None,
               noise_level: Optional[int] = None,
               upscale_strength: Optional[float] = None, *, num_videos_per_prompt: int = 1,
               prompt_embeds: Optional[Any] = None, negative_prompt_embeds: Optional[Any] = None,
               return_dict: bool = False,
               callback_on_step_end: Optional[Callable[[int, int], None]] = None,
               known_latents: Optional[Any] = None, image: Optional[Any] = None,
               long_video: Optional[str] = None,
               long_video_overlap: Optional[int] = None,
               temporal_window: Optional[Tuple[int, int]] = None) -> Any:
    """Generates num_videos_per_prompt videos per prompt (through the cascade's stages when the
    pipeline has them).

    Args:
      prompt: a prompt or a non-empty list of prompts. "" is the unconditional prompt. None only
        with `prompt_embeds`.
      negative_prompt: one for all prompts or one per prompt; None: "" (as diffusers). Used only
        with guidance_scale > 1.
      Every setting left None takes the checkpoint's default (`sampling/request.py`): the sampler
      settings from config.sampling, the clip size and fps from config.data.
      num_frames, height, width: the clip size; height and width multiples of the VAE factor times
        the U-Net's (`size_multiple`), num_frames at most the model's `max_frames`.
      num_inference_steps: sampler steps.
      guidance_scale: classifier-free guidance weight w in uncond + w (cond - uncond); <= 1 runs
        the conditional model only.
      eta: DDIM stochasticity (0: deterministic DDIM; other samplers: 0).
      fps: frame-rate conditioning (models with an fps embedding).
      seed: seeds the initial noise (unless `latents` is given) and DDIM's noise for eta > 0.
      latents: initial unit noise `[B, num_frames, height/f, width/f, latent_channels]`, B = the
        number of prompts x num_videos_per_prompt (in the order of the videos).
      sampler: 'ddim' or 'dpmsolver++' (DPM-Solver++(2M)).
      output_type: 'uint8' `[B, F, H, W, 3]`; 'float' or 'np' (the same, float32 in [0, 1]; 'np'
        is diffusers' name); 'pil' (a list per video of its frames as `PIL.Image`s, from the
        uint8); 'latent' (the denoised latents `[B, F, h, w, c]`, scaled; of the last stage run).
      sigma_spacing: DPM-Solver++ only: 'karras' or 'lu_lambdas' (None in the config: the
        schedule's timesteps).
      use_video_vae: with a VideoVAE checkpoint, False decodes frame by frame with the image decoder.
      interpolate, upscale: False skips the interpolation / super-resolution stage (when loaded).
      interpolation_steps, interpolation_guidance_scale: the interpolation stage's sampler steps and
        text guidance (default: its config.sampling).
      upscale_steps, upscale_guidance_scale, noise_level, upscale_strength: the super-resolution
        stage's steps, guidance, low-res noise augmentation level and strength (< 1: start from
        its upsampled input, `VideoUpscaler.__call__`) (default: its config).
      num_videos_per_prompt: videos per prompt, consecutive as in diffusers (prompt 0's n videos,
        then prompt 1's ...); negative prompts (and embeddings) are repeated alike. The cascade's
        stages get the repeated prompts, so it works there too.
      prompt_embeds: instead of `prompt`, its encoding `[P, L, D]` as `encode_prompt` returns it
        (what the denoiser conditions on: the text encoder's last hidden state, L the tokenizer's
        length and D the U-Net's cross_attention_dim; for a model conditioned on CLIP embeddings
        (`context.uses_clip_embedding`) the embedding's context tokens `[P, num_tokens, D]`, which
        `encode_prompt` gives too). Not with a cascade stage (they encode the prompts themselves).
      negative_prompt_embeds: instead of `negative_prompt`: `[1 or P, L, D]`, as prompt_embeds.
        Without it (and with guidance) `negative_prompt` (default "") is encoded.
      return_dict: True returns a `MagicVideoPipelineOutput` (`.frames`: the output above). The
        default is False, unlike diffusers (True), so that existing calls keep getting the array.
      callback_on_step_end: called on the host after each denoising step of the base stage as
        `callback(step_index, total_steps)` (step_index 0 .. total_steps - 1). Simpler than
        diffusers' `(pipe, step, timestep, callback_kwargs)`: it cannot change the latents (the
        loop runs inside one jit). An exception it raises is re-raised after the loop. Any callback
        shares one compiled program (compiled once with, once without).
      known_latents: the first k latent frames given, `[B, k, h, w, c]` scaled as 'latent' output
        returns them, k < num_frames: each step sees them noised to its level and the rest is
        generated after them (latent inpainting; the video keeps them exactly).
      image: the first frame, given: one image `[H, W, 3]` (uint8, or float in [0, 1]; a PIL
        image) for every video or one per video `[B, H, W, 3]`, at the call's height and width;
        its VAE latents become known_latents. An image-to-video model (`sampling/image_to_video.py`,
        which needs image or known_latents) is also conditioned on the first known frame.
      long_video: num_frames beyond the model's length (`max_frames`), generated window by window:
        'causal' continues each window of max_frames from the last `long_video_overlap` latent
        frames of the one before (known_latents), which directed temporal attention lets the new
        frames follow (`sampling/long_video.py`). Not with the cascade's stages.
        'freenoise' denoises all frames at once, the U-Net on overlapping windows (FreeNoise:
        `temporal_window`, its initial noise rescheduled).
      long_video_overlap: frames each window shares with the previous one (default max_frames / 2).
      temporal_window: (length, stride), length at most max_frames: the U-Net runs on windows of
        `length` frames every `stride` frames and each frame's predictions are averaged, so
        num_frames may exceed max_frames; the initial noise (unless `latents` is given) is
        FreeNoise's rescheduling of the first window's (`sampling/long_video.py`).

    Returns:
      numpy `[B, F, H, W, 3]` (see `output_type`; a list for 'pil'), or with return_dict=True a
      `MagicVideoPipelineOutput`. B = the number of prompts x num_videos_per_prompt; after
      interpolation by m, F = (num_frames - 1) m + 1; after super-resolution by s, s H x s W.
    """
    if long_video is not None:
      return long_video_lib.generate(
          self, long_video, prompt=prompt, negative_prompt=negative_prompt, num_frames=num_frames,
          overlap=long_video_overlap, height=height, width=width,
          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta, fps=fps,
          seed=seed, sampler=sampler, output_type=output_type, sigma_spacing=sigma_spacing,
          use_video_vae=use_video_vae, num_videos_per_prompt=num_videos_per_prompt,
          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
          return_dict=return_dict, image=image,
          with_stages=bool((self.interpolator and interpolate) or (self.upscaler and upscale)))
    if prompt is not None and prompt_embeds is not None:
      raise ValueError('pass prompt or prompt_embeds, not both')
    if negative_prompt is not None and negative_prompt_embeds is not None:
      raise ValueError('pass negative_prompt or negative_prompt_embeds, not both')
    if prompt is None and prompt_embeds is None:
      raise ValueError('prompt must be a string or a non-empty list of strings (or pass '
                       'prompt_embeds)')
    if temporal_window is not None:
      temporal_window = long_video_lib.check_window(temporal_window, self.max_frames)
    req = validate_request(self.config, windowed=temporal_window is not None,
                           num_frames=num_frames, height=height, width=width,
                           num_inference_steps=num_inference_steps, sampler=sampler, eta=eta,
                           guidance_scale=guidance_scale, output_type=output_type,
                           sigma_spacing=sigma_spacing, fps=fps, seed=seed,
                           num_videos_per_prompt=num_videos_per_prompt)
    n = req.num_videos_per_prompt
    if prompt_embeds is not None:
      prompt_embeds = request_lib.embeddings(prompt_embeds, self.context_shape(),
                                             dtype=self._context().dtype)
      num_prompts = prompt_embeds.shape[0]
      prompts = None
    else:
      prompts = request_lib.prompt_list(prompt)
      num_prompts = len(prompts)
    if negative_prompt_embeds is not None:
      negative_prompt_embeds = request_lib.embeddings(
          negative_prompt_embeds, self.context_shape(), 'negative_prompt_embeds', num_prompts,
          self._context().dtype)
      negative_prompt_embeds = np.broadcast_to(
          negative_prompt_embeds, (num_prompts,) + negative_prompt_embeds.shape[1:])
      negatives = None
    else:
      negatives = request_lib.per_clip(negative_prompt, num_prompts)
    b = num_prompts * n
    interpolator = self.interpolator if interpolate else None
    upscaler = self.upscaler if upscale else None
    if interpolator is not None or upscaler is not None:
      if temporal_window is not None:
        raise ValueError('temporal_window: not with the cascade\'s stages (pass interpolate=False, '
                         'upscale=False)')
      if prompts is None or negatives is None:
        raise ValueError('prompt_embeds / negative_prompt_embeds: the cascade\'s stages encode the '
                         'prompts with their own text encoders; pass prompt and negative_prompt '
                         '(or interpolate=False, upscale=False)')
      cascade.check_configs(self.config, interpolator and interpolator.config,
                            upscaler and upscaler.config, num_frames=req.num_frames,
                            height=req.height, width=req.width, noise_level=noise_level,
                            upscale_strength=upscale_strength)
    if callback_on_step_end is not None and not callable(callback_on_step_end):
      raise ValueError(f'callback_on_step_end={callback_on_step_end!r} must be callable')
    latent_shape = (b, req.num_frames, req.height // self.vae_factor, req.width // self.vae_factor,
                    self.latent_channels)
    noise_key, loop_key = jax.random.split(jax.random.key(req.seed))
    if temporal_window is not None and req.num_frames <= temporal_window[0]:
      temporal_window = None  # One window: the ordinary loop.
    if latents is None:
      latents = diffusion.initial_noise(noise_key, latent_shape, float(
          self.config.diffusion.get('frame_noise_correlation', 0.0)))
      if temporal_window is not None:
        latents = long_video_lib.reschedule_noise(jax.random.fold_in(noise_key, 2), latents,
                                                  *temporal_window)
    else:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.shape != latent_shape:
        raise ValueError(f'latents have shape {latents.shape}; expected {latent_shape} '
                         f'[B = {num_prompts} prompts x num_videos_per_prompt {n}, num_frames, '
                         f'height/{self.vae_factor}, width/{self.vae_factor}, latent channels]')
    fps_value = req.fps
    known = known_noise = condition = None
    if image is not None and known_latents is not None:
      raise ValueError('pass image or known_latents, not both')
    if self.image_conditioned:
      if image is None and known_latents is None:
        raise ValueError('this is an image-to-video model: pass image= (the first frame; '
                         '`sample --image first.png`)')
      if temporal_window is not None:
        raise ValueError('temporal_window / long_video=\'freenoise\': not with an image-to-video '
                         'model (use long_video=\'causal\')')
    if image is not None:
      known_latents = self.encode(request_lib.first_frames(image, b, req.height, req.width))
    if known_latents is not None:
      known = jnp.asarray(known_latents, jnp.float32)
      if (known.ndim != 5 or known.shape[0] != b or known.shape[2:] != latent_shape[2:]
          or not 0 < known.shape[1] < req.num_frames):
        raise ValueError(f'known_latents have shape {known.shape}; expected [{b}, k, '
                         f'{", ".join(map(str, latent_shape[2:]))}] with 0 < k < num_frames='
                         f'{req.num_frames}')
      known_noise = jax.random.normal(jax.random.fold_in(noise_key, 1), known.shape, jnp.float32)
      if self.image_conditioned:
        condition = image_to_video.make_condition(known[:, 0], req.num_frames,
                                                  self.config.image_to_video.condition)

    # Shard the video batch over the mesh: pad it to a multiple of the device count.
    pad = (-b) % self.mesh.size
    if prompts is not None:
      prompts = request_lib.per_video(prompts, n)
      context = self._encode_prompts(prompts)
    else:
      context = self._shard(self._pad(np.repeat(prompt_embeds, n, axis=0), pad))
    if negatives is not None:
      negatives = request_lib.per_video(negatives, n)
    if not req.do_cfg:
      uncond_context = context  # Unused.
    elif negatives is not None:
      uncond_context = self._encode_prompts(negatives)
    else:
      uncond_context = self._shard(self._pad(np.repeat(negative_prompt_embeds, n, axis=0), pad))
    latents = self._shard(self._pad(latents, pad))
    fps_array = self._shard(jnp.full((b + pad,), fps_value, jnp.float32))
    static = dict(req.static_options(),
                  use_fps=bool(self.config.model.unet.get('fps_embedding', False)),
                  show_progress=self.verbose, use_callback=callback_on_step_end is not None,
                  clip_sample=1.0 if req.clip_sample else None, temporal_window=temporal_window)
    dynamic = (self.params, context, uncond_context, latents, loop_key, fps_array,
               jnp.float32(req.guidance_scale))
    if known is not None:  # An image-to-video model's condition comes with its known frames.
      dynamic += tuple(None if x is None else self._shard(self._pad(x, pad))
                       for x in (known, known_noise, condition))
    denoise = self._compile(('denoise', tuple(latents.shape), tuple(sorted(static.items())),
                             None if known is None else known.shape[1], condition is not None),
                            lambda: self._denoise.lower(*dynamic, **static))
    self._steps_done, self._steps_total = 0, req.num_inference_steps
    self._step_callback, self._step_callback_error = callback_on_step_end, None
    self._t_start = time.time()
    try:
      z0 = jax.block_until_ready(denoise(*dynamic))
    finally:
      self._step_callback, error, self._step_callback_error = None, self._step_callback_error, None
    if error is not None:
      raise error
    self.log(f'denoised {b} x {req.num_frames} frames, {req.num_inference_steps} {req.sampler} '
             f'steps in {time.time() - self._t_start:.1f} s')
    if interpolator is not None or upscaler is not None:
      stages = cascade.run_stages(
          self, sharding_lib.to_host(z0)[:b], prompts, negatives, seed=req.seed, fps=fps_value,
          interpolate=interpolate, upscale=upscale, interpolation_steps=interpolation_steps,
          interpolation_guidance_scale=interpolation_guidance_scale, upscale_steps=upscale_steps,
          upscale_guidance_scale=upscale_guidance_scale, noise_level=noise_level,
          upscale_strength=upscale_strength, use_video_vae=use_video_vae)
      if output_type == 'latent':
        out = stages.get('upscaled_latents', stages['latents'])
      else:
        out = request_lib.to_output(stages.get('upscaled', stages['frames']), output_type)
    elif output_type == 'latent':
      out = sharding_lib.to_host(z0)[:b]
    elif temporal_window is not None:  # Decoded a model's clip at a time.
      out = request_lib.to_output(long_video_lib.decode(
          self, sharding_lib.to_host(z0)[:b], self.max_frames, use_video_vae), output_type)
    else:
      out = request_lib.to_output(self.decode(z0, use_video_vae)[:b], output_type)
    return self.output(out) if return_dict else out

  @staticmethod
  def output(frames: Any) -> MagicVideoPipelineOutput:
    return MagicVideoPipelineOutput(frames=frames)

  def encode_prompt(self, prompt: Union[str, Sequence[str]]) -> np.ndarray:
    """Prompts -> what the denoiser conditions on, numpy `[B, L, D]` (`context_shape`; the text
    encoder's dtype, float32 unless the model runs in another):
    `pipe(prompt_embeds=pipe.encode_prompt(p))` samples the same videos as `pipe(p)`, bit for bit.
    For a model conditioned on CLIP embeddings, the embedding's context tokens (context.py)."""
    prompts = request_lib.prompt_list(prompt)
    return sharding_lib.to_host(self._encode_prompts(prompts))[:len(prompts)]

  def context_shape(self) -> Tuple[int, int]:
    """[L, D] of an encoded prompt (`encode_prompt`, `prompt_embeds`)."""
    return tuple(self._context().shape[1:])

  def _context(self) -> jax.ShapeDtypeStruct:
    """Shape and dtype of the encoding of one prompt (traced once, abstractly)."""
    if self._context_spec is None:
      ids = jax.ShapeDtypeStruct(np.shape(self.tokenizer([''])), jnp.int32)
      self._context_spec = jax.eval_shape(self._encode_text, self.params, ids)
    return self._context_spec

  def _prompt_ids(self, prompts: Sequence[str]) -> jax.Array:
    """Prompts -> token ids `[B + pad, L]`, the batch padded to the mesh and sharded."""
    return self._shard(self._pad(self.tokenizer(list(prompts)), (-len(prompts)) % self.mesh.size))

  def _encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
    """Prompts -> their encodings `[B + pad, L, D]`, the batch padded to the mesh and sharded."""
    return self._encode_ids(self._prompt_ids(prompts))

  def _encode_ids(self, ids: jax.Array) -> jax.Array:
    encode = self._compile(('encode', tuple(ids.shape)),
                           lambda: self._encode.lower(self.params, ids))
    return encode(self.params, ids)

  def encode(self, frames: Any) -> np.ndarray:
    """Frames `[B, F, H, W, 3]` in [0, 1] -> scaled posterior means `[B, F, h, w, c]` (what 'latent'
    output and known_latents hold)."""
    frames = jnp.asarray(frames, jnp.float32) * 2.0 - 1.0
    return np.asarray(self._encode_frames(self.params, frames))

  def decode(self, latents: Any, use_video_vae: bool = True) -> np.ndarray:
    """Scaled latents `[B, F, h, w, c]` -> frames `[B, F, H, W, 3]` float in [0, 1] (batch sharded
    over the mesh; compiled once per shape)."""
    latents = jnp.asarray(latents, jnp.float32)
    b = latents.shape[0]
    z = jax.device_put(self._pad(latents, (-b) % self.mesh.size),
                       sharding_lib.batch_sharding(self.mesh, latents.ndim))
    use_video_vae = bool(use_video_vae and self.video_vae)
    decode = self._compile(('decode', tuple(z.shape), use_video_vae),
                           lambda: self._decode.lower(self.params, z, use_video_vae))
    t0 = time.time()
    frames = sharding_lib.to_host(jax.block_until_ready(decode(self.params, z)))[:b]
    self.log(f'decoded {b * latents.shape[1]} frames in {time.time() - t0:.1f} s')
    return frames

  # ------------------------------------------------------------------------------------------------
  # Helpers.

  def _shard(self, x) -> jax.Array:
    """A batch (padded to the mesh) sharded over the mesh's batch axes."""
    x = jnp.asarray(x)
    return jax.device_put(x, sharding_lib.batch_sharding(self.mesh, x.ndim))

  @staticmethod
  def _pad(x, pad: int):
    if not pad:
      return x
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)

  def _compile(self, cache_key, lower):
    if cache_key not in self.compiled:
      self.log(f'compiling {cache_key[0]} for {cache_key[1]} ...')
      t0 = time.time()
      self.compiled[cache_key] = lower().compile()
      self.log(f'compiled {cache_key[0]} in {time.time() - t0:.1f} s')
    return self.compiled[cache_key]

  def _on_step(self, t):
    del t
    self._steps_done += 1
    elapsed = time.time() - self._t_start
    message = f'  denoising step {self._steps_done}/{self._steps_total} ({elapsed:.1f} s)'
    if not sys.stderr.isatty():  # Logs and pipes: one line per step.
      print(message, file=sys.stderr, flush=True)
      return
    print('\r' + message, end='', file=sys.stderr, flush=True)
    if self._steps_done == self._steps_total:
      print('', file=sys.stderr, flush=True)

  def _on_step_end(self, index, value):
    """The host end of `callback_on_step_end`: one static function (so any callback shares the
    compiled program) calling the current call's callback; its first exception is kept for
    `__call__` to raise, and stops later calls."""
    del value  # Only orders the callback after the step.
    callback = self._step_callback
    if callback is None or self._step_callback_error is not None:
      return
    try:
      callback(int(index), self._steps_total)
    except BaseException as e:  # pylint: disable=broad-except
      self._step_callback_error = e

  def log(self, message: str) -> None:
    """Progress: logged, and printed to stderr when the pipeline is verbose."""
    logging.info(message)
    if self.verbose:
      print(message, file=sys.stderr, flush=True)


def _without_video_vae(model_config):
  """A copy of a `model` config section with the VideoVAE switched off."""
  plain = ml_collections.ConfigDict(model_config.to_dict())
  if 'video_vae' in plain:
    plain.video_vae.enabled = False
  return plain


# --------------------------------------------------------------------------------------------------
# CMD: content frame, then motion latent.


class CMDPipeline(MagicVideoPipeline):
  """Text-to-video with a CMD checkpoint (`models.is_cmd`; models/cmd.py), as CMD's App. E samples:

  1. the content frame z_c `[B, h, w, c]` from noise by the image U-Net (DDIM / DPM-Solver++, text
     guidance `guidance_scale`, negative prompts), the MagicVideo pipeline's own denoising loop run
     on one frame;
  2. the motion latent z_m from noise by the motion DiT conditioned on the finished z_c in both
     guidance branches, guided on the prompt's pooled text features only
     (`motion_guidance_scale`, default config.sampling.motion_guidance_scale, else guidance_scale);
  3. CMD's decoder (z_c, z_m) -> clip latents `[B, L, h, w, c]`, then the VAE decoder.

  Guidance is uncond + w (cond - uncond) in both loops; CMD's paper writes (1 + w') e_c - w' e_u,
  the same with w = w' + 1. The clip size is the autoencoder's (config.data: num_frames frames of
  resolution x resolution). `MagicVideoPipeline.from_pretrained` returns this class for a CMD
  checkpoint. Each loop and each decoder is one jit, compiled once per shape and static option.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Dict[str, Any], tokenizer: Any,
               **kwargs):
    if not models_lib.is_cmd(config.model):
      raise ValueError("CMDPipeline needs a CMD checkpoint (config.model.kind == 'cmd'); use "
                       'MagicVideoPipeline')
    if kwargs.get('interpolator') is not None or kwargs.get('upscaler') is not None:
      raise ValueError('CMDPipeline has no cascade stages (interpolation, upscaler)')
    super().__init__(config, params, tokenizer, **kwargs)
    self.num_frames = int(config.data.num_frames)
    self.resolution = int(config.data.resolution)
    self.motion_scale = float(config.model.cmd.motion_scale)
    self._pool = jax.jit(functools.partial(context_lib.pooled_text, config.model))
    self._denoise_motion = jax.jit(self._denoise_motion_impl, static_argnames=(
        'num_inference_steps', 'sampler', 'eta', 'do_cfg', 'show_progress', 'sigma_spacing',
        'final_sigmas_type', 'clip_sample'))
    self._decode_clip = jax.jit(self._decode_clip_impl)
    self._encode_clip = jax.jit(self._encode_clip_impl)

  def _denoise_motion_impl(self, params, content, text, uncond_text, noise, key, guidance_scale, *,
                           num_inference_steps: int, sampler: str, eta: float, do_cfg: bool,
                           show_progress: bool, sigma_spacing: Optional[str],
                           final_sigmas_type: str, clip_sample: Optional[float]):
    """Unit noise `[B, L, W' + H', D]` -> z_m given z_c `[B, h, w, c]` and pooled text `[B, T]`."""
    self.trace_count += 1
    dit = self.modules['motion_dit']
    if do_cfg:  # The content frame conditions both branches; only the text differs.
      text = jnp.concatenate([uncond_text, text], axis=0)
      content = jnp.concatenate([content, content], axis=0)

    def apply(x_in, timesteps):
      if show_progress:
        jax.debug.callback(self._on_step, timesteps[0])
      return dit.apply({'params': params['motion_dit']}, x_in.astype(dit.dtype), timesteps,
                       content.astype(dit.dtype), text.astype(dit.dtype))

    model_fn = diffusion.guided_model_fn(apply, guidance_scale if do_cfg else None)
    options = diffusion.sampler_options(sampler, eta=eta, key=key,
                                        clip_sample=clip_sample is not None,
                                        sigma_spacing=sigma_spacing,
                                        final_sigmas_type=final_sigmas_type)
    motion = diffusion.sample_loop(model_fn, noise, self.schedule, num_inference_steps,
                                   sampler=sampler, **options)
    return motion / self.motion_scale

  def _decode_clip_impl(self, params, content, motion):
    autoencoder = self.modules['cmd_autoencoder']
    latents = autoencoder.apply({'params': params['cmd_autoencoder']}, content, motion,
                                method='decode')
    return latents.astype(jnp.float32)

  def _encode_clip_impl(self, params, latents):
    autoencoder = self.modules['cmd_autoencoder']
    content, motion = autoencoder.apply({'params': params['cmd_autoencoder']}, latents,
                                        method='encode')
    return content.astype(jnp.float32), motion.astype(jnp.float32)

  def encode_clip(self, latents: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Clip latents `[B, L, h, w, c]` (scaled, as `encode` gives) -> (z_c `[B, h, w, c]`, z_m)."""
    content, motion = self._encode_clip(self.params, jnp.asarray(latents, jnp.float32))
    return np.asarray(content), np.asarray(motion)

  def decode_clip(self, content: Any, motion: Any) -> np.ndarray:
    """(z_c, z_m) -> clip latents `[B, L, h, w, c]` (scaled; `decode` makes frames of them)."""
    return np.asarray(self._decode_clip(self.params, jnp.asarray(content, jnp.float32),
                                        jnp.asarray(motion, jnp.float32)))

  def motion_guidance(self, motion_guidance_scale: Optional[float] = None,
                      guidance_scale: Optional[float] = None) -> float:
    """The motion DiT's guidance: the one given, else config.sampling.motion_guidance_scale, else
    the content frame's (`guidance_scale`, default config.sampling.guidance_scale)."""
    for value in (motion_guidance_scale, self.config.sampling.motion_guidance_scale,
                  guidance_scale):
      if value is not None:
        return float(value)
    return float(self.config.sampling.guidance_scale)

  def motion_shape(self) -> Tuple[int, int, int]:
    """[L, W' + H', D] of one motion latent."""
    autoencoder = self.modules['cmd_autoencoder']
    side = self.resolution // self.vae_factor // autoencoder.patch_size
    return (self.num_frames, 2 * side, autoencoder.motion_channels)

  def __call__(self, prompt: Union[None, str, Sequence[str]] = None,
               negative_prompt: Union[None, str, Sequence[str]] = None,
               num_frames: Optional[int] = None,
               height: Optional[int] = None, width: Optional[int] = None,
               num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
               eta: Optional[float] = None, fps: Optional[float] = None, seed: int = 0,
               sampler: Optional[str] = None, output_type: str = 'uint8',
               sigma_spacing: Optional[str] = None, use_video_vae: bool = True, *,
               num_videos_per_prompt: int = 1, return_dict: bool = False,
               motion_guidance_scale: Optional[float] = None, content_latents: Optional[Any] = None,
               **unsupported) -> Any:
    """Generates num_videos_per_prompt videos per prompt (class docstring).

    Arguments as `MagicVideoPipeline.__call__` where they share a name; num_frames, height and width
    can only be the autoencoder's clip size. `num_inference_steps`, `sampler` and `eta` apply to
    both loops (CMD uses the same step count for both). `content_latents` `[B, h, w, c]` (scaled
    z_c, e.g. `encode_clip` of real clips) skips the content loop: the motion DiT alone.
    'latent' output gives the decoded clip latents `[B, L, h, w, c]`.
    """
    given = sorted(k for k, v in unsupported.items() if v is not None)
    if given:
      raise ValueError(f'CMDPipeline does not take {", ".join(given)} (a MagicVideoPipeline '
                       'option)')
    if prompt is None:
      raise ValueError('prompt must be a string or a non-empty list of strings')
    req = validate_request(self.config, num_frames=num_frames, height=height, width=width,
                           num_inference_steps=num_inference_steps, sampler=sampler, eta=eta,
                           guidance_scale=guidance_scale, output_type=output_type,
                           sigma_spacing=sigma_spacing, fps=fps, seed=seed,
                           num_videos_per_prompt=num_videos_per_prompt)
    if (req.num_frames, req.height, req.width) != (self.num_frames,) + (self.resolution,) * 2:
      raise ValueError(f'num_frames={req.num_frames}, height={req.height}, width={req.width}: this '
                       f'CMD autoencoder makes clips of exactly {self.num_frames} frames of '
                       f'{self.resolution}x{self.resolution}')
    motion_w = self.motion_guidance(motion_guidance_scale, req.guidance_scale)
    prompts = request_lib.prompt_list(prompt)
    negatives = request_lib.per_clip(negative_prompt, len(prompts))
    n = req.num_videos_per_prompt
    prompts, negatives = request_lib.per_video(prompts, n), request_lib.per_video(negatives, n)
    b = len(prompts)
    pad = (-b) % self.mesh.size
    side = self.resolution // self.vae_factor
    noise_key, loop_key = jax.random.split(jax.random.key(req.seed))
    static = dict(req.static_options(), show_progress=self.verbose,
                  clip_sample=1.0 if req.clip_sample else None)
    self._t_start = time.time()

    # The text encoder runs once per prompt set: the motion DiT pools the content model's context.
    ids, negative_ids = self._prompt_ids(prompts), self._prompt_ids(negatives)
    context = self._encode_ids(ids)
    uncond_context = self._encode_ids(negative_ids) if req.do_cfg or motion_w > 1 else context
    if content_latents is None:
      noise = diffusion.initial_noise(noise_key, (b, 1, side, side, self.latent_channels), 0.0)
      dynamic = (self.params, context, uncond_context, self._shard(self._pad(noise, pad)), loop_key,
                 self._shard(jnp.full((b + pad,), req.fps, jnp.float32)),
                 jnp.float32(req.guidance_scale))
      content_static = dict(static, use_fps=False, use_callback=False)
      denoise = self._compile(('denoise', tuple(dynamic[3].shape),
                               tuple(sorted(content_static.items())), None),
                              lambda: self._denoise.lower(*dynamic, **content_static))
      self._steps_done, self._steps_total = 0, req.num_inference_steps
      content = jax.block_until_ready(denoise(*dynamic))[:, 0]
      self.log(f'content frames of {b} videos in {time.time() - self._t_start:.1f} s')
    else:
      content = jnp.asarray(content_latents, jnp.float32)
      if content.shape != (b, side, side, self.latent_channels):
        raise ValueError(f'content_latents have shape {content.shape}; expected '
                         f'{(b, side, side, self.latent_channels)}')
      content = self._shard(self._pad(content, pad))

    text = self._pool(context, ids)
    uncond_text = self._pool(uncond_context, negative_ids) if motion_w > 1 else text
    noise = jax.random.normal(jax.random.fold_in(noise_key, 2), (b,) + self.motion_shape())
    motion_static = dict(static, do_cfg=motion_w > 1)
    dynamic = (self.params, content, text, uncond_text, self._shard(self._pad(noise, pad)),
               jax.random.fold_in(loop_key, 2), jnp.float32(motion_w))
    denoise = self._compile(('denoise_motion', tuple(dynamic[4].shape),
                             tuple(sorted(motion_static.items()))),
                            lambda: self._denoise_motion.lower(*dynamic, **motion_static))
    t0 = time.time()
    self._steps_done, self._steps_total = 0, req.num_inference_steps
    motion = jax.block_until_ready(denoise(*dynamic))
    self.log(f'motion latents of {b} videos in {time.time() - t0:.1f} s')
    latents = self._decode_clip(self.params, content, motion)
    if output_type == 'latent':
      out = sharding_lib.to_host(latents)[:b]
    else:
      out = request_lib.to_output(self.decode(latents, use_video_vae)[:b], output_type)
    return self.output(out) if return_dict else out
