"""Building blocks shared by every model: partitioned Dense/Conv/norms, attention, embeddings.

Conventions (followed by every module in `magicvideo_jax.models`):
- Activations are channels-last. Parameters carry logical axis names; the mapping of logical names
  to mesh axes lives in the config (`config.sharding.logical_axis_rules`).
- Submodule names mirror the PyTorch (diffusers / transformers) module paths, with `.N` list indices
  written `_N` (`down_blocks.0.resnets.1.conv1` -> `down_blocks_0/resnets_1/conv1`), so that
  `magicvideo_jax.convert` maps checkpoints by name alone.
- `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters.

Logical parameter axes:
  'embed'     input features of a Dense / Conv
  'hidden'    output features of a Dense / Conv (sharded over 'fsdp' by default)
  'vocab'     token and position tables
  'frames'    the frame axis of per-frame adaptor parameters
  'norm'      scales and biases of normalisation layers
  'kernel_h', 'kernel_w'  spatial taps of a convolution
Logical activation axes: 'batch', 'frames', 'height', 'width', 'channels', 'length'.
"""

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from magicvideo_jax.models import attention as attention_lib

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.lecun_normal()


def partitioned(init: Initializer, axes: Tuple[Optional[str], ...]) -> Initializer:
  """An initializer whose parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, axes)


def dense(features: int, *, name: str, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, use_bias: bool = True, zero_init: bool = False,
          kernel_axes: Tuple[Optional[str], Optional[str]] = ('embed', 'hidden')) -> nn.Dense:
  """`nn.Dense` whose kernel carries logical axes (default ('embed', 'hidden'))."""
  kernel_init = nn.initializers.zeros if zero_init else default_kernel_init
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=partitioned(kernel_init, kernel_axes),
      bias_init=partitioned(nn.initializers.zeros, (kernel_axes[-1],)))


def conv(features: int, *, name: str, kernel_size: int = 3, stride: int = 1, padding: Any = 1,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         zero_init: bool = False) -> nn.Conv:
  """2D convolution over `[N, H, W, C]` with PyTorch-style explicit padding.

  `padding` is an int (symmetric, as `torch.nn.Conv2d`) or ((top, bottom), (left, right)), e.g. the
  asymmetric ((0, 1), (0, 1)) the SD VAE uses before its strided convolutions.
  """
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  kernel_init = nn.initializers.zeros if zero_init else default_kernel_init
  return nn.Conv(
      features, kernel_size=(kernel_size, kernel_size), strides=(stride, stride),
      padding=padding, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=partitioned(kernel_init, ('kernel_h', 'kernel_w', 'embed', 'hidden')),
      bias_init=partitioned(nn.initializers.zeros, ('hidden',)))


def group_norm(*, name: str, num_groups: int = 32, epsilon: float = 1e-6,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm over `[N, ..., C]`; Flax computes the statistics in float32 whatever `dtype`."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=partitioned(nn.initializers.ones, ('norm',)),
      bias_init=partitioned(nn.initializers.zeros, ('norm',)))


def layer_norm(*, name: str, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm over the last axis; statistics in float32."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=partitioned(nn.initializers.ones, ('norm',)),
      bias_init=partitioned(nn.initializers.zeros, ('norm',)))


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    implementation: Optional[str] = None,
) -> jax.Array:
  """The single attention entry point of the project.

  Args:
    query: `[B, Tq, N, D]`; key, value: `[B, Tk, N, D]`.
    mask: optional boolean, broadcastable to `[B, N, Tq, Tk]`; True = attend.
    is_causal: query i attends to keys <= i (no mask materialised where the kernel supports it).
    implementation: None or 'xla' (XLA), 'cudnn' (fused flash attention on GPU where it can run),
      'chunked' (query-chunked, memory-bounded) or 'auto' (picked per call); see
      `magicvideo_jax.models.attention`.

  Returns:
    `[B, Tq, N, D]`.
  """
  return attention_lib.attention(query, key, value, mask=mask, is_causal=is_causal,
                             implementation=implementation)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
  """Sinusoidal embedding of `timesteps` `[B]` -> `[B, dim]` (diffusers' `get_timestep_embedding`)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """Linear -> SiLU -> Linear, named as diffusers' `TimestepEmbedding`.

  `zero_init_output`: the last Linear starts at zero, so a newly added embedding adds nothing.
  """
  features: int
  zero_init_output: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name='linear_1')(x)
    x = nn.silu(x)
    return dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name='linear_2',
                 zero_init=self.zero_init_output)(x)


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
  """Logical sharding constraint on an activation at a block boundary (no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


# ----------------------------------------------------------------------------------------------------
# Config sections -> module fields.


def config_fields(section: Any) -> Dict[str, Any]:
  """ConfigDict -> module kwargs with lists turned into tuples (Linen fields must be hashable)."""
  items = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in items.items()}


def config_dtypes(model_config: Any) -> Dict[str, Any]:
  return dict(
      dtype=jnp.dtype(model_config.dtype),
      param_dtype=jnp.dtype(model_config.param_dtype),
  )
