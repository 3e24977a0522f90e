"""The VDM baseline: a pixel-space factorised space-time U-Net (Ho et al. 2022, arXiv 2204.03458).

Built to the hyper-parameters of the paper's App. A "T2V large 16x64x64" model (DESIGN.md section 7)
as the FLOPs baseline of MagicVideo's "64x fewer FLOPs than VDM" claim; it is not a port of any code
(VDM's code is unpublished) and no checkpoint exists for it.

Architecture (the DDPM U-Net made 3D the VDM way):
- Every convolution is 1x3x3, i.e. a 2D conv applied to each frame (frames folded into the batch).
- Levels with channels `base_channels * channel_mult[i]`, `num_res_blocks` residual blocks per level on
  the way down, `num_res_blocks + 1` (with skip concatenation) on the way up, stride-2 conv down,
  nearest x2 + conv up, spatial only (frames are never downsampled).
- At the levels whose resolution (at the design input size `resolution`) is in `attention_resolutions`,
  every residual block is followed by spatial self-attention (over the h*w positions of each frame)
  and then temporal self-attention (over the F frames at each position), each a pre-GroupNorm residual
  block with head dim `head_dim`. The temporal attention adds a learned relative position bias, one
  scalar per head and frame offset (q - k), so it knows the order of frames but no absolute time.
  The middle block is res, attention (spatial + temporal), res.
- Conditioning: the sinusoidal timestep embedding through an MLP (width `embed_dim`) plus the text
  embedding (the text encoder's tokens `[B, L, D]`, attention-pooled to one vector and projected) is
  the conditioning vector every residual block adds. Text is not cross-attended.
- Input and output are pixels `[B, F, H, W, 3]`; the output is the predicted noise (epsilon).

`frame_mask` `[B, F]` (False = a still image appended for joint image-video training, as VDM trains)
restricts those frames' temporal attention to themselves, so they are modelled as independent images.

The call signature is the MagicVideo `UNet`'s, so the training loss and the samplers drive either
(`fps` is accepted and ignored: VDM has no frame-rate conditioning).
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from magicvideo_jax.models import layers

Dtype = Any

SPATIAL_AXES = ('batch', 'height', 'width', 'channels')  # Folded batch (b f) counts as 'batch'.


@dataclasses.dataclass(frozen=True)
class _Shared:
  """Fields every block needs."""
  head_dim: int
  norm_num_groups: int
  num_frames: int
  attention_impl: Optional[str]
  remat: bool
  dtype: Dtype
  param_dtype: Dtype

  @property
  def kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class ResBlock(nn.Module):
  """DDPM residual block on folded frames; `x` `[B*F, h, w, Cin]`, `emb` `[B*F, E]` -> `[B*F, h, w, C]`."""
  out_channels: int
  shared: _Shared

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    s = self.shared
    norm = functools.partial(layers.group_norm, num_groups=s.norm_num_groups, epsilon=1e-5, **s.kw)
    h = layers.conv(self.out_channels, name='conv1', **s.kw)(nn.silu(norm(name='norm1')(x)))
    h = h + layers.dense(self.out_channels, name='emb_proj', **s.kw)(nn.silu(emb))[:, None, None, :]
    h = nn.silu(norm(name='norm2')(h))
    # Zero-initialised last conv: a fresh block is the identity (DDPM's init).
    h = layers.conv(self.out_channels, name='conv2', zero_init=True, **s.kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, kernel_size=1, padding=0, name='skip', **s.kw)(x)
    return layers.constrain(x + h, SPATIAL_AXES)


class SelfAttention(nn.Module):
  """Multi-head self-attention with fused qkv and output projections; `[N, T, C]` -> `[N, T, C]`.

  `bias` (additive, broadcastable to `[N, heads, T, T]`) and `mask` (boolean, True = attend) go to
  the attention logits.
  """
  shared: _Shared

  @nn.compact
  def __call__(self, x: jax.Array, *, bias: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None) -> jax.Array:
    s = self.shared
    channels = x.shape[-1]
    if channels % s.head_dim:
      raise ValueError(f'attention channels {channels} must be a multiple of head_dim={s.head_dim} '
                       '(config.model.vdm.head_dim / base_channels).')
    heads = channels // s.head_dim
    qkv = layers.dense(3 * channels, name='qkv', **s.kw)(x)
    q, k, v = einops.rearrange(qkv, 'n t (three h d) -> three n t h d', three=3, h=heads)
    if bias is None:
      out = layers.dot_product_attention(q, k, v, mask=mask, implementation=s.attention_impl)
    else:
      bias = bias.astype(q.dtype)
      if mask is not None:
        bias = jnp.where(mask, bias, jnp.finfo(q.dtype).min)
      # The selector has no bias path: 'auto' / 'chunked' run jax's default here.
      impl = s.attention_impl if s.attention_impl in ('xla', 'cudnn') else None
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=impl)
    out = einops.rearrange(out, 'n t h d -> n t (h d)')
    return layers.dense(channels, name='out', zero_init=True, **s.kw)(out)


def relative_positions(frames: int) -> jax.Array:
  """`[F, F]` table index of the offset q - k, shifted to [0, 2F - 2]."""
  pos = jnp.arange(frames)
  return pos[:, None] - pos[None, :] + frames - 1


class SpaceTimeAttention(nn.Module):
  """Spatial then temporal self-attention, each residual; `x` `[B*F, h, w, C]` -> same."""
  frames: int
  shared: _Shared

  @nn.compact
  def __call__(self, x: jax.Array, frame_mask: Optional[jax.Array] = None) -> jax.Array:
    s = self.shared
    _, height, width, channels = x.shape
    norm = functools.partial(layers.group_norm, num_groups=s.norm_num_groups, epsilon=1e-5, **s.kw)

    # Spatial: the h*w positions of each frame.
    h = einops.rearrange(norm(name='spatial_norm')(x), 'n h w c -> n (h w) c')
    h = SelfAttention(s, name='spatial_attn')(h)
    x = x + einops.rearrange(h, 'n (h w) c -> n h w c', h=height)
    x = layers.constrain(x, SPATIAL_AXES)

    # Temporal: the F frames at each position, with a relative position bias per head.
    if s.num_frames < self.frames:
      raise ValueError(f'the clip has {self.frames} frames but config.model.vdm.num_frames='
                       f'{s.num_frames}: raise num_frames (the size of the relative position table).')
    heads = channels // s.head_dim
    table = self.param('temporal_relative_bias',
                       layers.partitioned(nn.initializers.zeros, ('frames', None)),
                       (2 * s.num_frames - 1, heads), s.param_dtype)
    offsets = relative_positions(self.frames) + s.num_frames - self.frames
    bias = einops.rearrange(table[offsets], 'q k h -> 1 h q k')
    mask = None
    if frame_mask is not None:  # Images attend only to themselves.
      video = frame_mask.astype(bool)
      attend = (video[:, :, None] & video[:, None, :]) | jnp.eye(self.frames, dtype=bool)[None]
      mask = jnp.repeat(attend[:, None], height * width, axis=0)  # [(b h w), 1, F, F]
    t = einops.rearrange(norm(name='temporal_norm')(x), '(b f) h w c -> (b h w) f c', f=self.frames)
    t = layers.constrain(t, ('batch', 'frames', 'channels'))
    t = SelfAttention(s, name='temporal_attn')(t, bias=bias, mask=mask)
    x = x + einops.rearrange(t, '(b h w) f c -> (b f) h w c', h=height, w=width)
    return layers.constrain(x, SPATIAL_AXES)


class AttentionPool(nn.Module):
  """Text tokens `[B, L, D]` -> one vector `[B, features]`: the mean token queries all tokens."""
  features: int
  head_dim: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = context.shape[-1]
    heads = max(dim // self.head_dim, 1)
    split = lambda t: einops.rearrange(t, 'b t (h d) -> b t h d', h=heads)
    query = jnp.mean(context, axis=1, keepdims=True)
    q = split(layers.dense(dim, name='q', **kw)(query))
    k = split(layers.dense(dim, name='k', **kw)(context))
    v = split(layers.dense(dim, name='v', **kw)(context))
    pooled = einops.rearrange(jax.nn.dot_product_attention(q, k, v), 'b 1 h d -> b (h d)')
    return layers.dense(self.features, name='proj', **kw)(pooled)


class VDMUNet(nn.Module):
  """VDM's factorised space-time U-Net over pixel videos. Fields: the keys of `config.model.vdm`."""
  in_channels: int = 3
  out_channels: int = 3
  base_channels: int = 256
  channel_mult: Sequence[int] = (1, 2, 4, 8)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (32, 16, 8)
  resolution: int = 64  # The input size `attention_resolutions` refer to.
  head_dim: int = 64
  embed_dim: int = 1024
  context_dim: int = 768
  num_frames: int = 16  # Longest clip (size of the relative position table).
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False

  def attention_levels(self) -> Sequence[bool]:
    """Whether each level has attention: its design resolution is in `attention_resolutions`."""
    return tuple(self.resolution // 2 ** i in tuple(self.attention_resolutions)
                 for i in range(len(self.channel_mult)))

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: Union[jax.Array, float, int],
               context: jax.Array, fps: Optional[jax.Array] = None,
               frame_mask: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the noise of every frame.

    Args:
      sample: noisy videos `[B, F, H, W, in_channels]` (pixels).
      timesteps: `[B]` or a scalar.
      context: text token embeddings `[B, L, context_dim]` (pooled inside).
      fps: ignored (VDM has no frame-rate conditioning; kept for the `UNet` call signature).
      frame_mask: `[B, F]` bool, False = still image (temporal attention restricted to itself).

    Returns:
      `[B, F, H, W, out_channels]`.
    """
    del fps
    batch, frames, height, width, _ = sample.shape
    levels = len(self.channel_mult)
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
      raise ValueError(f'height and width must be multiples of {factor} (2 ** (len(channel_mult) - 1)),'
                       f' got {height}x{width}.')
    if context.shape[-1] != self.context_dim:
      raise ValueError(f'context must be [B, L, context_dim={self.context_dim}], got {context.shape}.')
    shared = _Shared(self.head_dim, self.norm_num_groups, self.num_frames, self.attention_impl,
                     self.remat, self.dtype, self.param_dtype)
    kw = shared.kw
    res_cls = nn.remat(ResBlock) if self.remat else ResBlock
    attn_cls = nn.remat(SpaceTimeAttention) if self.remat else SpaceTimeAttention
    res = lambda c, name: res_cls(c, shared, name=name)
    attn = lambda name: attn_cls(frames, shared, name=name)
    channels = [self.base_channels * m for m in self.channel_mult]
    with_attention = self.attention_levels()

    # Conditioning vector: timestep MLP + pooled text, one per clip, repeated per frame.
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    emb = layers.timestep_embedding(timesteps, self.base_channels).astype(self.dtype)
    emb = layers.TimestepEmbedding(self.embed_dim, name='time_embedding', **kw)(emb)
    emb = emb + AttentionPool(self.embed_dim, self.head_dim, name='text_pool', **kw)(
        context.astype(self.dtype))
    emb = einops.repeat(emb, 'b e -> (b f) e', f=frames)

    x = einops.rearrange(sample, 'b f h w c -> (b f) h w c').astype(self.dtype)
    x = layers.constrain(x, SPATIAL_AXES)
    x = layers.conv(channels[0], name='conv_in', **kw)(x)
    skips = [x]
    for i in range(levels):
      for j in range(self.num_res_blocks):
        x = res(channels[i], f'down_{i}_res_{j}')(x, emb)
        if with_attention[i]:
          x = attn(f'down_{i}_attn_{j}')(x, frame_mask)
        skips.append(x)
      if i < levels - 1:
        x = layers.conv(channels[i], stride=2, name=f'down_{i}_downsample', **kw)(x)
        skips.append(x)

    x = res(channels[-1], 'mid_res_0')(x, emb)
    x = attn('mid_attn')(x, frame_mask)
    x = res(channels[-1], 'mid_res_1')(x, emb)

    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = res(channels[i], f'up_{i}_res_{j}')(x, emb)
        if with_attention[i]:
          x = attn(f'up_{i}_attn_{j}')(x, frame_mask)
      if i > 0:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = layers.conv(channels[i], name=f'up_{i}_upsample', **kw)(x)

    x = nn.silu(layers.group_norm(num_groups=self.norm_num_groups, epsilon=1e-5, name='norm_out',
                                  **kw)(x))
    x = layers.conv(self.out_channels, name='conv_out', zero_init=True, **kw)(x)
    return einops.rearrange(x, '(b f) h w c -> b f h w c', f=frames)


def build_vdm(model_config: Any) -> VDMUNet:
  """`VDMUNet` from a config's `model` section (`model.vdm` fields + dtypes, attention_impl, remat)."""
  return VDMUNet(**layers.config_fields(model_config.vdm), **layers.config_dtypes(model_config),
                 attention_impl=model_config.attention_impl,
                 remat=model_config.remat)
