"""Fréchet Video Distance: I3D (Kinetics-400) logits of two sets of videos, and their Fréchet distance.

Protocol (Unterthiner et al. 2018): clips of 16 frames, each frame resized bilinearly to 224 x 224
(half-pixel centres, no antialiasing: `torch.nn.functional.interpolate(mode='bilinear',
align_corners=False)`), values in [-1, 1], the 400 logits of `magicvideo_jax.models.i3d` as features.
FVD is then `frechet_distance` of the two feature sets (it also serves FID on other features).

    variables = fvd.load_i3d('i3d_k400.safetensors')  # python -m magicvideo_jax.weights.i3d ...
    score = fvd.frechet_distance(fvd.i3d_features(real, variables), fvd.i3d_features(fake, variables))

The Fréchet distance is computed in float64 with numpy alone.
"""

import functools
from typing import Any, Iterable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from magicvideo_jax.models import i3d
from magicvideo_jax.weights import i3d as i3d_weights

NUM_FRAMES = 16
RESOLUTION = 224


def _moments(features: np.ndarray, name: str):
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'{name}: expected features [N >= 2, D], got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name}: features contain NaN or infinity')
  return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _psd_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
  """Eigenvalues of a symmetric PSD matrix with rounding noise set to 0: those below numpy's
  `matrix_rank` tolerance (largest * size * eps), negative ones included. (Their square roots,
  ~1e-8 of the scale each, would otherwise add up on rank-deficient covariances.)"""
  tolerance = np.max(np.abs(eigenvalues), initial=0.0) * len(eigenvalues) * np.finfo(np.float64).eps
  return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix."""
  eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(_psd_eigenvalues(eigenvalues))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Fréchet distance of Gaussians fitted to two feature sets `[N_a, D]`, `[N_b, D]` (float64).

  |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b), with unbiased covariances S and
  tr sqrt(S_a S_b) = tr sqrt(sqrt(S_a) S_b sqrt(S_a)): the eigenvalues of symmetric matrices, negative
  ones (and rounding noise, `_psd_eigenvalues`) set to 0, so no complex square root is ever taken
  and N < D stays finite.
  """
  mu_a, cov_a = _moments(features_a, 'features_a')
  mu_b, cov_b = _moments(features_b, 'features_b')
  if mu_a.shape != mu_b.shape:
    raise ValueError(f'feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}')
  sqrt_a = _psd_sqrt(cov_a)
  product = sqrt_a @ cov_b @ sqrt_a
  eigenvalues = _psd_eigenvalues(np.linalg.eigvalsh((product + product.T) / 2))
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sum(np.sqrt(eigenvalues)))


def preprocess(videos: Any, num_frames: int = NUM_FRAMES, resolution: int = RESOLUTION):
  """`[B, T, H, W, 3]` uint8 in [0, 255] or floats in [-1, 1] -> `[B, T, 224, 224, 3]` float32 in [-1, 1].

  Bilinear with half-pixel centres and no antialiasing (as the module docstring); T must be
  `num_frames`.
  """
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f'expected videos [B, T, H, W, 3], got shape {videos.shape}')
  if videos.shape[1] != num_frames:
    raise ValueError(f'FVD takes clips of {num_frames} frames, got {videos.shape[1]}')
  if videos.dtype == jnp.uint8:
    x = jnp.asarray(videos, jnp.float32) / 127.5 - 1
  else:
    x = jnp.asarray(videos, jnp.float32)
  batch, frames = x.shape[:2]
  return jax.image.resize(x, (batch, frames, resolution, resolution, 3), method='linear',
                          antialias=False)


@functools.lru_cache(maxsize=None)
def _logits_fn(num_frames: int, resolution: int):
  """Jitted `(variables, videos) -> logits [B, 400]`, built on first use (keeps imports light)."""
  model = i3d.InceptionI3d()
  return jax.jit(lambda variables, videos: model.apply(
      variables, preprocess(videos, num_frames, resolution)))


def _check_range(batch: np.ndarray) -> None:
  if batch.dtype != np.uint8 and batch.size and (batch.min() < -1.001 or batch.max() > 1.001):
    raise ValueError(f'float videos must lie in [-1, 1], got [{batch.min():.3g}, {batch.max():.3g}]')


def i3d_features(videos: Union[np.ndarray, Iterable[np.ndarray]], variables: Mapping[str, Any],
                 batch_size: int = 8, num_frames: int = NUM_FRAMES,
                 resolution: int = RESOLUTION) -> np.ndarray:
  """I3D logits `[N, 400]` (float32) of videos `[N, T, H, W, 3]` (or an iterable of such batches).

  Batches are padded to `batch_size` so that one program is compiled per frame size.
  """
  batches = [videos] if isinstance(videos, np.ndarray) else videos
  out = []
  for batch in batches:
    batch = np.asarray(batch)
    _check_range(batch)
    for start in range(0, len(batch), batch_size):
      chunk = batch[start:start + batch_size]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
      logits = _logits_fn(num_frames, resolution)(variables, padded)
      out.append(np.asarray(logits)[:len(chunk)])
  if not out:
    raise ValueError('no videos given')
  return np.concatenate(out)


def load_i3d(path: str) -> Mapping[str, Any]:
  """I3D variables from safetensors (ours or the PyTorch layout; `magicvideo_jax.weights.i3d`)."""
  return i3d_weights.load_variables(path)
