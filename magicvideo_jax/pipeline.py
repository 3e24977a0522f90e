"""MagicVideoPipeline: prompt -> video, the whole denoising loop in one jit.

    pipe = MagicVideoPipeline.from_pretrained('path/to/checkpoint')
    video = pipe('a red circle moving left', num_frames=16, seed=0)   # [1, F, H, W, 3] uint8

Text encoding, the DDIM / DPM-Solver++ loop with classifier-free guidance (conditional and
unconditional batches concatenated) and the VAE decode are jitted once per shape and static option;
prompts, seeds, latents, fps and the guidance scale are traced, so new ones do not recompile.
"""

import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from magicvideo_jax import checkpoint as ckpt_lib
from magicvideo_jax import diffusion
from magicvideo_jax import models as models_lib
from magicvideo_jax import sharding as sharding_lib

OUTPUT_TYPES = ('uint8', 'float', 'latent')


class MagicVideoPipeline:
  """Text-to-video sampling with a converted or trained checkpoint."""

  def __init__(self, config: ml_collections.ConfigDict, params: Dict[str, Any], tokenizer: Any, *,
               modules: Optional[Dict[str, Any]] = None, mesh: Optional[jax.sharding.Mesh] = None,
               schedule: Optional[diffusion.Schedule] = None, verbose: bool = False):
    self.config = config
    self.tokenizer = tokenizer
    self.modules = modules or models_lib.build_models(config.model)
    self.schedule = schedule or diffusion.Schedule.from_config(config.diffusion)
    self.mesh = mesh or sharding_lib.create_mesh({'data': -1, 'fsdp': 1})
    self.verbose = verbose
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    unet_cfg = config.model.unet
    self.is_video = (unet_cfg.get('frame_adaptor', False) or unet_cfg.get('temporal_attention', 'none')
                     != 'none')
    self.max_frames = int(unet_cfg.get('num_frames', 1)) if self.is_video else None
    self.vae_factor = 2 ** (len(config.model.vae.block_out_channels) - 1)
    self.latent_channels = int(config.model.unet.in_channels)
    self._compiled: Dict[Any, Any] = {}
    self._denoise = jax.jit(self._denoise_impl, static_argnames=(
        'num_inference_steps', 'sampler', 'eta', 'do_cfg', 'use_fps', 'show_progress'))
    self._decode = jax.jit(self._decode_impl)

  # ------------------------------------------------------------------------------------------------
  # Loading.

  @classmethod
  def from_pretrained(cls, path: str, *, num_frames: Optional[int] = None,
                      mesh: Optional[jax.sharding.Mesh] = None, verbose: bool = False,
                      **overrides) -> 'MagicVideoPipeline':
    """From a checkpoint folder (convert / training export), a training workdir, or a diffusers folder.

    A diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) is converted on the
    fly; its video layers get their identity init for `num_frames` frames (default 16), and its
    scheduler config (betas, spacing, offset, set_alpha_to_one, prediction type) is honoured.
    """
    t0 = time.time()
    if not os.path.isdir(path):
      raise FileNotFoundError(f'checkpoint folder not found: {path}')
    if ckpt_lib.is_pretrained_folder(path):
      config, params, tokenizer = ckpt_lib.load_pretrained(path)
    elif ckpt_lib.is_pretrained_folder(os.path.join(path, 'model')):
      config, params, tokenizer = ckpt_lib.load_pretrained(os.path.join(path, 'model'))
    elif os.path.isfile(os.path.join(path, 'unet', 'config.json')):
      from magicvideo_jax import convert  # pylint: disable=g-import-not-at-top
      config, params, tokenizer = convert.convert_diffusers_folder(path, num_frames=num_frames or 16)
    else:
      raise FileNotFoundError(
          f'{path} is neither a magicvideo_jax checkpoint folder (config.json + params/), a training '
          'workdir with an exported model/, nor a diffusers folder (unet/config.json ...)')
    for key, value in overrides.items():
      config.model[key] = value
    pipe = cls(config, params, tokenizer, mesh=mesh, verbose=verbose)
    pipe._log(f'loaded {path} in {time.time() - t0:.1f} s')
    return pipe

  # ------------------------------------------------------------------------------------------------
  # The jitted pieces.

  def _encode_text(self, params, input_ids):
    return self.modules['text_encoder'].apply({'params': params['text_encoder']}, input_ids)

  def _denoise_impl(self, params, input_ids, uncond_ids, latents, key, fps, guidance_scale, *,
                    num_inference_steps: int, sampler: str, eta: float, do_cfg: bool, use_fps: bool,
                    show_progress: bool):
    """Latents `[B, F, h, w, c]` (unit noise) -> denoised latents, scaled as the U-Net sees them."""
    unet = self.modules['unet']
    context = self._encode_text(params, input_ids)
    if do_cfg:
      context = jnp.concatenate([self._encode_text(params, uncond_ids), context], axis=0)
      fps = jnp.concatenate([fps, fps], axis=0)
    fps = fps if use_fps else None

    def model_fn(x, t):
      if show_progress:
        jax.debug.callback(self._on_step, t)
      x_in = jnp.concatenate([x, x], axis=0) if do_cfg else x
      timesteps = jnp.broadcast_to(t, (x_in.shape[0],))
      out = unet.apply({'params': params['unet']}, x_in.astype(unet.dtype), timesteps, context,
                       fps=fps).astype(jnp.float32)
      if do_cfg:
        uncond, cond = jnp.split(out, 2, axis=0)
        out = uncond + guidance_scale * (cond - uncond)
      return out

    return diffusion.sample_loop(model_fn, latents, self.schedule, num_inference_steps,
                                 sampler=sampler, eta=eta, key=key)

  def _decode_impl(self, params, latents):
    """Scaled latents `[B, F, h, w, c]` -> frames `[B, F, H, W, 3]` in [0, 1]."""
    vae = self.modules['vae']
    b = latents.shape[0]
    z = einops.rearrange(latents, 'b f h w c -> (b f) h w c') / self.config.model.vae.scaling_factor
    frames = vae.apply({'params': params['vae']}, z, method=vae.decode).astype(jnp.float32)
    frames = jnp.clip(frames / 2 + 0.5, 0.0, 1.0)
    return einops.rearrange(frames, '(b f) h w c -> b f h w c', b=b)

  # ------------------------------------------------------------------------------------------------
  # The call.

  def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt: Union[None, str,
               Sequence[str]] = None, num_frames: int = 16, height: int = 256, width: int = 256,
               num_inference_steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0,
               fps: Optional[float] = None, seed: int = 0, latents: Optional[np.ndarray] = None,
               sampler: str = 'ddim', output_type: str = 'uint8') -> np.ndarray:
    """Generates one video per prompt: `[B, F, H, W, 3]` uint8 (or float in [0, 1], or latents)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
      raise ValueError('prompt is empty: give a string or a non-empty list of strings')
    negatives = self._negatives(negative_prompt, len(prompts))
    self._check_call(num_frames, height, width, num_inference_steps, sampler, output_type, eta)
    b = len(prompts)
    latent_shape = (b, num_frames, height // self.vae_factor, width // self.vae_factor,
                    self.latent_channels)
    key = jax.random.key(seed)
    noise_key, loop_key = jax.random.split(key)
    if latents is None:
      latents = jax.random.normal(noise_key, latent_shape, jnp.float32)
    else:
      latents = jnp.asarray(latents, jnp.float32)
      if latents.shape != latent_shape:
        raise ValueError(f'latents have shape {latents.shape}; expected {latent_shape} '
                         '[B, num_frames, height/8, width/8, channels]')
    fps_value = float(fps if fps is not None else self.config.get('data', {}).get('fps', 8.0))

    # Shard the prompt batch over the mesh: pad it to a multiple of the device count.
    pad = (-b) % self.mesh.size
    input_ids = self._pad(self.tokenizer(prompts), pad)
    uncond_ids = self._pad(self.tokenizer(negatives), pad)
    latents = self._pad(latents, pad)
    fps_array = jnp.full((b + pad,), fps_value, jnp.float32)
    batch_sharding = lambda x: sharding_lib.batch_sharding(self.mesh, x.ndim)
    args = [jax.device_put(jnp.asarray(x), batch_sharding(jnp.asarray(x)))
            for x in (input_ids, uncond_ids, latents)]
    fps_array = jax.device_put(fps_array, batch_sharding(fps_array))
    static = dict(num_inference_steps=int(num_inference_steps), sampler=sampler, eta=float(eta),
                  do_cfg=guidance_scale > 1.0,
                  use_fps=bool(self.config.model.unet.get('fps_embedding', False)),
                  show_progress=self.verbose)
    dynamic = (self.params, *args, loop_key, fps_array, jnp.float32(guidance_scale))
    compiled = self._compile(('denoise', tuple(args[2].shape), tuple(sorted(static.items()))),
                             lambda: self._denoise.lower(*dynamic, **static))
    self._steps_done, self._steps_total, self._t_start = 0, num_inference_steps, time.time()
    z0 = compiled(*dynamic)
    z0 = jax.block_until_ready(z0)
    self._log(f'denoised {num_inference_steps} steps ({sampler}) in {time.time() - self._t_start:.1f} s')
    if output_type == 'latent':
      return np.asarray(z0)[:b]
    decode = self._compile(('decode', tuple(z0.shape)), lambda: self._decode.lower(self.params, z0))
    t0 = time.time()
    frames = np.asarray(jax.block_until_ready(decode(self.params, z0)))[:b]
    self._log(f'decoded {b * num_frames} frames in {time.time() - t0:.1f} s')
    if output_type == 'float':
      return frames
    return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)

  # ------------------------------------------------------------------------------------------------
  # Helpers.

  def _negatives(self, negative_prompt, batch: int) -> List[str]:
    if negative_prompt is None:
      return [''] * batch  # As diffusers: the empty prompt is the unconditional one.
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) == 1:
      negatives = negatives * batch
    if len(negatives) != batch:
      raise ValueError(f'{len(negatives)} negative prompts for {batch} prompts')
    return negatives

  def _check_call(self, num_frames, height, width, steps, sampler, output_type, eta):
    if self.max_frames is not None and not 1 <= num_frames <= self.max_frames:
      raise ValueError(f'num_frames={num_frames}: this model supports 1 to {self.max_frames} frames '
                       '(config.model.unet.num_frames)')
    if num_frames < 1:
      raise ValueError(f'num_frames={num_frames} must be >= 1')
    for name, size in (('height', height), ('width', width)):
      if size % self.vae_factor or size <= 0:
        raise ValueError(f'{name}={size} must be a positive multiple of the VAE downsampling factor '
                         f'{self.vae_factor}')
    if sampler not in diffusion.SAMPLERS:
      raise ValueError(f'unknown sampler {sampler!r}; valid: {", ".join(diffusion.SAMPLERS)}')
    if output_type not in OUTPUT_TYPES:
      raise ValueError(f'output_type={output_type!r}; valid: {", ".join(OUTPUT_TYPES)}')
    if not 1 <= steps <= self.schedule.num_train_timesteps:
      raise ValueError(f'num_inference_steps={steps} must be in [1, {self.schedule.num_train_timesteps}]')
    if eta < 0 or (eta > 0 and sampler != 'ddim'):
      raise ValueError(f'eta={eta}: must be >= 0, and > 0 only with sampler="ddim"')

  @staticmethod
  def _pad(x, pad: int):
    if not pad:
      return x
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)

  def _compile(self, cache_key, lower):
    if cache_key not in self._compiled:
      t0 = time.time()
      self._compiled[cache_key] = lower().compile()
      self._log(f'compiled {cache_key[0]} in {time.time() - t0:.1f} s')
    return self._compiled[cache_key]

  def _on_step(self, t):
    del t
    self._steps_done += 1
    elapsed = time.time() - self._t_start
    print(f'\r  denoising step {self._steps_done}/{self._steps_total} ({elapsed:.1f} s)', end='',
          file=sys.stderr, flush=True)
    if self._steps_done == self._steps_total:
      print('', file=sys.stderr, flush=True)

  def _log(self, message: str) -> None:
    logging.info(message)
    if self.verbose:
      print(message, file=sys.stderr, flush=True)
