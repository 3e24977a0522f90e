"""Super-resolution stage: the SD x4 upscaler over video frames, or a video SR U-Net grown from it.

    upscaler = VideoUpscaler.from_pretrained('path/to/stable-diffusion-x4-upscaler')  # or a converted folder
    frames = upscaler(low_res, 'a red circle', num_inference_steps=20)  # [B, F, 4h, 4w, 3] in [0, 1]

The sampling follows diffusers' `StableDiffusionUpscalePipeline` (0.42):
1. Noise augmentation: the low-res frames `x` `[B, F, h, w, 3]` in [-1, 1] become
   `sqrt(abar_n) x + sqrt(1 - abar_n) eps` under the low-res (DDPM) schedule at `noise_level` n.
2. The sampler loop of `diffusion.sample_loop` on latents `[B, F, h, w, 4]` at the low-res size (the
   upscaler's VAE downsamples by 4, so latents are as large as the low-res frames): the U-Net sees the
   latents and the augmented frames concatenated on channels (4 + 3 = `in_channels` 7) and
   `class_labels = n`. Classifier-free guidance concatenates the negative and positive batches (frames
   and noise level duplicated), negative first, as diffusers.
3. VAE decode of `latents / scaling_factor`, one frame index at a time (`lax.map`) to bound memory.

Frames go to the U-Net as a clip `[B, F, ...]`: an image upscaler (video layers off) folds them into the
batch, i.e. upscales each frame independently; a video SR U-Net (frame adaptors, temporal attention;
LaVie's recipe) sees the whole clip. A converted diffusers upscaler has its video layers at identity, so
it starts as the image upscaler applied per frame.

The denoising loop (text encoding included) is one `jax.jit` and the decode another; both compile once
per shape and static option (sampler, steps, eta, guidance on/off); prompts' states, latents, noise, the
noise level and the guidance scale are traced (`trace_count` counts traces of the loop). Arrays live on
the default device; no mesh sharding yet.

Training (`config.train.objective = 'upscaler'`, `upscaler_loss`): the SR U-Net learns to denoise the
latents of high-resolution clips given their area-downsampled, noise-augmented frames; the
`config.upscaler` section (`default_config()`) holds the augmentation schedule.
"""

import os
from typing import Any, Dict, Optional, Sequence, Union

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from magicvideo_jax import config as config_lib
from magicvideo_jax import diffusion
from magicvideo_jax import models as models_lib
from magicvideo_jax.sampling import request as request_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import convert

LATENT_CHANNELS = 4  # The U-Net input is latents (4) + low-res RGB (3).


def noise_augment(schedule: diffusion.Schedule, low_res: jax.Array, noise: jax.Array,
                  noise_level: jax.Array) -> jax.Array:
  """The low-res conditioning after the forward process at `noise_level` (int scalar), float32."""
  return diffusion.add_noise(schedule, low_res, noise, jnp.asarray(noise_level, jnp.int32))


def is_upscaler_config(config: ml_collections.ConfigDict) -> bool:
  return config.get('upscaler', None) is not None


def default_config() -> ml_collections.ConfigDict:
  """A `config.upscaler` section as the SD x4 upscaler's: its low-res DDPM schedule (linear betas
  1e-4 -> 0.02), noise levels up to 350, 20 by default at sampling, and sampling from pure noise
  (`strength` 1; below 1 the sampler starts from the upsampled input instead, see `__call__`)."""
  return config_lib.upscaler_defaults()


def downsample(video: Any, factor: int) -> Any:
  """Area average `[B, F, H, W, C]` -> `[B, F, H / factor, W / factor, C]` (a numpy array stays
  numpy: einops reduces it with numpy)."""
  return einops.reduce(video, 'b f (h p) (w q) c -> b f h w c', 'mean', p=factor, q=factor)


def upsample(video: jax.Array, factor: int) -> jax.Array:
  """Bilinear (half-pixel centres) `[B, F, H, W, C]` -> `[B, F, factor H, factor W, C]`: the
  image-to-image start of the SR sampler."""
  b, f, h, w, c = video.shape
  return jax.image.resize(video, (b, f, factor * h, factor * w, c), 'linear')


class VideoUpscaler:
  """Text-guided x4 super-resolution of video frames with a converted SD x4 upscaler checkpoint.

  Attributes:
    config: the checkpoint's config; `config.upscaler` holds the low-res noise schedule
      (`noise_schedule`), `noise_level` (default) and `max_noise_level`.
    params: {'text_encoder', 'vae', 'unet'}.
    schedule, low_res_schedule: the sampler's and the noise augmentation's `diffusion.Schedule`.
    trace_count: traces of the denoising function (new prompts, noise or levels must not add any).
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Dict[str, Any], tokenizer: Any = None,
               *, modules: Optional[Dict[str, Any]] = None):
    if not is_upscaler_config(config):
      raise ValueError('this checkpoint has no `upscaler` config section: convert a diffusers '
                       'StableDiffusionUpscalePipeline folder (with low_res_scheduler/) first.')
    unet = config.model.unet
    if int(unet.in_channels) != LATENT_CHANNELS + 3 or not unet.get('num_class_embeds'):
      raise ValueError(f'an upscaler U-Net needs in_channels={LATENT_CHANNELS + 3} (latents + low-res '
                       'RGB) and num_class_embeds (the noise level); config.model.unet has '
                       f'in_channels={unet.in_channels}, num_class_embeds={unet.get("num_class_embeds")}')
    if models_lib.uses_video_vae(config.model):
      raise ValueError('the upscaler decodes frame by frame: set config.model.video_vae.enabled=False')
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.modules = modules or models_lib.build_models(config.model)
    self.schedule = diffusion.Schedule.from_config(config.diffusion)
    self.low_res_schedule = diffusion.Schedule.from_config(config.upscaler.noise_schedule)
    self.scaling_factor = float(config.model.vae.scaling_factor)
    self.vae_factor = 2 ** (len(config.model.vae.block_out_channels) - 1)
    self.unet_factor = 2 ** (len(unet.block_out_channels) - 1)
    self.use_fps = bool(unet.get('fps_embedding', False))
    self.trace_count = 0
    self._denoise = jax.jit(self._denoise_impl, static_argnames=(
        'num_inference_steps', 'sampler', 'eta', 'do_cfg', 'clip_sample', 'sigma_spacing',
        'final_sigmas_type', 'start_step'))
    self._decode = jax.jit(self._decode_impl)
    self._encode = jax.jit(self._encode_impl)

  @classmethod
  def from_pretrained(cls, path: str, *, num_frames: int = 16, **overrides) -> 'VideoUpscaler':
    """From a converted checkpoint folder or a diffusers `StableDiffusionUpscalePipeline` folder
    (converted on the fly; video layers at identity for up to `num_frames` frames). `overrides`
    replace keys of `config.model` (e.g. dtype='bfloat16')."""
    if ckpt_lib.is_pretrained_folder(path):
      config, params, tokenizer = ckpt_lib.load_pretrained(path)
    elif os.path.isfile(os.path.join(path, 'unet', 'config.json')):
      config, params, tokenizer = convert.convert_diffusers_folder(path, num_frames=num_frames)
    else:
      raise FileNotFoundError(f'{path} is neither a magicvideo_jax checkpoint folder (config.json + '
                              'params/) nor a diffusers upscale pipeline folder (unet/config.json ...)')
    for key, value in overrides.items():
      config.model[key] = value
    return cls(config, params, tokenizer)

  # ------------------------------------------------------------------------------------------------
  # The jitted pieces.

  def _encode_impl(self, params, input_ids):
    return self.modules['text_encoder'].apply({'params': params['text_encoder']}, input_ids)

  def _denoise_impl(self, params, latents, low_res, noise, context, negative_context, noise_level,
                    guidance_scale, fps, key, *, num_inference_steps: int, sampler: str, eta: float,
                    do_cfg: bool, clip_sample: bool, sigma_spacing: Optional[str],
                    final_sigmas_type: str, start_step: int):
    """Unit-noise latents `[B, F, h, w, 4]` -> denoised latents (scaled, as the U-Net sees them).

    From `start_step` > 0 the noise is added to the latents of the low-res frames upsampled
    (bilinear) to the output size, and the sampler runs its steps from there (image-to-image)."""
    self.trace_count += 1  # Python side effect: once per trace.
    unet = self.modules['unet']
    if start_step:
      by_frame = einops.rearrange(upsample(low_res, self.vae_factor),
                                  'b f h w c -> f b 1 h w c')  # Bounds memory.
      start = jax.lax.map(lambda x: models_lib.encode_frames(
          self.modules['vae'], params['vae'], x, self.scaling_factor), by_frame)
      start = einops.rearrange(start, 'f b 1 h w c -> b f h w c')
      latents = diffusion.noise_to_step(
          self.schedule, start, latents, num_inference_steps, start_step, sampler=sampler,
          sigma_spacing=sigma_spacing, final_sigmas_type=final_sigmas_type)
    condition = noise_augment(self.low_res_schedule, low_res, noise, noise_level)
    if do_cfg:  # Negative first, as diffusers.
      context = jnp.concatenate([negative_context, context], axis=0)
      condition = jnp.concatenate([condition, condition], axis=0)
      fps = jnp.concatenate([fps, fps], axis=0)
    labels = jnp.broadcast_to(jnp.asarray(noise_level, jnp.int32), (condition.shape[0],))

    def apply(x_in, timesteps):
      return unet.apply({'params': params['unet']}, x_in.astype(unet.dtype), timesteps, context,
                        fps=fps if self.use_fps else None, class_labels=labels)

    model_fn = diffusion.guided_model_fn(apply, guidance_scale if do_cfg else None,
                                         condition=condition)
    options = diffusion.sampler_options(sampler, eta=eta, key=key, clip_sample=clip_sample,
                                        sigma_spacing=sigma_spacing,
                                        final_sigmas_type=final_sigmas_type)
    return diffusion.sample_loop(model_fn, latents, self.schedule, num_inference_steps,
                                 sampler=sampler, start_step=start_step, **options)

  def _decode_impl(self, params, latents):
    """Scaled latents `[B, F, h, w, 4]` -> frames `[B, F, 4h, 4w, 3]` (about [-1, 1])."""
    vae = self.modules['vae']
    by_frame = einops.rearrange(latents / self.scaling_factor, 'b f h w c -> f b h w c')
    frames = jax.lax.map(lambda z: vae.apply({'params': params['vae']}, z, method='decode'),
                         by_frame)
    return einops.rearrange(frames, 'f b h w c -> b f h w c').astype(jnp.float32)

  # ------------------------------------------------------------------------------------------------
  # The call.

  def decode(self, latents: Any) -> np.ndarray:
    """Latents `[B, F, h, w, 4]` (as `output_type='latent'` returns them) -> frames in [0, 1]."""
    images = np.asarray(self._decode(self.params, jnp.asarray(latents, jnp.float32)))
    return np.clip(images / 2 + 0.5, 0.0, 1.0)

  def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
    """Text states `[B, L, D]` of the upscaler's own text encoder (not the base model's)."""
    if self.tokenizer is None:
      raise ValueError('this upscaler has no tokenizer: pass `context` (text states) instead')
    return self._encode(self.params, jnp.asarray(self.tokenizer(list(prompts))))

  def __call__(self, low_res: Any, prompt: Union[None, str, Sequence[str]] = None,
               negative_prompt: Union[None, str, Sequence[str]] = None, *,
               context: Optional[Any] = None, negative_context: Optional[Any] = None,
               noise_level: Optional[int] = None, guidance_scale: Optional[float] = None,
               num_inference_steps: Optional[int] = None, eta: Optional[float] = None, seed: int = 0,
               latents: Optional[Any] = None, noise: Optional[Any] = None,
               fps: Optional[float] = None, sampler: Optional[str] = None,
               sigma_spacing: Optional[str] = None, strength: Optional[float] = None,
               output_type: str = 'float') -> np.ndarray:
    """Upscales each clip of `low_res` by the VAE factor (4 for the SD x4 upscaler).

    Args:
      low_res: frames `[B, F, h, w, 3]` in [-1, 1]; h and w multiples of the U-Net's downsampling.
      prompt: one prompt for all clips or one per clip; or give `context` (text states `[B, L, D]`
        of this upscaler's text encoder) instead.
      negative_prompt / negative_context: the unconditional batch for guidance; default the empty
        prompt (as diffusers).
      noise_level: noise augmentation level of the low-res frames, in [0, config.upscaler.
        max_noise_level]; default config.upscaler.noise_level (20).
      guidance_scale: classifier-free guidance weight (<= 1: no guidance); default config.sampling.
      num_inference_steps, sampler, sigma_spacing: default config.sampling.
      eta: DDIM stochasticity.
      seed: seeds the latents, the augmentation noise and DDIM's noise (eta > 0) unless given.
      latents: initial unit noise `[B, F, h, w, 4]` (with strength < 1: the noise added to the
        upsampled input's latents).
      noise: the augmentation noise `[B, F, h, w, 3]` (diffusers draws it with `randn` before the
        latents).
      fps: frame-rate conditioning of a video SR U-Net with an fps embedding; default config.data.fps.
      strength: in (0, 1]; default config.upscaler.strength (1: from pure noise, as diffusers). Below
        1, image-to-image (SDEdit): the latents of the low-res frames upsampled (bilinear) are noised
        to the level of step n - int(n strength) and only the last steps run, so the output keeps
        the input's layout frame by frame (a video's consistency) and the sampler only adds detail.
      output_type: 'float' or 'np' (`[B, F, 4h, 4w, 3]` in [0, 1]), 'uint8', 'pil' (per video a
        list of PIL images), or 'latent' (`[B, F, h, w, 4]`).

    Returns:
      numpy frames (see `output_type`).
    """
    req = request_lib.resolve(self.config, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, sampler=sampler, eta=eta,
                              sigma_spacing=sigma_spacing, fps=fps, seed=seed,
                              output_type=output_type)
    upscaler = self.config.upscaler
    noise_level = int(upscaler.noise_level if noise_level is None else noise_level)
    strength = float(upscaler.get('strength', 1.0) if strength is None else strength)
    start_step = diffusion.strength_start_step(req.num_inference_steps, strength)
    low_res = jnp.asarray(low_res, jnp.float32)
    self._validate(low_res, noise_level, output_type)
    batch, frames, height, width, _ = low_res.shape
    context = self._context(prompt, context, batch, 'prompt')
    if req.do_cfg:
      if negative_context is None and negative_prompt is None:
        negative_prompt = ''
      negative_context = self._context(negative_prompt, negative_context, batch, 'negative_prompt')
    else:
      negative_context = context  # Unused.

    latent_key, noise_key, loop_key = jax.random.split(jax.random.key(req.seed), 3)
    latent_shape = (batch, frames, height, width, LATENT_CHANNELS)
    correlation = float(self.config.diffusion.get('frame_noise_correlation', 0.0))
    latents = self._array_or_draw(latents, latent_key, latent_shape, 'latents', correlation)
    noise = self._array_or_draw(noise, noise_key, low_res.shape, 'noise')
    static = dict(req.static_options(), clip_sample=req.clip_sample, start_step=start_step)
    z0 = self._denoise(self.params, latents, low_res, noise, context, negative_context,
                       jnp.int32(noise_level), jnp.float32(req.guidance_scale),
                       jnp.full((batch,), req.fps, jnp.float32), loop_key, **static)
    if output_type == 'latent':
      return np.asarray(z0)
    return request_lib.to_output(self.decode(z0), output_type)

  # ------------------------------------------------------------------------------------------------
  # Helpers.

  def _validate(self, low_res: jax.Array, noise_level: int, output_type: str) -> None:
    if low_res.ndim != 5 or low_res.shape[-1] != 3:
      raise ValueError(f'low_res must be frames [B, F, h, w, 3] in [-1, 1], got shape {low_res.shape}')
    height, width = low_res.shape[2:4]
    if height % self.unet_factor or width % self.unet_factor:
      raise ValueError(f'low-res height and width must be multiples of {self.unet_factor} (the '
                       f'U-Net downsampling factor), got {height}x{width}')
    limit = int(self.config.upscaler.max_noise_level)
    if not 0 <= noise_level <= limit:
      raise ValueError(f'noise_level={noise_level} must be in [0, {limit}] '
                       '(config.upscaler.max_noise_level)')
    unet = self.config.model.unet
    if unet.get('frame_adaptor', False) and low_res.shape[1] > int(unet.num_frames):
      raise ValueError(f'{low_res.shape[1]} frames; this video SR U-Net supports at most '
                       f'{unet.num_frames} (config.model.unet.num_frames)')

  def _context(self, prompt, context, batch: int, what: str) -> jax.Array:
    """Text states `[batch, L, D]` from prompts or as given."""
    if (prompt is None) == (context is None):
      raise ValueError(f'give exactly one of `{what}` and its text states')
    if context is None:
      prompts = [prompt] if isinstance(prompt, str) else list(prompt)
      if len(prompts) == 1:
        prompts = prompts * batch
      if len(prompts) != batch:
        raise ValueError(f'{len(prompts)} values of `{what}` for {batch} clips')
      return self.encode_prompts(prompts)
    context = jnp.asarray(context, jnp.float32)
    expected = int(self.config.model.unet.cross_attention_dim)
    if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != expected:
      raise ValueError(f'text states for `{what}` must be [{batch}, L, {expected}], got '
                       f'{context.shape}')
    return context

  @staticmethod
  def _array_or_draw(value, key: jax.Array, shape, name: str,
                     frame_correlation: float = 0.0) -> jax.Array:
    if value is None:
      return diffusion.initial_noise(key, shape, frame_correlation)
    value = jnp.asarray(value, jnp.float32)
    if value.shape != tuple(shape):
      raise ValueError(f'{name} have shape {value.shape}; expected {tuple(shape)}')
    return value
