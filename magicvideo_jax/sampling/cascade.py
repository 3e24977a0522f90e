"""The cascade: base keyframes -> keyframe interpolation -> super-resolution (MagicVideo, LaVie).

`MagicVideoPipeline` runs the stages it was given, each optional:

    pipe = MagicVideoPipeline.from_pretrained(base, interpolation=DIR, upscaler=DIR)
    pipe = MagicVideoPipeline.from_pretrained(CASCADE)      # a cascade folder, below
    video = pipe('a red circle moving left', num_frames=16, interpolation_steps=25, upscale_steps=25)

A cascade folder holds one checkpoint folder (or training workdir with `model/`; symlinks are fine) per
stage:
    CASCADE/base/            the text-to-video model (required)
    CASCADE/interpolation/   an interpolation model (`magicvideo_jax.interpolation`; optional)
    CASCADE/upscaler/        a super-resolution model (`magicvideo_jax.upscaler`; optional)
Folders given to `from_pretrained` replace the folder's own.

Data flow for B prompts (each stage with its own text encoder, sampler, steps and guidance; defaults from
its config.sampling):
  base           latents `[B, K, h, w, c]` -> K keyframes.
  interpolation  the keyframe latents, in latent space when both models have the same VAE (config and
                 weights; the case when the interpolation model was grown from the base), else decoded by
                 the base and re-encoded (posterior mean) by the interpolation model's VAE; fps x m;
                 -> latents `[B, (K - 1) m + 1, h, w, c]`, decoded frame by frame.
  upscaler       the decoded frames of the previous stage, in [-1, 1], are the low-res input;
                 -> `[B, F, s H, s W, 3]` (s: the upscaler's VAE factor).
Stage seeds are `seed`, `seed + 1`, `seed + 2`.
"""

import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from magicvideo_jax.sampling import interpolation as interpolation_lib
from magicvideo_jax.sampling import upscaler as upscaler_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import hub

STAGE_DIRS = ('base', 'interpolation', 'upscaler')


def is_cascade_folder(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'base')) and not ckpt_lib.is_pretrained_folder(path)


def _model_folder(path: str) -> str:
  """A checkpoint folder, or the `model/` export of a training workdir."""
  folder = ckpt_lib.model_folder(path)
  if folder is not None:
    return folder
  raise FileNotFoundError(f'{path} is not a checkpoint folder (config.json + params/) nor a training '
                          'workdir with an exported model/')


def resolve_folders(path: str, interpolation: Optional[str] = None, upscaler: Optional[str] = None
                    ) -> Tuple[str, Optional[str], Optional[str]]:
  """(base, interpolation, upscaler) folders of a cascade folder or a base folder plus stages (a Hub
  id: its snapshot in the local Hugging Face cache, `weights/hub.py`)."""
  path = hub.resolve(path)
  if is_cascade_folder(path):
    found = {name: os.path.join(path, name) for name in STAGE_DIRS
             if os.path.isdir(os.path.join(path, name))}
    path = found['base']
    interpolation = interpolation or found.get('interpolation')
    upscaler = upscaler or found.get('upscaler')
  return (path, interpolation and _model_folder(interpolation),
          upscaler and _model_folder(upscaler))


def stage_configs(interpolation: Optional[str], upscaler: Optional[str]):
  """(interpolation config, upscaler config) of the stage folders (None where absent); no weights."""
  return (interpolation and ckpt_lib.load_config(interpolation),
          upscaler and ckpt_lib.load_config(upscaler))


def check_configs(base_config: ml_collections.ConfigDict,
                  interpolation_config: Optional[ml_collections.ConfigDict],
                  upscaler_config: Optional[ml_collections.ConfigDict], *, num_frames: int,
                  height: int, width: int, noise_level: Optional[int] = None,
                  upscale_strength: Optional[float] = None) -> None:
  """ValueErrors for stages that cannot follow the base at this size (before loading any weights)."""
  del base_config  # Another VAE than the base's is fine: the keyframes are then re-encoded.
  frames = num_frames
  if interpolation_config is not None:
    if not interpolation_lib.is_interpolation_config(interpolation_config):
      raise ValueError('the interpolation folder has no `interpolation` config section: it is not an '
                       'interpolation model (config.train.objective="interpolation")')
    frames = interpolation_lib.num_target_frames(num_frames,
                                                 int(interpolation_config.interpolation.factor))
    interpolation_lib.check_unet(interpolation_config, frames)
    vae_factor = 2 ** (len(interpolation_config.model.vae.block_out_channels) - 1)
    unet_factor = 2 ** (len(interpolation_config.model.unet.block_out_channels) - 1)
    if height % (vae_factor * unet_factor) or width % (vae_factor * unet_factor):
      raise ValueError(f'{height}x{width} frames do not fit the interpolation model: height and width '
                       f'must be multiples of {vae_factor * unet_factor}')
  if upscaler_config is not None:
    if not upscaler_lib.is_upscaler_config(upscaler_config):
      raise ValueError('the upscaler folder has no `upscaler` config section: it is not a '
                       'super-resolution model (convert an upscale pipeline or train one with '
                       'config.train.objective="upscaler")')
    unet = upscaler_config.model.unet
    multiple = 2 ** (len(unet.block_out_channels) - 1)
    if height % multiple or width % multiple:
      raise ValueError(f'{height}x{width} frames do not fit the upscaler: the low-res height and '
                       f'width must be multiples of {multiple}')
    if unet.get('frame_adaptor', False) and frames > int(unet.num_frames):
      raise ValueError(f'{frames} frames reach the upscaler; it supports at most {unet.num_frames} '
                       '(config.model.unet.num_frames)')
    limit = int(upscaler_config.upscaler.max_noise_level)
    if noise_level is not None and not 0 <= noise_level <= limit:
      raise ValueError(f'noise_level={noise_level} must be in [0, {limit}] (the upscaler\'s '
                       'config.upscaler.max_noise_level)')
    if upscale_strength is not None and not 0.0 < upscale_strength <= 1.0:
      raise ValueError(f'upscale_strength={upscale_strength} must be in (0, 1] (1: from pure noise)')


def _same_vae_config(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> bool:
  keys = ('block_out_channels', 'latent_channels', 'layers_per_block', 'norm_num_groups',
          'scaling_factor')
  return all(a.model.vae.get(k) == b.model.vae.get(k) for k in keys)


def same_vae(config_a, params_a: Dict[str, Any], config_b, params_b: Dict[str, Any]) -> bool:
  """True when two stages share their VAE (same config and equal weights): latents pass as they are."""
  if not _same_vae_config(config_a, config_b):
    return False
  leaves_a, tree_a = jax.tree.flatten(params_a['vae'])
  leaves_b, tree_b = jax.tree.flatten(params_b['vae'])
  if tree_a != tree_b:
    return False
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def load_stages(interpolation: Optional[str], upscaler: Optional[str]):
  """(KeyframeInterpolator or None, VideoUpscaler or None)."""
  return (interpolation and interpolation_lib.KeyframeInterpolator.from_pretrained(interpolation),
          upscaler and upscaler_lib.VideoUpscaler.from_pretrained(upscaler))


def run_stages(pipe, keyframe_latents: np.ndarray, prompts: Sequence[str], negatives: Sequence[str],
               *, seed: int, fps: float, interpolate: bool = True, upscale: bool = True,
               interpolation_steps: Optional[int] = None,
               interpolation_guidance_scale: Optional[float] = None,
               upscale_steps: Optional[int] = None, upscale_guidance_scale: Optional[float] = None,
               noise_level: Optional[int] = None, upscale_strength: Optional[float] = None,
               use_video_vae: bool = True) -> Dict[str, Any]:
  """The stages after the base, on its denoised latents `[B, K, h, w, c]` (scaled).

  Args:
    pipe: the `MagicVideoPipeline` (its `interpolator` and `upscaler` stages, its decoder).
    keyframe_latents: the base's output latents.
    prompts, negatives: B prompts and B negative prompts (each stage encodes them itself).
    seed: the base's seed (stages use seed + 1 and seed + 2).
    fps: the base's fps conditioning; the interpolation stage gets fps x m.
    interpolate, upscale: False skips a loaded stage.
    interpolation_steps, interpolation_guidance_scale, upscale_steps, upscale_guidance_scale,
      noise_level, upscale_strength: per-stage settings (None: the stage's config).
    use_video_vae: the base decoder's switch (when the base's frames are the output or the SR input).

  Returns:
    dict with 'frames' (`[B, F, H, W, 3]` float in [0, 1]: the last low-resolution video), 'latents'
    (its latents), 'fps' (of 'frames'), and, when run, 'keyframes' (the base's decoded frames, when
    the VAEs differ), 'upscaled' (`[B, F, s H, s W, 3]` in [0, 1]) and 'upscaled_latents'.
  """
  out: Dict[str, Any] = dict(latents=np.asarray(keyframe_latents), fps=float(fps))
  interpolator = pipe.interpolator if interpolate else None
  if interpolator is not None:
    if same_vae(pipe.config, pipe.params, interpolator.config, interpolator.params):
      keyframes = np.asarray(keyframe_latents)
    else:
      out['keyframes'] = pipe.decode(keyframe_latents, use_video_vae=use_video_vae)
      keyframes = interpolator.encode(2.0 * out['keyframes'] - 1.0)
    t0 = time.time()
    out['latents'] = interpolator(
        keyframes, list(prompts), list(negatives), num_inference_steps=interpolation_steps,
        guidance_scale=interpolation_guidance_scale, seed=seed + 1, fps=fps * interpolator.factor)
    out['frames'] = interpolator.decode(out['latents'])
    out['fps'] = fps * interpolator.factor
    pipe.log(f'interpolated {keyframes.shape[1]} -> {out["frames"].shape[1]} frames in '
              f'{time.time() - t0:.1f} s')
  else:
    out['frames'] = pipe.decode(keyframe_latents, use_video_vae=use_video_vae)
  upscaler = pipe.upscaler if upscale else None
  if upscaler is not None:
    t0 = time.time()
    low_res = 2.0 * out['frames'] - 1.0
    kwargs = dict(num_inference_steps=upscale_steps, guidance_scale=upscale_guidance_scale,
                  noise_level=noise_level, strength=upscale_strength, seed=seed + 2,
                  fps=out['fps'])
    out['upscaled_latents'] = upscaler(low_res, list(prompts), list(negatives),
                                       output_type='latent', **kwargs)
    out['upscaled'] = upscaler.decode(out['upscaled_latents'])
    pipe.log(f'super-resolved {low_res.shape[2]}x{low_res.shape[3]} -> '
              f'{out["upscaled"].shape[2]}x{out["upscaled"].shape[3]} in {time.time() - t0:.1f} s')
  return out
