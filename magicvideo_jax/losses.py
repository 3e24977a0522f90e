"""Every training objective, with the key, timestep and noise helpers they share.

An objective is `loss(params, batch, keys, *, modules, schedule, config) -> (loss, metrics)`; `LOSSES`
maps `config.train.objective` to it:
  'diffusion'      noise-prediction loss of the (video) U-Net on VAE latents, conditioned as
                   `config.model.conditioning` says (context.py); joint image-video batches weight the
                   appended image frames by `config.train.image_loss_weight`.
  'vae'            reconstruction (L1 + L2) + KL of the autoencoder on single frames.
  'video_vae'      clip reconstruction through the frozen encoder and the temporal decoder, plus a
                   temporal-difference term.
  'clip'           contrastive (symmetric InfoNCE) training of a CLIP dual encoder on frames and captions.
  'interpolation'  the keyframe interpolation U-Net on clips of (K - 1) m + 1 frames.
  'image_to_video' the first-frame-conditioned video U-Net (sampling/image_to_video.py).
  'upscaler'       the video super-resolution U-Net on high-resolution clips.
  'cmd_autoencoder', 'cmd_content', 'cmd_motion'
                   CMD's three stages (models/cmd.py) on the frozen VAE's latents of clips: the
                   autoencoder's reconstruction; the image U-Net's diffusion loss on the content
                   frames of the frozen autoencoder; the motion DiT's on its motion latents, given
                   the clean content frame and the caption's pooled text features.

Every loss takes `keys`: one PRNG key per example [B], derived from (seed, step, example index), so
noise, timesteps and posterior samples do not depend on how the batch is split (devices, hosts,
gradient-accumulation micro-batches).
"""

from typing import Any, Dict, Optional, Tuple

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from magicvideo_jax import context as context_lib
from magicvideo_jax import diffusion
from magicvideo_jax import models as models_lib
from magicvideo_jax.models import clip as clip_lib
from magicvideo_jax.models import clip_vision
from magicvideo_jax.models import cmd as cmd_lib
from magicvideo_jax.models import conditioning
from magicvideo_jax.models import text_encoder
from magicvideo_jax.sampling import image_to_video
from magicvideo_jax.sampling import interpolation
from magicvideo_jax.sampling import upscaler

Params = Dict[str, Any]


# ----------------------------------------------------------------------------------------------------
# Keys, timesteps, noise.


def example_normal(keys: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Standard normal `[B, *shape]`, row i drawn from keys[i]."""
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))(keys)


def split_keys(keys: jax.Array, num: int) -> Tuple[jax.Array, ...]:
  """`[B]` keys -> `num` independent `[B]` key arrays."""
  split = jax.vmap(lambda k: jax.random.split(k, num))(keys)
  return tuple(split[:, i] for i in range(num))


def train_timesteps(keys: jax.Array, schedule, config: ml_collections.ConfigDict) -> jax.Array:
  """Training timesteps `[B]`, one per example key, by `config.train.timestep_sampling`."""
  tc = config.train
  return diffusion.sample_timesteps(keys, schedule.num_train_timesteps, tc.timestep_sampling,
                                    tc.timestep_logit_mean, tc.timestep_logit_std)


def frame_noise(keys: jax.Array, shape, config: ml_collections.ConfigDict,
                frame_mask: Optional[jax.Array] = None) -> jax.Array:
  """Diffusion noise `[B, *shape]` (shape = `[F, h, w, c]`), row i from keys[i]; its frames correlate
  by `config.diffusion.frame_noise_correlation` (0: i.i.d., the draws of `example_normal`)."""
  noise = example_normal(keys, shape)
  correlation = float(config.diffusion.frame_noise_correlation)
  if not correlation:
    return noise
  shared_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  shared = example_normal(shared_keys, (1,) + tuple(shape[1:]))
  return diffusion.mix_frame_noise(noise, shared, correlation, frame_mask)


def encode_latents(vae, vae_params, video: jax.Array, keys: jax.Array, scaling_factor: float) -> jax.Array:
  """Video `[B, F, H, W, 3]` in [-1, 1] -> scaled posterior samples `[B, F, h, w, c]` (no gradient)."""
  b = video.shape[0]
  frames = einops.rearrange(video, 'b f h w c -> (b f) h w c')
  mean, logvar = vae.apply({'params': vae_params}, frames, method=vae.encode)
  mean, logvar = (einops.rearrange(x, '(b f) h w c -> b f h w c', b=b) for x in (mean, logvar))
  z = mean + jnp.exp(0.5 * logvar) * example_normal(keys, mean.shape[1:], mean.dtype)
  return jax.lax.stop_gradient(z * scaling_factor)


# ----------------------------------------------------------------------------------------------------
# Objectives.


def diffusion_loss(params: Params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules, schedule,
                   config: ml_collections.ConfigDict) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Noise-prediction loss over a `[B, F, H, W, 3]` video batch.

  Or from precomputed latents: the VAE posterior (`latent_mean`, `latent_std`, sampled here as the
  encoder path samples it) or final `latents` (pixel-space models).
  """
  unet, vae = modules['unet'], modules['vae']
  keys_z, keys_t, keys_n = split_keys(keys, 3)
  if 'latent_mean' in batch:
    mean = batch['latent_mean'].astype(jnp.float32)
    z = mean + batch['latent_std'].astype(jnp.float32) * example_normal(keys_z, mean.shape[1:])
    latents = jax.lax.stop_gradient(z * config.model.vae.scaling_factor)
  elif 'latents' in batch:
    latents = batch['latents'].astype(jnp.float32)
  else:
    latents = encode_latents(vae, params['vae'], batch['video'], keys_z,
                             config.model.vae.scaling_factor)
  b, f = latents.shape[:2]
  frame_mask = batch.get('frame_mask', jnp.ones((b, f), bool))
  context = context_lib.training_context(params, batch, keys, modules=modules, config=config)
  timesteps = train_timesteps(keys_t, schedule, config)
  noise = frame_noise(keys_n, latents.shape[1:], config, frame_mask)
  noisy = diffusion.add_noise(schedule, latents, noise, timesteps)
  fps = batch.get('fps') if config.model.unet.fps_embedding else None
  prediction = unet.apply({'params': params['unet']}, noisy, timesteps, context, fps=fps,
                          frame_mask=frame_mask)
  target = diffusion.training_target(schedule, latents, noise, timesteps,
                                     config.diffusion.prediction_type)
  per_frame = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=(2, 3, 4))  # [B, F]
  video_w = frame_mask.astype(jnp.float32)
  image_w = 1.0 - video_w
  video_loss = jnp.sum(per_frame * video_w) / jnp.maximum(jnp.sum(video_w), 1.0)
  image_loss = jnp.sum(per_frame * image_w) / jnp.maximum(jnp.sum(image_w), 1.0)
  loss = video_loss + config.train.image_loss_weight * image_loss
  return loss, dict(video_loss=video_loss, image_loss=image_loss)


def vae_loss(params: Params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules, schedule,
             config: ml_collections.ConfigDict) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """L1 + L2 reconstruction and KL of the autoencoder on the batch's frames."""
  del schedule
  vae = modules['vae']
  b = batch['video'].shape[0]
  frames = einops.rearrange(batch['video'], 'b f h w c -> (b f) h w c')
  mean, logvar = vae.apply({'params': params['vae']}, frames, method=vae.encode)
  eps = example_normal(keys, (mean.shape[0] // b,) + mean.shape[1:], mean.dtype)
  z = mean + jnp.exp(0.5 * logvar) * einops.rearrange(eps, 'b f h w c -> (b f) h w c')
  recon = vae.apply({'params': params['vae']}, z, method=vae.decode).astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(recon - frames))
  l2 = jnp.mean(jnp.square(recon - frames))
  kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
  loss = l1 + l2 + config.train.kl_weight * kl
  return loss, dict(l1=l1, l2=l2, kl=kl)


def video_vae_loss(params: Dict[str, Any], batch: Dict[str, jax.Array], key: jax.Array, *, modules,
                   schedule, config: ml_collections.ConfigDict
                   ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Reconstruction of clips through the frozen encoder and the temporal decoder.

  Same signature as `vae_loss`. `batch['video']` `[B, F, H, W, 3]` in [-1, 1]; `modules['vae']`
  a `VideoAutoencoderKL`, `params['vae']` its params. Every frame is encoded (no gradient to the
  encoder), a posterior sample (`config.train.video_vae_sample_posterior`, default True; the mean when
  False) is decoded as a clip, and
    loss = L1 + L2 + config.train.temporal_loss_weight (default 1.0) * temporal,
    temporal = mean |(recon[t+1] - recon[t]) - (x[t+1] - x[t])|.
  Sampling the posterior independently per frame gives latents with frame-to-frame jitter, which the
  temporal decoder learns to remove (as it must for diffusion latents).

  Returns:
    (loss, {'l1', 'l2', 'temporal'}).
  """
  del schedule
  vae = modules['vae']
  if not hasattr(vae, 'decode_video'):
    raise TypeError(f"The 'video_vae' objective needs modules['vae'] to be a VideoAutoencoderKL "
                    f'(models.video_vae.build_video_vae), got {type(vae).__name__}.')
  variables = {'params': params['vae']}
  video = batch['video'].astype(jnp.float32)
  frames = einops.rearrange(video, 'b f h w c -> (b f) h w c')
  mean, logvar = jax.lax.stop_gradient(vae.apply(variables, frames, method=vae.encode))
  if config.train.video_vae_sample_posterior:
    # One key per clip (`key` [B]): samples do not depend on how the batch is split.
    eps = jax.vmap(lambda k: jax.random.normal(k, (video.shape[1],) + mean.shape[1:], mean.dtype))(
        key if key.ndim else jax.random.split(key, video.shape[0]))
    z = mean + jnp.exp(0.5 * logvar) * einops.rearrange(eps, 'b f h w c -> (b f) h w c')
  else:
    z = mean
  z = einops.rearrange(z, '(b f) h w c -> b f h w c', f=video.shape[1])
  recon = vae.apply(variables, z, method=vae.decode_video).astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(recon - video))
  l2 = jnp.mean(jnp.square(recon - video))
  if video.shape[1] > 1:
    temporal = jnp.mean(jnp.abs(jnp.diff(recon, axis=1) - jnp.diff(video, axis=1)))
  else:
    temporal = jnp.zeros((), jnp.float32)
  loss = l1 + l2 + config.train.temporal_loss_weight * temporal
  return loss, dict(l1=l1, l2=l2, temporal=temporal)


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                     positives: jax.Array, valid: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Symmetric InfoNCE over a batch, with several positives per row.

  Args:
    image_embeds, text_embeds: `[B, D]` (normalised here).
    logit_scale: `[]`, log of the inverse temperature (clipped at `clip_lib.MAX_LOGIT_SCALE`).
    positives: bool `[B, B]`, symmetric: image i and text j match (e.g. equal captions). Row i's
      loss is -log of the softmax mass on its positives (CLIP's cross-entropy when the identity is
      the only positive), so clips that share a caption are not pushed apart.
    valid: bool `[B]`, pairs that take part (an empty caption does not).

  Returns:
    (loss, {'i2t_accuracy', 't2i_accuracy', 'temperature'}): accuracy = the row's best match is a
    positive.
  """
  image = conditioning.normalize_embedding(image_embeds.astype(jnp.float32))
  text = conditioning.normalize_embedding(text_embeds.astype(jnp.float32))
  scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), np.log(clip_lib.MAX_LOGIT_SCALE)))
  logits = scale * image @ text.T  # [B images, B texts]
  positives = positives & valid[:, None] & valid[None, :]
  weights = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)

  def direction(logits):
    logits = jnp.where(valid[None, :], logits, -1e9)  # Invalid columns are no candidates.
    on_positives = jnp.where(positives, logits, -1e9)
    per_row = jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(on_positives, axis=-1)
    hit = jnp.take_along_axis(positives, jnp.argmax(logits, axis=-1)[:, None], axis=-1)[:, 0]
    return jnp.sum(per_row * weights) / count, jnp.sum(hit * weights) / count

  loss_i2t, acc_i2t = direction(logits)
  loss_t2i, acc_t2i = direction(logits.T)
  return 0.5 * (loss_i2t + loss_t2i), dict(i2t_accuracy=acc_i2t, t2i_accuracy=acc_t2i,
                                           temperature=1.0 / scale)


def clip_loss(params: Dict[str, Any], batch: Dict[str, jax.Array], keys: jax.Array, *, modules,
              schedule, config: ml_collections.ConfigDict) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The 'clip' objective: contrastive loss of `params['clip']` on (one frame, caption) pairs.

  Same signature as `vae_loss`. Each clip of `batch['video']` `[B, F, H, W, 3]` in [-1, 1]
  contributes one frame chosen by its own key (`context.random_frames`); captions are
  `batch['input_ids']` `[B, L]`. Clips with identical captions count as positives of each other
  (a small caption vocabulary repeats captions within a batch), empty captions ("", dropped or
  uncaptioned) are left out. With gradient accumulation the negatives are those of a micro-batch.
  """
  del schedule
  model = modules['clip']
  clip_config = config.model.clip
  frames = context_lib.random_frames(batch['video'], keys, config.data.num_frames)
  pixels = clip_vision.preprocess((frames.astype(jnp.float32) + 1.0) / 2.0,
                                  clip_config.vision.image_size)
  ids = batch['input_ids']
  out = model.apply({'params': params['clip']}, ids, pixels.astype(model.dtype))
  valid = text_encoder.eos_positions(ids, clip_config.text.eos_token_id) != 1
  positives = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
  return contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale, positives, valid)


def clip_latents(params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules,
                 config: ml_collections.ConfigDict) -> jax.Array:
  """Scaled latents `[B, F, h, w, c]` of the batch's clips `video` (VAE posterior samples, no
  gradient)."""
  return encode_latents(modules['vae'], params['vae'], batch['video'], keys,
                              config.model.vae.scaling_factor)


def interpolation_loss(params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules, schedule,
                       config: ml_collections.ConfigDict) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Diffusion loss of the interpolation U-Net on clips of F = (K - 1) m + 1 frames.

  The condition comes from the clip's keyframes (every m-th frame's latents); the U-Net denoises all
  F frames (`denoising_loss`). Same signature as `diffusion_loss`.

  Returns:
    (loss, {'keyframe_loss', 'inbetween_loss'}).
  """
  ic = config.interpolation
  keys_z, keys_t, keys_n = split_keys(keys, 3)
  latents = clip_latents(params, batch, keys_z, modules=modules, config=config)
  condition = interpolation.condition_from_clip(latents, ic.factor, ic.condition)
  context = modules['text_encoder'].apply({'params': params['text_encoder']}, batch['input_ids'])
  fps = batch.get('fps') if config.model.unet.fps_embedding else None
  loss, (keyframe_loss, inbetween_loss) = denoising_loss(
      params['unet'], latents, condition, context, keys_t, keys_n,
      is_given=interpolation.keyframe_mask(latents.shape[1], ic.factor),  # Raises for a bad length.
      given_weight=float(ic.keyframe_loss_weight), fps=fps, unet=modules['unet'],
      schedule=schedule, config=config)
  return loss, dict(keyframe_loss=keyframe_loss, inbetween_loss=inbetween_loss)


def image_to_video_loss(params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules, schedule,
                        config: ml_collections.ConfigDict) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Diffusion loss of the first-frame-conditioned U-Net: the condition comes from the clip's own
  frame 0; the U-Net denoises all F frames (`denoising_loss`). Same signature as `diffusion_loss`.

  Returns:
    (loss, {'first_frame_loss', 'later_frames_loss'}).
  """
  image_to_video.check_unet(config)
  i2v = config.image_to_video
  keys_z, keys_t, keys_n = split_keys(keys, 3)
  latents = clip_latents(params, batch, keys_z, modules=modules, config=config)
  condition = image_to_video.condition_from_clip(latents, i2v.condition)
  context = context_lib.text_context(config.model, modules, params, batch['input_ids'])
  fps = batch.get('fps') if config.model.unet.fps_embedding else None
  loss, (first, later) = denoising_loss(
      params['unet'], latents, condition, context, keys_t, keys_n,
      is_given=image_to_video.given_mask(latents.shape[1]),
      given_weight=float(i2v.first_frame_loss_weight), fps=fps, unet=modules['unet'],
      schedule=schedule, config=config)
  return loss, dict(first_frame_loss=first, later_frames_loss=later)


def denoising_loss(unet_params, latents: jax.Array, condition: jax.Array, context: jax.Array,
                   keys_t: jax.Array, keys_n: jax.Array, *, is_given: np.ndarray,
                   given_weight: float, fps: Optional[jax.Array], unet, schedule,
                   config: ml_collections.ConfigDict
                   ) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
  """The loss of a U-Net conditioned on given frames, given the clip latents `[B, F, h, w, c]` (the
  targets) and the condition `[B, F, h, w, c + 1]`: noise at a per-clip timestep (keys `[B]`),
  predict from noisy latents | condition, loss = weighted mean over frames of the per-frame loss, the
  given frames (`is_given` `[F]`, bool) weighted by `given_weight`.

  Returns:
    (loss, (mean loss of the given frames, mean loss of the others)).
  """
  timesteps = train_timesteps(keys_t, schedule, config)
  noise = frame_noise(keys_n, latents.shape[1:], config)
  noisy = diffusion.add_noise(schedule, latents, noise, timesteps)
  prediction = unet.apply({'params': unet_params},
                          jnp.concatenate([noisy, condition], axis=-1).astype(unet.dtype), timesteps,
                          context, fps=fps)
  target = diffusion.training_target(schedule, latents, noise, timesteps,
                                     config.diffusion.prediction_type)
  per_frame = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=(2, 3, 4))  # [B, F]
  is_given = np.asarray(is_given, bool)
  given_loss = jnp.mean(per_frame[:, is_given])
  other_loss = jnp.mean(per_frame[:, ~is_given]) if (~is_given).any() else given_loss
  weights = jnp.where(jnp.asarray(is_given), given_weight, 1.0)
  loss = jnp.sum(per_frame * weights) / (per_frame.shape[0] * jnp.sum(weights))
  return loss, (given_loss, other_loss)


def upscaler_loss(params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules, schedule,
                  config: ml_collections.ConfigDict):
  """Diffusion loss of a (video) SR U-Net on high-resolution clips `video` `[B, F, H, W, 3]` in [-1, 1].

  The target is the clip's latents (frozen VAE, `[B, F, H/f, W/f, c]` for its factor f); the low-res
  input is the clip area-averaged by f (as large as the latents), noise-augmented under
  `config.upscaler.noise_schedule` at a level drawn uniformly in [0, max_noise_level] per clip, which
  the U-Net also gets as its class label (the SD x4 upscaler's conditioning). Same signature as
  `diffusion_loss`.

  Returns:
    (loss, {'noise_level'}: the batch's mean augmentation level).
  """
  unet, vae, text_model = modules['unet'], modules['vae'], modules['text_encoder']
  unet_config = config.model.unet
  if int(unet_config.in_channels) != upscaler.LATENT_CHANNELS + 3 or not unet_config.num_class_embeds:
    raise ValueError('the upscaler objective needs config.model.unet.in_channels='
                     f'{upscaler.LATENT_CHANNELS + 3} and num_class_embeds (the noise level)')
  keys_z, keys_t, keys_n, keys_level, keys_aug = split_keys(keys, 5)
  video = batch['video'].astype(jnp.float32)
  latents = encode_latents(vae, params['vae'], video, keys_z, config.model.vae.scaling_factor)
  low_res = upscaler.downsample(video, video.shape[2] // latents.shape[2])
  up = config.upscaler
  levels = jax.vmap(lambda k: jax.random.randint(k, (), 0, int(up.max_noise_level) + 1))(keys_level)
  condition = diffusion.add_noise(diffusion.Schedule.from_config(up.noise_schedule), low_res,
                                  example_normal(keys_aug, low_res.shape[1:]), levels)
  context = text_model.apply({'params': params['text_encoder']}, batch['input_ids'])
  timesteps = train_timesteps(keys_t, schedule, config)
  noise = frame_noise(keys_n, latents.shape[1:], config)
  noisy = diffusion.add_noise(schedule, latents, noise, timesteps)
  fps = batch.get('fps') if config.model.unet.fps_embedding else None
  prediction = unet.apply({'params': params['unet']},
                          jnp.concatenate([noisy, condition], axis=-1).astype(unet.dtype), timesteps,
                          context, fps=fps, class_labels=levels)
  target = diffusion.training_target(schedule, latents, noise, timesteps,
                                     config.diffusion.prediction_type)
  loss = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))
  return loss, dict(noise_level=jnp.mean(levels.astype(jnp.float32)))


# ----------------------------------------------------------------------------------------------------
# CMD: the autoencoder, the content-frame model (the image U-Net) and the motion DiT.


def cmd_clip_latents(params: Params, batch: Dict[str, jax.Array], *, modules,
                     config: ml_collections.ConfigDict) -> jax.Array:
  """CMD's input: a clip's scaled SD latents `[B, L, h, w, c]`, the frozen VAE's posterior means of
  `batch['video']` (or the stored `latent_mean`), without gradient."""
  scale = config.model.vae.scaling_factor
  if 'latent_mean' in batch:
    latents = batch['latent_mean'].astype(jnp.float32) * scale
  else:
    latents = models_lib.encode_frames(modules['vae'], params['vae'], batch['video'], scale)
  return jax.lax.stop_gradient(latents.astype(jnp.float32))


def cmd_encode(params: Params, latents: jax.Array, *, modules) -> Tuple[jax.Array, jax.Array]:
  """(z_c `[B, h, w, c]`, z_m `[B, L, W' + H', D]`) of the frozen autoencoder."""
  autoencoder = modules['cmd_autoencoder']
  content, motion = autoencoder.apply({'params': params['cmd_autoencoder']}, latents,
                                      method='encode')
  return jax.lax.stop_gradient(content), jax.lax.stop_gradient(motion)


def cmd_autoencoder_loss(params: Params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules,
                         schedule, config: ml_collections.ConfigDict
                         ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """MSE of the autoencoder's reconstruction of the clip latents; `clip_mean_mse` is the error of
  the 'every frame = the clip's mean latent' baseline, which an autoencoder blind to position
  (or to motion) stays at."""
  del keys, schedule
  latents = cmd_clip_latents(params, batch, modules=modules, config=config)
  autoencoder = modules['cmd_autoencoder']
  reconstruction, _, motion = autoencoder.apply({'params': params['cmd_autoencoder']}, latents)
  loss = cmd_lib.reconstruction_loss(reconstruction, latents)
  baseline = jnp.mean(jnp.square(latents - jnp.mean(latents, axis=1, keepdims=True)))
  return loss, dict(clip_mean_mse=baseline, motion_abs=jnp.mean(jnp.abs(motion)))


def cmd_content_loss(params: Params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules,
                     schedule, config: ml_collections.ConfigDict
                     ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The image U-Net's diffusion loss (`diffusion_loss`) on the clips' content frames z_c."""
  latents = cmd_clip_latents(params, batch, modules=modules, config=config)
  content, _ = cmd_encode(params, latents, modules=modules)
  frames = {'latents': content[:, None], 'input_ids': batch['input_ids'],
            'frame_mask': jnp.ones((content.shape[0], 1), bool)}
  return diffusion_loss(params, frames, keys, modules=modules, schedule=schedule, config=config)


def cmd_motion_loss(params: Params, batch: Dict[str, jax.Array], keys: jax.Array, *, modules,
                    schedule, config: ml_collections.ConfigDict
                    ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The motion DiT's diffusion loss on z_m times `model.cmd.motion_scale` (unit variance for the
  diffusion), conditioned on the clean z_c and the caption's pooled text features (an empty,
  dropped caption trains the unconditional branch of guidance)."""
  latents = cmd_clip_latents(params, batch, modules=modules, config=config)
  content, motion = cmd_encode(params, latents, modules=modules)
  motion = motion * config.model.cmd.motion_scale
  hidden = context_lib.text_context(config.model, modules, params, batch['input_ids'])
  text = context_lib.pooled_text(config.model, hidden, batch['input_ids'])
  keys_t, keys_n = split_keys(keys, 2)
  timesteps = train_timesteps(keys_t, schedule, config)
  noise = example_normal(keys_n, motion.shape[1:])
  noisy = diffusion.add_noise(schedule, motion, noise, timesteps)
  prediction = modules['motion_dit'].apply({'params': params['motion_dit']}, noisy, timesteps,
                                           content, text)
  target = diffusion.training_target(schedule, motion, noise, timesteps,
                                     config.diffusion.prediction_type)
  loss = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))
  return loss, dict(motion_std=jnp.std(motion))


LOSSES = {'diffusion': diffusion_loss, 'vae': vae_loss, 'video_vae': video_vae_loss,
          'clip': clip_loss, 'interpolation': interpolation_loss,
          'image_to_video': image_to_video_loss, 'upscaler': upscaler_loss,
          'cmd_autoencoder': cmd_autoencoder_loss, 'cmd_content': cmd_content_loss,
          'cmd_motion': cmd_motion_loss}
