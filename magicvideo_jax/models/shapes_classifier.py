"""A small (2+1)D-conv video classifier of moving_shapes clips: the feature network of FVD-shapes.

`[B, 16, 32, 32, 3]` RGB in [-1, 1] -> `(features [B, embed_dim], logits)` where logits is a dict of
'colour' [B, 7], 'shape' [B, 4] and 'motion' [B, 5] (the dataset's labels, three softmax heads).

2x2 patches (16x16x16x12), then three (2+1)D blocks: a 3x3 spatial convolution, a 3-tap temporal
one, LayerNorm + ReLU (channels 24, 48, 96; spatial strides 1, 2, 2, temporal 1, 2, 2: -> 4x4x4), a
global mean over time and space, one dense layer (ReLU) whose output is the feature vector
(penultimate layer), and the three linear heads. 135k parameters. Pure module, no batch statistics.

Trained by `python -m magicvideo_jax.eval.train_shapes_classifier`; used by `magicvideo_jax.eval.fvd`.
"""

import json
import os
from typing import Dict, Sequence, Tuple

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_np

from magicvideo_jax.data import moving_shapes

HEADS: Tuple[Tuple[str, int], ...] = (('colour', len(moving_shapes.COLOUR_NAMES)),
                                      ('shape', len(moving_shapes.SHAPES)),
                                      ('motion', len(moving_shapes.MOTIONS)))
NUM_FRAMES = 16
RESOLUTION = 32


class ShapesClassifier(nn.Module):
  """See the module docstring."""
  channels: Sequence[int] = (24, 48, 96)
  spatial_strides: Sequence[int] = (1, 2, 2)
  temporal_strides: Sequence[int] = (1, 2, 2)
  embed_dim: int = 128

  @nn.compact
  def __call__(self, videos: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    x = jnp.asarray(videos, jnp.float32)
    b, t, h, w, c = x.shape
    # 2x2 patches: a matmul, cheaper than a full-resolution convolution on CPU.
    x = x.reshape(b, t, h // 2, 2, w // 2, 2, c).transpose(0, 1, 2, 4, 3, 5, 6)
    x = x.reshape(b, t, h // 2, w // 2, 4 * c)
    for i, (width, ss, ts) in enumerate(zip(self.channels, self.spatial_strides,
                                            self.temporal_strides)):
      # (2+1)D: XLA's CPU 3D convolutions (their gradients above all) are ~10x slower than 2D ones.
      b, t, h, w, c = x.shape
      x = nn.Conv(width, (3, 3), strides=ss, padding='SAME', name=f'spatial{i}')(
          x.reshape(b * t, h, w, c))
      _, h, w, _ = x.shape
      x = x.reshape(b, t, h, w, width).transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, width)
      x = nn.Conv(width, (3,), strides=ts, padding='SAME', name=f'temporal{i}')(x)
      t = x.shape[1]
      x = x.reshape(b, h, w, t, width).transpose(0, 3, 1, 2, 4)
      # LayerNorm per position: a norm over the whole clip (GroupNorm) followed by the global mean
      # made the features nearly blind to pixel noise.
      x = nn.relu(nn.LayerNorm(name=f'norm{i}')(x))
    x = x.mean(axis=(1, 2, 3))
    features = nn.relu(nn.Dense(self.embed_dim, name='embed')(x))
    logits = {name: nn.Dense(n, name=f'head_{name}')(features) for name, n in HEADS}
    return features, logits


def to_model_input(videos: jax.Array) -> jax.Array:
  """uint8 [0, 255] or floats already in [-1, 1] -> float32 in [-1, 1]."""
  if videos.dtype == jnp.uint8:
    return jnp.asarray(videos, jnp.float32) / 127.5 - 1
  return jnp.asarray(videos, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Storage: `model.safetensors` (params flattened with '/') and `config.json` (the module's fields).

PARAMS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'


def save(folder: str, model: ShapesClassifier, params) -> None:
  os.makedirs(folder, exist_ok=True)
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/').items()}
  safetensors_np.save_file(flat, os.path.join(folder, PARAMS_FILE))
  config = dict(channels=list(model.channels), spatial_strides=list(model.spatial_strides),
                temporal_strides=list(model.temporal_strides),
                embed_dim=model.embed_dim)
  with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=1)


def load(folder: str) -> Tuple[ShapesClassifier, Dict]:
  """(module, params) of a folder written by `save`."""
  path = os.path.join(folder, PARAMS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: {folder} is not a shapes classifier folder')
  with open(os.path.join(folder, CONFIG_FILE)) as f:
    config = json.load(f)
  model = ShapesClassifier(channels=tuple(config['channels']),
                           spatial_strides=tuple(config['spatial_strides']),
                           temporal_strides=tuple(config['temporal_strides']),
                           embed_dim=int(config['embed_dim']))
  params = traverse_util.unflatten_dict(safetensors_np.load_file(path), sep='/')
  return model, params
