"""The Kinetics-400 I3D (Inflated Inception-v1, Carreira & Zisserman 2017), the network of FVD.

`[B, T, H, W, 3]` RGB in [-1, 1] -> `[B, 400]` logits (averaged over time), channels-last.

Stem: Conv3d_1a_7x7 (stride 2), max-pool (1, 3, 3)/(1, 2, 2), Conv3d_2b_1x1, Conv3d_2c_3x3, max-pool
(1, 3, 3)/(1, 2, 2); Inception modules Mixed_3b, Mixed_3c, max-pool (3, 3, 3)/2, Mixed_4b ... Mixed_4f,
max-pool (2, 2, 2)/2, Mixed_5b, Mixed_5c; average pool (2, 7, 7) with stride 1 ('VALID'), the 1x1x1
logits conv and the mean over the remaining time steps (and positions, on frames above 224). Every Unit3D is conv3d (no bias) + batch norm
(epsilon 1e-3, no scale, running statistics) + ReLU. Convolutions and max-pools use TF's 'SAME'
padding as the DeepMind / TF-Hub model: a total of max(k - s, 0) (or max(k - n % s, 0) when s does
not divide n) per axis, the larger half after; max-pools pad with -inf.

The published network needs at least 9 frames of 193 x 193 (the pooled map is then 2 x 7 x 7); on
smaller inputs the average-pool window is clipped to the map, i.e. a global average, so the network
runs on small test clips. At FVD's 16 frames of 224 x 224 the window covers the map exactly.

Parameter names mirror the PyTorch `i3d_pretrained_400` state dict, with `.` written `/`:
`Conv3d_1a_7x7/conv3d/kernel`, `Mixed_3b/b1b/bn/bias` (params), `Mixed_3b/b1b/bn/mean`, `.../var`
(batch_stats), `logits/conv3d/{kernel,bias}` (`magicvideo_jax.weights.i3d` maps the layouts).
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicvideo_jax.models import layers

Dtype = Any

NUM_CLASSES = 400
BN_EPSILON = 1e-3
POOL_WINDOW = (2, 7, 7)

# Output channels of each Inception module: b0, b1a, b1b, b2a, b2b, b3b.
INCEPTION_CHANNELS = {
    'Mixed_3b': (64, 96, 128, 16, 32, 32),
    'Mixed_3c': (128, 128, 192, 32, 96, 64),
    'Mixed_4b': (192, 96, 208, 16, 48, 64),
    'Mixed_4c': (160, 112, 224, 24, 64, 64),
    'Mixed_4d': (128, 128, 256, 24, 64, 64),
    'Mixed_4e': (112, 144, 288, 32, 64, 64),
    'Mixed_4f': (256, 160, 320, 32, 128, 128),
    'Mixed_5b': (256, 160, 320, 32, 128, 128),
    'Mixed_5c': (384, 192, 384, 48, 128, 128),
}


def max_pool_same(x: jax.Array, window: Tuple[int, int, int],
                  strides: Tuple[int, int, int]) -> jax.Array:
  """Max-pool over (T, H, W) of `[B, T, H, W, C]` with TF 'SAME' padding (-inf pads)."""
  return nn.max_pool(x, window, strides=strides, padding='SAME')


class Unit3D(nn.Module):
  """conv3d + batch norm (no scale) + ReLU: `[B, T, H, W, Cin]` -> `[B, T', H', W', features]`.

  The logits layer is a Unit3D with a bias and neither batch norm nor activation.
  """
  features: int
  kernel: Tuple[int, int, int] = (1, 1, 1)
  strides: Tuple[int, int, int] = (1, 1, 1)
  use_batch_norm: bool = True
  use_bias: bool = False
  activation: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(
        self.features, kernel_size=self.kernel, strides=self.strides, padding='SAME',
        use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name='conv3d',
        kernel_init=layers.partitioned(
            layers.default_kernel_init, ('kernel_t', 'kernel_h', 'kernel_w', 'embed', 'hidden')),
        bias_init=layers.partitioned(nn.initializers.zeros, ('hidden',)))(x)
    if self.use_batch_norm:
      x = nn.BatchNorm(
          use_running_average=True, epsilon=BN_EPSILON, use_scale=False, dtype=self.dtype,
          param_dtype=self.param_dtype, name='bn',
          bias_init=layers.partitioned(nn.initializers.zeros, ('norm',)))(x)
    return nn.relu(x) if self.activation else x


class InceptionModule(nn.Module):
  """Four branches concatenated on channels: `[B, T, H, W, Cin]` -> `[B, T, H, W, sum]`.

  b0: 1x1x1; b1a 1x1x1 -> b1b 3x3x3; b2a 1x1x1 -> b2b 3x3x3; 3x3x3 max-pool (stride 1) -> b3b 1x1x1.
  """
  channels: Sequence[int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c0, c1a, c1b, c2a, c2b, c3b = self.channels
    b0 = Unit3D(c0, name='b0', **kw)(x)
    b1 = Unit3D(c1b, (3, 3, 3), name='b1b', **kw)(Unit3D(c1a, name='b1a', **kw)(x))
    b2 = Unit3D(c2b, (3, 3, 3), name='b2b', **kw)(Unit3D(c2a, name='b2a', **kw)(x))
    b3 = Unit3D(c3b, name='b3b', **kw)(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
  """The I3D classifier: `[B, T, H, W, 3]` in [-1, 1] -> `[B, num_classes]` logits (float32).

  Apply with `{'params': ..., 'batch_stats': ...}`; batch norm always uses the running statistics.
  """
  num_classes: int = NUM_CLASSES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 5 or x.shape[-1] != 3:
      raise ValueError(f'I3D takes [B, T, H, W, 3] RGB clips, got shape {x.shape}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name='Conv3d_1a_7x7', **kw)(x)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
    x = Unit3D(64, name='Conv3d_2b_1x1', **kw)(x)
    x = Unit3D(192, (3, 3, 3), name='Conv3d_2c_3x3', **kw)(x)
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
    for name, channels in INCEPTION_CHANNELS.items():
      if name == 'Mixed_4b':
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
      elif name == 'Mixed_5b':
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
      x = InceptionModule(channels, name=name, **kw)(x)
    # Clipped to the map on inputs smaller than the published network's minimum (module docstring).
    window = tuple(min(w, n) for w, n in zip(POOL_WINDOW, x.shape[1:4]))
    x = nn.avg_pool(x, window, strides=(1, 1, 1), padding='VALID')
    x = Unit3D(self.num_classes, use_batch_norm=False, use_bias=True, activation=False,
               name='logits', **kw)(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
