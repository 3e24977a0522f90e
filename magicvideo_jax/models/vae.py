"""The SD 1.x VAE, as `diffusers.AutoencoderKL`, channels-last.

Encoder: conv_in, down blocks (ResNets + stride-2 conv), mid block (ResNet, single-head attention,
ResNet), GroupNorm-SiLU-conv_out to 2 x latent channels, then quant_conv; the result is split into the
mean and log-variance of a diagonal Gaussian. Decoder: post_quant_conv (in `AutoencoderKL`), conv_in,
mid block, up blocks (layers_per_block + 1 ResNets + nearest x2 upsample and conv), GroupNorm-SiLU-conv_out.

Latents are *unscaled*: callers multiply by `scaling_factor` (0.18215) before diffusion and divide
after. The `Decoder` is a module of its own so the VideoVAE can reuse it on `[B*F]` frames.
Parameter names mirror the diffusers state dict (`encoder/down_blocks_0/resnets_1/conv1/kernel`,
`encoder/mid_block/attentions_0/to_out_0/kernel`, `quant_conv/kernel`, ...).
"""

from typing import Any, Optional, Sequence, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from magicvideo_jax.models import layers

Dtype = Any

# diffusers builds every VAE norm with this epsilon (`resnet_eps=1e-6`).
_EPS = 1e-6


def diagonal_gaussian_sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """A sample `mean + exp(logvar / 2) * eps` of the posterior; same shape as `mean`."""
  noise = jax.random.normal(key, mean.shape, dtype=jnp.float32).astype(mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * noise


class ResnetBlock(nn.Module):
  """diffusers' `ResnetBlock2D` without time embedding: `[N, H, W, Cin]` -> `[N, H, W, Cout]`."""
  out_channels: int
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.group_norm(num_groups=self.norm_num_groups, epsilon=_EPS, name='norm1', **kw)(x)
    h = layers.conv(self.out_channels, name='conv1', **kw)(nn.silu(h))
    h = layers.group_norm(num_groups=self.norm_num_groups, epsilon=_EPS, name='norm2', **kw)(h)
    h = layers.conv(self.out_channels, name='conv2', **kw)(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, kernel_size=1, padding=0, name='conv_shortcut', **kw)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head spatial self-attention with a residual (diffusers' VAE `Attention`).

  `[N, H, W, C]` -> `[N, H, W, C]`: GroupNorm, to_q/to_k/to_v over the H*W positions, to_out_0.
  """
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, height, width, channels = x.shape
    h = layers.group_norm(num_groups=self.norm_num_groups, epsilon=_EPS, name='group_norm', **kw)(x)
    h = einops.rearrange(h, 'n h w c -> n (h w) 1 c')  # One head of width C.
    q = layers.dense(channels, name='to_q', **kw)(h)
    k = layers.dense(channels, name='to_k', **kw)(h)
    v = layers.dense(channels, name='to_v', **kw)(h)
    h = layers.dot_product_attention(q, k, v, implementation=self.attention_impl)
    h = einops.rearrange(h, 'n (h w) 1 c -> n h w c', h=height, w=width)
    return x + layers.dense(channels, name='to_out_0', **kw)(h)


class MidBlock(nn.Module):
  """diffusers' `UNetMidBlock2D` of the VAE: ResNet, attention, ResNet (channels unchanged)."""
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    x = ResnetBlock(channels, name='resnets_0', **kw)(x)
    x = AttentionBlock(attention_impl=self.attention_impl, name='attentions_0', **kw)(x)
    return ResnetBlock(channels, name='resnets_1', **kw)(x)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after a (0, 1, 0, 1) zero pad, as diffusers' `Downsample2D(padding=0)`."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv(self.out_channels, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name='conv')(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv, as diffusers' `Upsample2D`."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='conv')(x)


class DownEncoderBlock(nn.Module):
  """`num_layers` ResNets, then (unless last) a Downsample: `[N, H, W, Cin]` -> `[N, H/2, W/2, C]`."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.norm_num_groups, name=f'resnets_{i}', **kw)(x)
    if self.add_downsample:
      x = Downsample(self.out_channels, name='downsamplers_0', **kw)(x)
    return x


class UpDecoderBlock(nn.Module):
  """`num_layers` ResNets, then (unless last) an Upsample: `[N, H, W, Cin]` -> `[N, 2H, 2W, C]`."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.norm_num_groups, name=f'resnets_{i}', **kw)(x)
    if self.add_upsample:
      x = Upsample(self.out_channels, name='upsamplers_0', **kw)(x)
    return x


class Encoder(nn.Module):
  """Image `[N, H, W, in]` -> Gaussian moments `[N, H/f, W/f, 2 * latent_channels]`, f = 2^(levels-1).

  The output is before `quant_conv` (which belongs to `AutoencoderKL`, as in diffusers).
  """
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups = self.norm_num_groups
    x = layers.conv(self.block_out_channels[0], name='conv_in', **kw)(x)
    last = len(self.block_out_channels) - 1
    for i, channels in enumerate(self.block_out_channels):
      x = DownEncoderBlock(channels, self.layers_per_block, add_downsample=i < last,
                           norm_num_groups=groups, name=f'down_blocks_{i}', **kw)(x)
    x = MidBlock(groups, attention_impl=self.attention_impl, name='mid_block', **kw)(x)
    x = layers.group_norm(num_groups=groups, epsilon=_EPS, name='conv_norm_out', **kw)(x)
    return layers.conv(2 * self.latent_channels, name='conv_out', **kw)(nn.silu(x))


class Decoder(nn.Module):
  """Latent `[N, h, w, latent]` (after `post_quant_conv`) -> image `[N, h*f, w*f, out_channels]`.

  Frames are independent: a video decoder calls this on `[B*F, h, w, latent]`.
  """
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups = self.norm_num_groups
    x = layers.conv(self.block_out_channels[-1], name='conv_in', **kw)(z)
    x = MidBlock(groups, attention_impl=self.attention_impl, name='mid_block', **kw)(x)
    reversed_channels = tuple(reversed(self.block_out_channels))
    last = len(reversed_channels) - 1
    for i, channels in enumerate(reversed_channels):
      x = UpDecoderBlock(channels, self.layers_per_block + 1, add_upsample=i < last,
                         norm_num_groups=groups, name=f'up_blocks_{i}', **kw)(x)
    x = layers.group_norm(num_groups=groups, epsilon=_EPS, name='conv_norm_out', **kw)(x)
    return layers.conv(self.out_channels, name='conv_out', **kw)(nn.silu(x))


class AutoencoderKL(nn.Module):
  """SD's KL autoencoder. Fields are the keys of `magicvideo_jax.config.vae_sd15()`.

  Methods (call through `model.apply(variables, x, method='encode')` etc.):
    encode(x [N, H, W, in] in [-1, 1]) -> (mean, logvar), each [N, H/8, W/8, latent] at SD sizes.
    decode(z [N, h, w, latent]) -> x [N, 8h, 8w, out].
    __call__(x, key=None): encode then decode the posterior mean, or a posterior sample when a PRNG
      `key` is given. Used by `init`.
  Latents are unscaled; `scaling_factor` is kept for callers.
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  attention_impl=self.attention_impl, **kw)
    self.encoder = Encoder(self.latent_channels, name='encoder', **common)
    self.decoder = Decoder(self.out_channels, name='decoder', **common)
    self.quant_conv = layers.conv(2 * self.latent_channels, kernel_size=1, padding=0,
                                  name='quant_conv', **kw)
    self.post_quant_conv = layers.conv(self.latent_channels, kernel_size=1, padding=0,
                                       name='post_quant_conv', **kw)

  def encode(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """`[N, H, W, in]` -> (mean, logvar) of the posterior, each `[N, h, w, latent]`."""
    if x.shape[-1] != self.in_channels:
      raise ValueError(f'Expected images [N, H, W, {self.in_channels}] (channels-last), got '
                       f'{x.shape}.')
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)  # The clip diffusers applies.

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents `[N, h, w, latent]` -> images `[N, H, W, out]` (about [-1, 1])."""
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
    mean, logvar = self.encode(x)
    z = mean if key is None else diagonal_gaussian_sample(mean, logvar, key)
    return self.decode(z)
