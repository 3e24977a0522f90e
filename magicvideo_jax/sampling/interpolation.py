"""Keyframe interpolation: the cascade's second stage (LaVie's design, DESIGN.md section 8).

K keyframes `[B, K, h, w, c]` (latents of the base model) become F = (K - 1) m + 1 frames for a factor
m: output frame j = k m is keyframe k, the m - 1 frames between two keyframes are new. The model is the
same video U-Net (`models/unet.py`) with `in_channels = 2 c + 1`: at every frame it sees

    [noisy latents (c) | condition latents (c) | mask (1)]

where the mask is 1 at the keyframe positions and 0 elsewhere, and the condition latents are
(`config.interpolation.condition`):
  'nearest'  (default) every frame carries the latents of its nearest keyframe (the earlier one on a
             tie): LaVie's "keyframes duplicated to the target frame rate". Each in-between frame then
             has a spatially aligned copy of a neighbouring keyframe in its own input channels, where the
             per-frame convolutions (most of the network) can use it; with zeros (below) the content of
             an in-between frame can only arrive through temporal attention. The mask says which
             copies are exact.
  'zeros'    keyframe latents at their positions, zeros elsewhere.
It is text-conditioned and regenerates all F frames (keyframes included; the error at keyframe
positions is what `magicvideo_jax.eval.cascade` reports). The temporal attention should be
bidirectional (`temporal_mask='none'`): with MagicVideo's causal mask an in-between frame cannot see
the keyframe after it.

Weight reuse (`config.train.init_from` = a base model folder; `weights.surgery.grow_weight`, called by
`surgery.load_init_checkpoint` on a shape mismatch): `unet/conv_in/kernel` grows along its input channels
(the base weights on the first c inputs, zeros on the new c + 1), so at init the interpolation U-Net
computes exactly what the base U-Net computes on the noisy latents; frame-adaptor tables `[F0, C]` are
resampled along frames to `[F, C]` (exact at the keyframes when F = (F0 - 1) m + 1).

Training (`config.train.objective = 'interpolation'`, `interpolation_loss`): from a clip of F frames,
keyframes = every m-th frame's latents (frozen VAE), condition built from them, diffusion loss on all
frames (keyframe frames weighted by `config.interpolation.keyframe_loss_weight`). Sampling
(`sample`): the diffusion loop with the condition concatenated at every step; classifier-free guidance
over the text only (both halves see the same condition). `KeyframeInterpolator` wraps a trained folder.
"""

import logging
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

CONDITION_MODES = ('nearest', 'zeros')


def default_config() -> ml_collections.ConfigDict:
  """The `config.interpolation` section: factor m, condition layout, loss weight of the keyframes."""
  return config_lib.interpolation_defaults()


# --------------------------------------------------------------------------------------------------
# Frame bookkeeping and the condition.


def num_target_frames(num_keyframes: int, factor: int) -> int:
  """(K - 1) m + 1: frames after interpolating K keyframes by m."""
  return (int(num_keyframes) - 1) * int(factor) + 1


def num_keyframes_in(num_frames: int, factor: int) -> int:
  """K such that (K - 1) m + 1 = num_frames; ValueError when there is none."""
  if factor < 1 or num_frames < 1 or (num_frames - 1) % factor:
    raise ValueError(f'{num_frames} frames do not hold keyframes every {factor} frames: need '
                     f'(K - 1) * {factor} + 1 frames (e.g. {num_target_frames(16, factor)} for 16)')
  return (num_frames - 1) // factor + 1


def keyframe_mask(num_frames: int, factor: int) -> np.ndarray:
  """bool `[F]`: True at the keyframe positions 0, m, 2m, ..."""
  num_keyframes_in(num_frames, factor)
  return np.arange(num_frames) % factor == 0


def keyframe_sources(num_frames: int, factor: int) -> np.ndarray:
  """int `[F]`: the keyframe whose latents frame j carries under 'nearest' (the earlier on a tie)."""
  num_keyframes_in(num_frames, factor)
  return (np.arange(num_frames) + (factor - 1) // 2) // factor


def make_condition(keyframe_latents: jax.Array, factor: int, mode: str = 'nearest') -> jax.Array:
  """Keyframe latents `[B, K, h, w, c]` -> the condition `[B, (K - 1) m + 1, h, w, c + 1]`.

  Channels: the condition latents (see the module docstring for `mode`) then the mask (1.0 at
  keyframe positions).
  """
  frames = num_target_frames(keyframe_latents.shape[1], factor)
  return condition_from_given(keyframe_latents, keyframe_sources(frames, factor),
                              keyframe_mask(frames, factor), mode)


def condition_from_given(given_latents: jax.Array, sources: np.ndarray, is_given: np.ndarray,
                         mode: str = 'nearest') -> jax.Array:
  """The condition `[B, F, h, w, c + 1]` of F frames of which some are given (`is_given` `[F]`),
  from their latents `[B, G, h, w, c]`: frame j carries given frame `sources[j]`'s latents
  ('nearest') or, where it is not given, zeros ('zeros'); then the mask channel (1.0 where given).
  Shared by interpolation (keyframes) and image-to-video (frame 0)."""
  if mode not in CONDITION_MODES:
    raise ValueError(f'condition={mode!r}; valid: {CONDITION_MODES}')
  batch, _, height, width, _ = given_latents.shape
  frames = len(sources)
  mask = jnp.asarray(is_given, given_latents.dtype)
  latents = given_latents[:, np.asarray(sources)]
  if mode == 'zeros':
    latents = latents * mask[None, :, None, None, None]
  mask_channel = jnp.broadcast_to(mask[None, :, None, None, None], (batch, frames, height, width, 1))
  return jnp.concatenate([latents, mask_channel], axis=-1)


def condition_from_clip(latents: jax.Array, factor: int, mode: str = 'nearest') -> jax.Array:
  """The condition of a full clip `[B, F, h, w, c]`: built from its every m-th frame only."""
  num_keyframes_in(latents.shape[1], factor)
  return make_condition(latents[:, ::factor], factor, mode)


def check_unet(config: ml_collections.ConfigDict, num_frames: Optional[int] = None) -> None:
  """A ValueError naming the config key when the U-Net cannot take latents + condition."""
  check_condition_channels(config, 'an interpolation U-Net', 'keyframe latents')
  unet = config.model.unet
  if num_frames is not None and unet.get('frame_adaptor', False) and num_frames > int(unet.num_frames):
    raise ValueError(f'{num_frames} output frames; this interpolation U-Net supports at most '
                     f'{unet.num_frames} (config.model.unet.num_frames)')


def check_condition_channels(config: ml_collections.ConfigDict, what: str, given: str) -> None:
  """A ValueError naming the config keys unless the U-Net takes [noisy latents | given latents |
  mask] (2 c + 1 channels) and predicts c."""
  unet = config.model.unet
  latent_channels = int(config.model.vae.latent_channels)
  if int(unet.in_channels) != 2 * latent_channels + 1 or int(unet.out_channels) != latent_channels:
    raise ValueError(f'{what} needs config.model.unet.in_channels = 2 * {latent_channels} + 1 = '
                     f'{2 * latent_channels + 1} (noisy latents, {given}, mask) and out_channels = '
                     f'{latent_channels}; got {unet.in_channels}, {unet.out_channels}')


# --------------------------------------------------------------------------------------------------
# Weight reuse from a base model.


# --------------------------------------------------------------------------------------------------
# Training objective.


# --------------------------------------------------------------------------------------------------
# Sampling.


def sample(unet, unet_params, keyframe_latents: jax.Array, latents: jax.Array, context: jax.Array,
           negative_context: Optional[jax.Array], schedule: diffusion.Schedule, *, factor: int,
           num_inference_steps: int, guidance_scale: Union[float, jax.Array] = 1.0,
           condition: str = 'nearest', fps: Optional[jax.Array] = None, sampler: str = 'ddim',
           eta: float = 0.0, key: Optional[jax.Array] = None, clip_sample: bool = False,
           sigma_spacing: Optional[str] = None, final_sigmas_type: str = 'zero') -> jax.Array:
  """The interpolation sampling loop (call it inside `jax.jit`).

  Args:
    unet, unet_params: the interpolation U-Net and its params.
    keyframe_latents: `[B, K, h, w, c]`, scaled (as the U-Net sees them).
    latents: unit noise `[B, (K - 1) m + 1, h, w, c]`.
    context: text states `[B, L, D]`.
    negative_context: `[B, L, D]` for classifier-free guidance over the text (the condition is the
      same in both halves), or None for the conditional model alone.
    schedule, num_inference_steps, sampler, eta, key, clip_sample, sigma_spacing, final_sigmas_type:
      as `diffusion.sample_loop`.
    factor, condition: m and the condition layout (`config.interpolation`).
    guidance_scale: w in uncond + w (cond - uncond).
    fps: `[B]` frame rate of the output clip, for a U-Net with an fps embedding (else None).

  Returns:
    Denoised latents `[B, (K - 1) m + 1, h, w, c]`, float32.
  """
  cond = make_condition(keyframe_latents.astype(jnp.float32), factor, condition)
  if cond.shape[1] != latents.shape[1]:
    raise ValueError(f'latents have {latents.shape[1]} frames; {keyframe_latents.shape[1]} keyframes '
                     f'interpolated by {factor} give {cond.shape[1]}')
  do_cfg = negative_context is not None
  if do_cfg:  # Unconditional (negative) first, as the base pipeline.
    context = jnp.concatenate([negative_context, context], axis=0)
    cond = jnp.concatenate([cond, cond], axis=0)
    fps = None if fps is None else jnp.concatenate([fps, fps], axis=0)

  def apply(x_in, timesteps):
    return unet.apply({'params': unet_params}, x_in.astype(unet.dtype), timesteps, context, fps=fps)

  model_fn = diffusion.guided_model_fn(apply, guidance_scale if do_cfg else None, condition=cond)
  options = diffusion.sampler_options(sampler, eta=eta, key=key, clip_sample=clip_sample,
                                      sigma_spacing=sigma_spacing,
                                      final_sigmas_type=final_sigmas_type)
  return diffusion.sample_loop(model_fn, latents, schedule, num_inference_steps, sampler=sampler,
                               **options)


def is_interpolation_config(config: ml_collections.ConfigDict) -> bool:
  return config.get('interpolation', None) is not None


class KeyframeInterpolator:
  """A trained interpolation folder: keyframe latents -> latents of (K - 1) m + 1 frames.

      interpolator = KeyframeInterpolator.from_pretrained('runs/shapes_cascade/interpolation/model')
      latents = interpolator(keyframe_latents, ['a red circle moving left'])   # [B, F, h, w, c]
      frames = interpolator.decode(latents)                                   # [B, F, H, W, 3] in [0, 1]

  The loop (text encoding included) is one `jax.jit`, compiled once per shape and static option;
  prompts, keyframes, noise, fps and the guidance scale are traced. Arrays live on the default device.

  Attributes:
    config, params ({'text_encoder', 'vae', 'unet'}), tokenizer, modules, schedule.
    factor: m; condition: the condition layout; trace_count: traces of the loop.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Dict[str, Any], tokenizer: Any,
               *, modules: Optional[Dict[str, Any]] = None):
    if not is_interpolation_config(config):
      raise ValueError('this checkpoint has no `interpolation` config section: train one with '
                       '`config.train.objective="interpolation"` (configs/shapes_cascade.py)')
    check_unet(config)
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.modules = modules or models_lib.build_models(_image_vae(config.model))
    self.schedule = diffusion.Schedule.from_config(config.diffusion)
    self.factor = int(config.interpolation.factor)
    self.condition = str(config.interpolation.get('condition', 'nearest'))
    self.scaling_factor = float(config.model.vae.scaling_factor)
    self.use_fps = bool(config.model.unet.get('fps_embedding', False))
    self.trace_count = 0
    self._sample = jax.jit(self._sample_impl, static_argnames=(
        'num_inference_steps', 'sampler', 'eta', 'do_cfg', 'clip_sample', 'sigma_spacing',
        'final_sigmas_type'))
    self._decode = jax.jit(self._decode_impl)
    self._encode = jax.jit(self._encode_impl)

  @classmethod
  def from_pretrained(cls, path: str) -> 'KeyframeInterpolator':
    """From an exported folder (or a training workdir holding `model/`)."""
    folder = ckpt_lib.model_folder(path)
    if folder is None:
      raise FileNotFoundError(f'{path} is not an interpolation checkpoint folder (config.json + params/)')
    config, params, tokenizer = ckpt_lib.load_pretrained(folder)
    return cls(config, params, tokenizer)

  # The jitted pieces.

  def _sample_impl(self, params, input_ids, uncond_ids, keyframe_latents, latents, fps,
                   guidance_scale, key, *, num_inference_steps: int, sampler: str, eta: float,
                   do_cfg: bool, clip_sample: bool, sigma_spacing: Optional[str],
                   final_sigmas_type: str):
    self.trace_count += 1  # Python side effect: once per trace.
    encode = lambda ids: self.modules['text_encoder'].apply({'params': params['text_encoder']}, ids)
    return sample(self.modules['unet'], params['unet'], keyframe_latents, latents, encode(input_ids),
                  encode(uncond_ids) if do_cfg else None, self.schedule, factor=self.factor,
                  condition=self.condition, num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, fps=fps if self.use_fps else None, sampler=sampler,
                  eta=eta, key=key, clip_sample=clip_sample, sigma_spacing=sigma_spacing,
                  final_sigmas_type=final_sigmas_type)

  def _decode_impl(self, params, latents):
    """Scaled latents `[B, F, h, w, c]` -> frames `[B, F, H, W, 3]` in [0, 1], one frame index at a
    time (`lax.map`, bounded memory for long clips)."""
    vae = self.modules['vae']
    by_frame = einops.rearrange(latents / self.scaling_factor, 'b f h w c -> f b h w c')
    frames = jax.lax.map(lambda z: vae.apply({'params': params['vae']}, z, method='decode'),
                         by_frame)
    frames = einops.rearrange(frames, 'f b h w c -> b f h w c').astype(jnp.float32)
    return jnp.clip(frames / 2 + 0.5, 0.0, 1.0)

  def _encode_impl(self, params, frames):
    """Frames `[B, F, H, W, 3]` in [-1, 1] -> scaled posterior means `[B, F, h, w, c]`."""
    return models_lib.encode_frames(self.modules['vae'], params['vae'], frames, self.scaling_factor)

  # The calls.

  def decode(self, latents: Any) -> np.ndarray:
    return np.asarray(self._decode(self.params, jnp.asarray(latents, jnp.float32)))

  def encode(self, frames: Any) -> np.ndarray:
    """Frames `[B, F, H, W, 3]` in [-1, 1] -> keyframe latents as this model sees them."""
    return np.asarray(self._encode(self.params, jnp.asarray(frames, jnp.float32)))

  def __call__(self, keyframe_latents: Any, prompt: Union[str, Sequence[str]],
               negative_prompt: Union[None, str, Sequence[str]] = None, *,
               num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
               seed: int = 0, latents: Optional[Any] = None, fps: Optional[float] = None,
               sampler: Optional[str] = None, sigma_spacing: Optional[str] = None,
               eta: Optional[float] = None, output_type: str = 'latent') -> np.ndarray:
    """Interpolates keyframe latents `[B, K, h, w, c]` (scaled) by the model's factor m.

    Args:
      keyframe_latents: `[B, K, h, w, c]`, in this model's latent space (scaled).
      prompt: one prompt for every clip or one per clip; negative_prompt likewise (default "").
      num_inference_steps, guidance_scale, sampler, sigma_spacing, eta: default config.sampling
        (`sampling/request.py`); guidance_scale <= 1: the conditional model only.
      seed: seeds the initial noise (unless `latents`) and DDIM's noise for eta > 0.
      latents: initial unit noise `[B, (K - 1) m + 1, h, w, c]`.
      fps: frame rate of the output clip (fps conditioning); default config.data.fps.
      output_type: 'latent' `[B, F, h, w, c]`, 'float' or 'np' (decoded, `[B, F, H, W, 3]` in
        [0, 1]), 'uint8', or 'pil' (per video a list of PIL images).
    """
    req = request_lib.resolve(self.config, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, sampler=sampler, eta=eta,
                              sigma_spacing=sigma_spacing, fps=fps, seed=seed,
                              output_type=output_type)
    keyframe_latents = jnp.asarray(keyframe_latents, jnp.float32)
    channels = int(self.config.model.vae.latent_channels)
    if keyframe_latents.ndim != 5 or keyframe_latents.shape[-1] != channels:
      raise ValueError(f'keyframe latents must be [B, K, h, w, {channels}], got {keyframe_latents.shape}')
    batch, num_keyframes = keyframe_latents.shape[:2]
    frames = num_target_frames(num_keyframes, self.factor)
    check_unet(self.config, frames)
    prompts = request_lib.per_clip(prompt, batch, 'prompt')
    negatives = request_lib.per_clip(negative_prompt, batch)
    shape = (batch, frames) + tuple(keyframe_latents.shape[2:])
    noise_key, loop_key = jax.random.split(jax.random.key(req.seed))
    if latents is None:
      latents = diffusion.initial_noise(noise_key, shape, float(
          self.config.diffusion.get('frame_noise_correlation', 0.0)))
    else:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.shape != shape:
        raise ValueError(f'latents have shape {latents.shape}; expected {shape}')
    static = dict(req.static_options(), clip_sample=req.clip_sample)
    out = self._sample(self.params, jnp.asarray(self.tokenizer(prompts)),
                       jnp.asarray(self.tokenizer(negatives)), keyframe_latents, latents,
                       jnp.full((batch,), req.fps, jnp.float32), jnp.float32(req.guidance_scale),
                       loop_key, **static)
    if output_type == 'latent':
      return np.asarray(out)
    return request_lib.to_output(self.decode(out), output_type)


def _image_vae(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model section with the VideoVAE off: interpolated clips decode frame by frame."""
  if not models_lib.uses_video_vae(model_config):
    return model_config
  logging.info('interpolation stage: decoding frame by frame (its VideoVAE is not used)')
  plain = ml_collections.ConfigDict(model_config.to_dict())
  plain.video_vae.enabled = False
  return plain
