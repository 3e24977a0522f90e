"""MagicVideo's VideoVAE: the frozen SD VAE encoder and a decoder with temporal layers.

MagicVideo v2 decodes with a "VideoVAE" that removes per-frame dithering; its architecture is not
published. Decided (DESIGN.md section 2): the SD VAE encoder unchanged and frozen; the decoder is SD's,
with zero-initialised temporal layers added to its mid block and up blocks, trained on reconstruction.

Decoder layout (frames folded into the batch, `[B*F, h, w, C]`, for every 2D part):
  mid_block:     resnets_0, temporal_conv_0, attentions_0, temporal_attn, resnets_1, temporal_conv_1
  up_blocks_i:   for each j: resnets_j, temporal_conv_j, temporal_attn_j; then upsamplers_0
- `temporal_conv_*` (`temporal_conv`): residual block of two 1D convolutions over the frames, kernel 3,
  zero padding at the clip ends (as the (3, 1, 1) Conv3d of Stable Video Diffusion's decoder):
  x + conv2(silu(norm2(conv1(silu(norm1(x)))))), conv2 zero-initialised.
- `temporal_attn*` (`temporal_attention`): single-head self-attention over the F frames at each pixel
  (`'(b f) h w c -> (b h w) f c'`), bidirectional (a decoder sees the whole clip, no causality is
  needed), with a sinusoidal frame-index embedding added to q/k/v's input so that attention knows frame
  order; residual, `to_out_0` zero-initialised.
Both norms are GroupNorms whose statistics span the whole clip (frames, height, width), like the
decoder's 2D norms span the whole image.

The parameter tree is `AutoencoderKL`'s (`encoder/...`, `decoder/...`, `quant_conv`,
`post_quant_conv`, same names) plus the temporal sub-modules, whose paths contain 'temporal'
(`magicvideo_jax.weights.torch_layout.is_video_only`), so any converted SD VAE loads into it and the new layers keep
their identity init. At init, `decode_video` equals the image decoder frame by frame.

Training (`video_vae_loss`, the 'video_vae' objective): the encoder sees no gradient; the trainable
set is chosen by `config.train.trainable` (e.g. `r'^vae/decoder/.*temporal'` for the temporal layers
only, or `r'^vae/(decoder|post_quant_conv)/'` for the whole decoder). The encoder must not be in it:
`stop_gradient` zeroes its gradients, but AdamW's weight decay would still move it.
"""

from typing import Any, Optional, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from magicvideo_jax.models import layers
from magicvideo_jax.models import vae as vae_lib

Dtype = Any

_EPS = vae_lib._EPS  # The SD VAE's norm epsilon.


def _temporal_conv1d(features: int, *, name: str, zero_init: bool, dtype: Dtype,
                     param_dtype: Dtype) -> nn.Conv:
  """Kernel-3 convolution over the frame axis of `[N, F, C]`, zero padding (torch Conv3d (3, 1, 1))."""
  kernel_init = nn.initializers.zeros if zero_init else layers.default_kernel_init
  return nn.Conv(
      features, kernel_size=(3,), padding=((1, 1),), dtype=dtype, param_dtype=param_dtype,
      name=name, kernel_init=layers.partitioned(kernel_init, ('kernel_t', 'embed', 'hidden')),
      bias_init=layers.partitioned(nn.initializers.zeros, ('hidden',)))


class TemporalConvBlock(nn.Module):
  """Residual temporal convolutions on folded frames: `[B*F, h, w, C]` -> same.

  norm1 - SiLU - conv1 - norm2 - SiLU - conv2 (zero-init), each conv kernel 3 over the frames.
  """
  frames: int
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, height, width, channels = x.shape
    norm = lambda name: layers.group_norm(num_groups=self.norm_num_groups, epsilon=_EPS, name=name,
                                          **kw)
    # GroupNorm on [B, F, h, w, C] takes its statistics over the whole clip.
    h = einops.rearrange(x, '(b f) h w c -> b f h w c', f=self.frames)
    h = nn.silu(norm('norm1')(h))
    h = einops.rearrange(h, 'b f h w c -> (b h w) f c')
    h = _temporal_conv1d(channels, name='conv1', zero_init=False, **kw)(h)
    h = einops.rearrange(h, '(b h w) f c -> b f h w c', h=height, w=width)
    h = nn.silu(norm('norm2')(h))
    h = einops.rearrange(h, 'b f h w c -> (b h w) f c')
    h = _temporal_conv1d(channels, name='conv2', zero_init=True, **kw)(h)
    h = einops.rearrange(h, '(b h w) f c -> (b f) h w c', h=height, w=width)
    return x + h


class TemporalAttentionBlock(nn.Module):
  """Single-head self-attention over the frames at each pixel, residual: `[B*F, h, w, C]` -> same.

  Bidirectional (every frame attends to every frame of its clip). A sinusoidal embedding of the frame
  index is added to the normalised input of q, k and v.
  """
  frames: int
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, height, width, channels = x.shape
    h = einops.rearrange(x, '(b f) h w c -> b f h w c', f=self.frames)
    h = layers.group_norm(num_groups=self.norm_num_groups, epsilon=_EPS, name='group_norm', **kw)(h)
    position = layers.timestep_embedding(jnp.arange(self.frames), channels)  # [F, C]
    h = h + position[None, :, None, None, :].astype(h.dtype)
    h = einops.rearrange(h, 'b f h w c -> (b h w) f 1 c')  # One head of width C, as the VAE's.
    q = layers.dense(channels, name='to_q', **kw)(h)
    k = layers.dense(channels, name='to_k', **kw)(h)
    v = layers.dense(channels, name='to_v', **kw)(h)
    h = layers.dot_product_attention(q, k, v, implementation=self.attention_impl)
    h = layers.dense(channels, name='to_out_0', zero_init=True, **kw)(h)
    return x + einops.rearrange(h, '(b h w) f 1 c -> (b f) h w c', h=height, w=width)


class VideoMidBlock(nn.Module):
  """The VAE mid block with temporal layers; `[B*F, h, w, C]` -> same.

  resnets_0, temporal_conv_0, attentions_0, temporal_attn, resnets_1, temporal_conv_1.
  """
  frames: int
  norm_num_groups: int = 32
  temporal_conv: bool = True
  temporal_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(norm_num_groups=self.norm_num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]

    def temporal_conv(h, name):
      return TemporalConvBlock(self.frames, name=name, **kw)(h) if self.temporal_conv else h

    x = vae_lib.ResnetBlock(channels, name='resnets_0', **kw)(x)
    x = temporal_conv(x, 'temporal_conv_0')
    x = vae_lib.AttentionBlock(attention_impl=self.attention_impl, name='attentions_0', **kw)(x)
    if self.temporal_attention:
      x = TemporalAttentionBlock(self.frames, attention_impl=self.attention_impl,
                                 name='temporal_attn', **kw)(x)
    x = vae_lib.ResnetBlock(channels, name='resnets_1', **kw)(x)
    return temporal_conv(x, 'temporal_conv_1')


class VideoUpDecoderBlock(nn.Module):
  """`UpDecoderBlock` with temporal layers after each ResNet: `[B*F, h, w, Cin]` -> `[B*F, 2h, 2w, C]`."""
  frames: int
  out_channels: int
  num_layers: int
  add_upsample: bool
  norm_num_groups: int = 32
  temporal_conv: bool = True
  temporal_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = vae_lib.ResnetBlock(self.out_channels, self.norm_num_groups, name=f'resnets_{j}', **kw)(x)
      if self.temporal_conv:
        x = TemporalConvBlock(self.frames, self.norm_num_groups, name=f'temporal_conv_{j}', **kw)(x)
      if self.temporal_attention:
        x = TemporalAttentionBlock(self.frames, self.norm_num_groups, attention_impl=self.attention_impl,
                                   name=f'temporal_attn_{j}', **kw)(x)
    if self.add_upsample:
      x = vae_lib.Upsample(self.out_channels, name='upsamplers_0', **kw)(x)
    return x


class VideoDecoder(nn.Module):
  """`vae.Decoder` with temporal layers: latents `[B, F, h, w, latent]` -> `[B, F, H, W, out]`.

  Input is after `post_quant_conv`. Same parameter names as `vae.Decoder`, plus `*temporal*` ones.
  """
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  temporal_conv: bool = True
  temporal_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    video = dict(norm_num_groups=self.norm_num_groups, temporal_conv=self.temporal_conv,
                 temporal_attention=self.temporal_attention, attention_impl=self.attention_impl, **kw)
    groups = self.norm_num_groups
    frames = z.shape[1]
    x = einops.rearrange(z, 'b f h w c -> (b f) h w c')
    x = layers.conv(self.block_out_channels[-1], name='conv_in', **kw)(x)
    x = VideoMidBlock(frames, name='mid_block', **video)(x)
    reversed_channels = tuple(reversed(self.block_out_channels))
    last = len(reversed_channels) - 1
    for i, channels in enumerate(reversed_channels):
      x = VideoUpDecoderBlock(frames, channels, self.layers_per_block + 1, add_upsample=i < last,
                              name=f'up_blocks_{i}', **video)(x)
    x = layers.group_norm(num_groups=groups, epsilon=_EPS, name='conv_norm_out', **kw)(x)
    x = layers.conv(self.out_channels, name='conv_out', **kw)(nn.silu(x))
    return einops.rearrange(x, '(b f) h w c -> b f h w c', f=frames)


class VideoAutoencoderKL(vae_lib.AutoencoderKL):
  """SD's KL autoencoder with a temporal decoder (the VideoVAE). Fields: `AutoencoderKL`'s, plus

    num_frames: the longest clip `decode_video` accepts (the temporal layers work for any length;
      this only validates inputs).
    temporal_conv: residual kernel-3 temporal convolutions after every decoder ResNet.
    temporal_attention: temporal self-attention after the mid block's attention and after every
      up-block ResNet.

  Methods (through `model.apply(variables, x, method='...')`):
    encode(x [N, H, W, in]) -> (mean, logvar): `AutoencoderKL.encode`, unchanged.
    decode_video(z [B, F, h, w, latent]) -> [B, F, H, W, out]: unscaled latents to frames, with the
      temporal layers mixing the F frames of each clip.
    decode(z [N, h, w, latent]) -> [N, H, W, out]: each image as a one-frame clip. At init (and for
      any params whose temporal layers are at init) it equals `AutoencoderKL.decode`.
    __call__(x [N, H, W, in] or [B, F, H, W, in], key=None): encode, then decode the posterior mean
      (or a sample when `key` is given) as clips (4D input: one-frame clips). Used by `init`.
  """
  num_frames: int = 16
  temporal_conv: bool = True
  temporal_attention: bool = True

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  attention_impl=self.attention_impl, **kw)
    self.encoder = vae_lib.Encoder(self.latent_channels, name='encoder', **common)
    self.decoder = VideoDecoder(self.out_channels, temporal_conv=self.temporal_conv,
                                temporal_attention=self.temporal_attention, name='decoder', **common)
    self.quant_conv = layers.conv(2 * self.latent_channels, kernel_size=1, padding=0,
                                  name='quant_conv', **kw)
    self.post_quant_conv = layers.conv(self.latent_channels, kernel_size=1, padding=0,
                                       name='post_quant_conv', **kw)

  def decode_video(self, z: jax.Array) -> jax.Array:
    """Unscaled latents `[B, F, h, w, latent]` -> frames `[B, F, H, W, out]` (about [-1, 1])."""
    if z.ndim != 5 or z.shape[-1] != self.latent_channels:
      raise ValueError(f'decode_video expects latents [B, F, h, w, {self.latent_channels}], got '
                       f'{z.shape}; use decode() for single images [N, h, w, c].')
    if z.shape[1] > self.num_frames:
      raise ValueError(f'Clip of {z.shape[1]} frames is longer than num_frames={self.num_frames} '
                       '(config.model.video_vae.num_frames).')
    return self.decoder(self.post_quant_conv(z))

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled latents `[N, h, w, latent]` -> images `[N, H, W, out]`, each a one-frame clip."""
    return self.decode_video(z[:, None])[:, 0]

  def __call__(self, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
    clips = x if x.ndim == 5 else x[:, None]
    frames = einops.rearrange(clips, 'b f h w c -> (b f) h w c')
    mean, logvar = self.encode(frames)
    z = mean if key is None else vae_lib.diagonal_gaussian_sample(mean, logvar, key)
    out = self.decode_video(einops.rearrange(z, '(b f) h w c -> b f h w c', f=clips.shape[1]))
    return out if x.ndim == 5 else out[:, 0]


def build_video_vae(model_config: Any) -> VideoAutoencoderKL:
  """The VideoVAE of a config's `model` section: `model.vae` fields plus `model.video_vae`'s
  `num_frames`, `temporal_conv`, `temporal_attention` (defaults: config.video_vae_defaults())."""
  video = model_config.video_vae
  return VideoAutoencoderKL(**layers.config_fields(model_config.vae), num_frames=video.num_frames,
                            temporal_conv=video.temporal_conv,
                            temporal_attention=video.temporal_attention,
                            **layers.config_dtypes(model_config),
                            attention_impl=model_config.attention_impl)


