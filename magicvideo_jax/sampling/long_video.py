"""Videos longer than the model's clip: window by window (`pipe(..., long_video='causal')`).

'causal': the first window is an ordinary sample of `max_frames` frames; every next window starts
from the last `overlap` latent frames of the video so far, given as known frames (the pipeline's
`known_latents`: each denoising step sees them noised to its level), and adds `max_frames - overlap`
new ones. MagicVideo's directed temporal attention fits this: a frame attends only to the frames
before it, so the given frames lead and the new ones follow, as they did in training. Windows use
consecutive seeds; every window is one call of the same compiled sampler. The latents are decoded
window by window (the VideoVAE's temporal decoder was trained on clips of the model's length).

'freenoise' (FreeNoise, Qiu et al., ICLR 2024, arXiv 2310.15169): the whole video is denoised at
once. Its initial noise is rescheduled (`reschedule_noise`: each block of `stride` frames past the
first window repeats, shuffled, the noise of the block one window earlier, so every window starts
from a permutation of noise the model saw as a clip), and every denoising step runs the U-Net on
overlapping windows of the model's length, `stride = max_frames - overlap` frames apart, averaging
each frame's predictions with triangular weights (`fuse_windows`). FreeNoise fuses inside every
temporal attention layer; fusing the U-Net's output instead keeps each window's frame indices (the
frame adaptors' rows, the temporal positions) those of a training clip.
"""

import functools

from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

import numpy as np

from magicvideo_jax.sampling import request as request_lib

METHODS = ('causal', 'freenoise')


def windows(num_frames: int, window: int, overlap: int) -> int:
  """How many windows of `window` frames, each sharing `overlap` with the previous, cover
  `num_frames`."""
  if num_frames <= window:
    return 1
  return 1 + -(-(num_frames - window) // (window - overlap))


def window_starts(num_frames: int, length: int, stride: int) -> Tuple[int, ...]:
  """First frames of the windows of `length` frames, `stride` apart, the last one ending at the
  last frame, that cover `num_frames` frames."""
  if num_frames <= length:
    return (0,)
  starts = list(range(0, num_frames - length + 1, stride))
  if starts[-1] != num_frames - length:
    starts.append(num_frames - length)
  return tuple(starts)


@functools.lru_cache(maxsize=None)
def _window_layout(num_frames: int, length: int, stride: int):
  """(frame indices `[K, length]`, per-frame weights `[length]`, 1 / total weight per frame `[N]`)."""
  starts = np.asarray(window_starts(num_frames, length, stride))
  index = starts[:, None] + np.arange(length)
  # Triangular: a frame near a window's middle counts more than one near its edges.
  weights = np.minimum(np.arange(1, length + 1), np.arange(length, 0, -1)).astype(np.float32)
  total = np.zeros(num_frames, np.float32)
  np.add.at(total, index, np.broadcast_to(weights, index.shape))
  return index, weights, 1.0 / total


def fuse_windows(fn: Callable[..., jax.Array], x: jax.Array, length: int, stride: int) -> jax.Array:
  """`fn` on overlapping windows of `x` `[B, N, ...]` fused back to `[B, N, ...]`.

  `fn(windows, repeat)` gets the windows as a batch `[B K, length, ...]` (video-major) and `repeat`,
  which turns a per-video array `[B, ...]` (timesteps, text context) into the windows' `[B K, ...]`.
  Each frame's output is the weighted mean of its outputs in the windows holding it.
  """
  b, n = x.shape[:2]
  index, weights, inverse_total = _window_layout(n, length, stride)
  k = index.shape[0]
  windows = x[:, index].reshape((b * k, length) + x.shape[2:])
  repeat = lambda a: None if a is None else jnp.repeat(a, k, axis=0)
  out = fn(windows, repeat).astype(jnp.float32).reshape((b, k, length) + x.shape[2:])
  shape = (1, 1, length) + (1,) * (x.ndim - 2)
  fused = jnp.zeros((b, n) + x.shape[2:], jnp.float32).at[:, index].add(
      out * weights.reshape(shape))
  return fused * inverse_total.reshape((1, n) + (1,) * (x.ndim - 2))


def reschedule_noise(key: jax.Array, noise: jax.Array, length: int, stride: int) -> jax.Array:
  """FreeNoise's initial noise: frames [i, i + stride) for i >= length are those of
  [i - length, i - length + stride), in a random order (block by block, so copies of copies)."""
  n = noise.shape[1]
  for block, start in enumerate(range(length, n, stride)):
    size = min(stride, n - start)
    source = noise[:, start - length:start - length + stride]
    order = jax.random.permutation(jax.random.fold_in(key, block), source.shape[1])[:size]
    noise = noise.at[:, start:start + size].set(source[:, order])
  return noise


def check_window(temporal_window: Any, window: Optional[int]) -> Tuple[int, int]:
  """`temporal_window` as (length, stride) after checking it; ValueError names what is wrong."""
  if window is None:
    raise ValueError('temporal_window needs a video model (config.model.unet.num_frames)')
  try:
    length, stride = (int(v) for v in temporal_window)
  except (TypeError, ValueError):
    raise ValueError(f'temporal_window={temporal_window!r} must be (length, stride)') from None
  if not 1 < length <= window or not 0 < stride < length:
    raise ValueError(f'temporal_window={temporal_window!r}: length must be in [2, {window}] (the '
                     'model makes that many frames at once) and stride in [1, length - 1]')
  return length, stride


def check(window: Optional[int], num_frames: int, overlap: Optional[int]) -> int:
  """The overlap (default window / 2) after checking the request; ValueError names the argument."""
  if window is None:
    raise ValueError('long_video needs a video model (config.model.unet.num_frames)')
  if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
    raise ValueError(f'num_frames={num_frames!r} must be a positive integer')
  overlap = window // 2 if overlap is None else overlap
  if not isinstance(overlap, (int, np.integer)) or not 0 < overlap < window:
    raise ValueError(f'long_video_overlap={overlap!r} must be an integer in [1, {window - 1}] '
                     f'(the model makes {window} frames at a time)')
  return int(overlap)


def generate(pipe, method: str, *, prompt=None, num_frames: Optional[int] = None,
             overlap: Optional[int] = None, output_type: str = 'uint8', return_dict: bool = False,
             use_video_vae: bool = True, seed: int = 0, with_stages: bool = False,
             image: Any = None, **settings) -> Any:
  """`pipe(prompt, num_frames=N, long_video=method, ...)`; `settings` are the pipeline's."""
  if method not in METHODS:
    raise ValueError(f'long_video={method!r}; valid: {", ".join(METHODS)}')
  if with_stages:
    raise ValueError("long_video: not with the cascade's stages (pass interpolate=False, "
                     'upscale=False)')
  window = pipe.max_frames
  num_frames = window if num_frames is None else num_frames
  overlap = check(window, num_frames, overlap)
  if output_type not in request_lib.OUTPUT_TYPES:
    raise ValueError(f'output_type={output_type!r}; valid: {", ".join(request_lib.OUTPUT_TYPES)}')
  if method == 'freenoise':
    latents = pipe(prompt, num_frames=num_frames, seed=seed, output_type='latent', image=image,
                   temporal_window=(window, window - overlap), **settings)
    count = 0
  else:
    latents = pipe(prompt, num_frames=window, seed=seed, output_type='latent', image=image,
                   use_video_vae=use_video_vae, **settings)
    count = windows(num_frames, window, overlap)
  for index in range(1, count):
    pipe.log(f'long video: window {index + 1}/{count}')
    new = pipe(prompt, num_frames=window, seed=seed + index, output_type='latent',
               known_latents=latents[:, -overlap:], **settings)
    latents = np.concatenate([latents, np.asarray(new)[:, overlap:]], axis=1)
  latents = latents[:, :num_frames]
  if output_type == 'latent':
    out = latents
  else:
    out = request_lib.to_output(decode(pipe, latents, window, use_video_vae), output_type)
  return pipe.output(out) if return_dict else out


def decode(pipe, latents: np.ndarray, window: int, use_video_vae: bool = True) -> np.ndarray:
  """Latents `[B, N, h, w, c]` -> frames `[B, N, H, W, 3]` in [0, 1], `window` frames at a time
  (the last chunk padded with its last frame)."""
  chunks = []
  for start in range(0, latents.shape[1], window):
    chunk = latents[:, start:start + window]
    size = chunk.shape[1]
    if size < window:
      chunk = np.concatenate([chunk, np.repeat(chunk[:, -1:], window - size, axis=1)], axis=1)
    chunks.append(pipe.decode(chunk, use_video_vae)[:, :size])
  return np.concatenate(chunks, axis=1)
