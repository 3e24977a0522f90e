"""Videos longer than the model's clip: window by window (`pipe(..., long_video='causal')`).

'causal': the first window is an ordinary sample of `max_frames` frames; every next window starts
from the last `overlap` latent frames of the video so far, given as known frames (the pipeline's
`known_latents`: each denoising step sees them noised to its level), and adds `max_frames - overlap`
new ones. MagicVideo's directed temporal attention fits this: a frame attends only to the frames
before it, so the given frames lead and the new ones follow, as they did in training. Windows use
consecutive seeds; every window is one call of the same compiled sampler. The latents are decoded
window by window (the VideoVAE's temporal decoder was trained on clips of the model's length).
"""

from typing import Any, Optional

import numpy as np

from magicvideo_jax.sampling import request as request_lib

METHODS = ('causal',)


def windows(num_frames: int, window: int, overlap: int) -> int:
  """How many windows of `window` frames, each sharing `overlap` with the previous, cover
  `num_frames`."""
  if num_frames <= window:
    return 1
  return 1 + -(-(num_frames - window) // (window - overlap))


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
