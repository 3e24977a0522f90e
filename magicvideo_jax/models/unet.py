"""The MagicVideo denoiser: SD 1.x's 2D U-Net applied per frame, with MagicVideo's video extensions.

The image part is diffusers' `UNet2DConditionModel` for SD 1.x (CrossAttnDownBlock2D / DownBlock2D,
UNetMidBlock2DCrossAttn, UpBlock2D / CrossAttnUpBlock2D, Transformer2DModel with one
BasicTransformerBlock). Frames are folded into the batch (`[B*F, h, w, C]`) for every 2D conv, norm and
spatial attention, so with the video extensions off it is exactly the image model applied to each frame.
The parameter tree mirrors diffusers' state dict (`down_blocks_0/attentions_1/transformer_blocks_0/attn2/
to_k/kernel`, ...), so SD checkpoints convert by name (`magicvideo_jax.convert`).

Video extensions (DESIGN.md section 2), each a field, each the identity at init:
- `frame_adaptor`: after conv1 and conv2 of every res block, frame f gets `z_f <- S_f * z_f + B_f`
  (`.../resnets_0/conv1_adaptor/{scale,bias}`, `[num_frames, C]`, S = 1, B = 0 at init).
- `temporal_attention`: in every transformer block, attention over the frames at each position
  (`.../transformer_blocks_0/temporal_norm`, `.../temporal_attn/to_{q,k,v,out_0}`, output zero-init).
  'parallel' (MagicVideo): `z <- S-Attn(z) + T-Attn(z)`, then the feed-forward. 'sequential' (LaVie):
  self-attn, cross-attn, temporal attn (with residual), feed-forward. 'none': the image model.
  `temporal_mask`: 'causal' (frame p attends to q <= p), 'causal_post_softmax' (the paper's literal form:
  softmax over all frames, then times the lower-triangular mask, rows not renormalised; note that the
  softmax normaliser still sees later frames, so this form is not strictly causal), 'none'.
  `temporal_position`: 'rope' (rotary embedding of the frame index on the first 32 dims of each head) or
  'none'.
  'animatediff' (AnimateDiff's motion modules, diffusers' `UNetMotionModel` layout): the transformer
  blocks stay the image ones; a `MotionModule` follows every res block (+ attention) of the down and up
  levels (`down_blocks_0/motion_modules_1/...`) and, with `use_motion_mid_block`, the mid block's
  attention (`mid_block/motion_modules_0`). Each is GroupNorm over the clip, proj_in, transformer
  blocks of two temporal self-attentions (sinusoidal frame positions up to `motion_max_seq_length`)
  and a feed-forward, proj_out (zero-init) and a residual. `temporal_mask` applies ('none' is
  AnimateDiff's own); `temporal_position` must be 'none' (the positions are the sinusoidal table).
- `fps_embedding`: sinusoidal embedding of the clip's frame rate -> Linear-SiLU-Linear (last one zero-init)
  added to the timestep embedding (`fps_embedding/linear_{1,2}`).

`frame_mask` `[B, F]` (True = video frame) marks appended still images for joint image-video training:
they bypass the adaptors, the fps embedding and the temporal layers (in both directions), i.e. they go
through the image model.

Options of diffusers' U-Net used by the SD x4 upscaler (off by default, so SD 1.x models are unchanged):
- `num_class_embeds`: a `class_embedding` table `[num_class_embeds, 4 * C0]` whose row `class_labels[b]`
  is added to the timestep embedding (the upscaler feeds the noise level of its low-res input).
- `only_cross_attention` (one bool, or one per level): `attn1` attends to the text context instead of
  the image tokens (its to_k / to_v read `cross_attention_dim` features). The mid block never does, as
  diffusers' `UNetMidBlock2DCrossAttn`.
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Tuple, Union

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from magicvideo_jax.models import layers

Dtype = Any

TEMPORAL_ATTENTION = ('parallel', 'sequential', 'animatediff', 'none')
TEMPORAL_MASK = ('causal', 'causal_post_softmax', 'none')
TEMPORAL_POSITION = ('rope', 'none')
ROPE_DIMS = 32  # LaVie: rotary embedding on the first 32 dims of a head.

SPATIAL_AXES = ('batch', 'height', 'width', 'channels')  # Folded batch (b f) counts as 'batch'.
TOKEN_AXES = ('batch', 'length', 'channels')


# ------------------------------------------------------------------------------------------------
# Temporal attention helpers.
# ------------------------------------------------------------------------------------------------


def apply_rope(x: jax.Array, positions: jax.Array, rot_dims: int = ROPE_DIMS) -> jax.Array:
  """Rotary position embedding on the first `rot_dims` dims of each head (interleaved pairs).

  Follows `rotary_embedding_torch` (used by LaVie): frequencies `10000^(-2i/rot_dims)`, pairs
  (x[2i], x[2i+1]) rotated by `position * freq_i`.

  Args:
    x: `[B, T, N, D]`.
    positions: `[T]`.
    rot_dims: rotated dims per head (clipped to D, rounded down to even).

  Returns:
    `[B, T, N, D]`.
  """
  rot = min(rot_dims, x.shape[-1]) // 2 * 2
  freqs = 1.0 / (10000.0 ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, rot/2]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
  x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
  rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  rotated = einops.rearrange(rotated, '... d r -> ... (d r)').astype(x.dtype)
  return jnp.concatenate([rotated, x_pass], axis=-1)


def temporal_masks(frames: int, temporal_mask: str, frame_mask: Optional[jax.Array]
                   ) -> Tuple[Optional[jax.Array], Optional[jax.Array]]:
  """Masks of the temporal attention over `frames` frames.

  Returns:
    (attend, post): `attend` is a boolean mask broadcastable to `[B, 1, F, F]` (True = may attend), or
    None; applied before the softmax. `post` is the `[F, F]` lower-triangular matrix multiplied after the
    softmax ('causal_post_softmax'), else None. Image frames (frame_mask False) attend only to
    themselves and are attended by no other frame (their output is zeroed by the caller); keeping the
    diagonal avoids fully masked rows.
  """
  if temporal_mask not in TEMPORAL_MASK:
    raise ValueError(f'temporal_mask must be one of {TEMPORAL_MASK}, got {temporal_mask!r}.')
  tril = jnp.tril(jnp.ones((frames, frames), dtype=bool))
  causal = tril if temporal_mask == 'causal' else None
  post = tril.astype(jnp.float32) if temporal_mask == 'causal_post_softmax' else None
  if frame_mask is None:
    return (None if causal is None else causal[None, None]), post
  video = frame_mask.astype(bool)
  attend = video[:, :, None] & video[:, None, :]  # [B, Fq, Fk]
  if causal is not None:
    attend = attend & causal[None]
  attend = attend | jnp.eye(frames, dtype=bool)[None]
  return attend[:, None], post


# ------------------------------------------------------------------------------------------------
# Building blocks.
# ------------------------------------------------------------------------------------------------


class Attention(nn.Module):
  """diffusers `Attention`: to_q, to_k, to_v (no bias), to_out_0; `[B, T, C]` -> `[B, T, C]`.

  `context` `[B, L, D]` (cross-attention) defaults to `x`. `mask` is boolean, broadcastable to
  `[B, N, T, L]`. `post_mask` `[T, L]` multiplies the attention weights after the softmax (rows not
  renormalised). `positions` `[T]` switches on rotary embeddings of q and k. `is_causal`: position
  t attends to <= t, without a mask (the fused kernels skip the masked half).
  """
  heads: int
  dim_head: int
  zero_out: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *,
               mask: Optional[jax.Array] = None, post_mask: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None, is_causal: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.dim_head
    context = x if context is None else context
    split = lambda t: einops.rearrange(t, 'b t (n d) -> b t n d', n=self.heads)
    q = split(layers.dense(inner, use_bias=False, name='to_q', **kw)(x))
    k = split(layers.dense(inner, use_bias=False, name='to_k', **kw)(context))
    v = split(layers.dense(inner, use_bias=False, name='to_v', **kw)(context))
    if positions is not None:
      q, k = apply_rope(q, positions), apply_rope(k, positions)
    if post_mask is None:
      out = layers.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                         implementation=self.attention_impl)
    else:
      logits = jnp.einsum('bqnd,bknd->bnqk', q, k).astype(jnp.float32) / jnp.sqrt(self.dim_head)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      weights = (jax.nn.softmax(logits, axis=-1) * post_mask).astype(v.dtype)
      out = jnp.einsum('bnqk,bknd->bqnd', weights, v)
    out = einops.rearrange(out, 'b t n d -> b t (n d)')
    return layers.dense(x.shape[-1], name='to_out_0', zero_init=self.zero_out, **kw)(out)


class FeedForward(nn.Module):
  """diffusers `FeedForward` with GEGLU: net_0/proj -> h * gelu(gate) -> net_2."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, name='net_0', **kw)(x)
    return layers.dense(dim, name='net_2', **kw)(h)


class GEGLU(nn.Module):
  """`proj` to 2 x features, then h * gelu(gate) (torch's exact erf GELU)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(self.features * 2, name='proj', dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FrameAdaptor(nn.Module):
  """Per-frame, per-channel affine map `z_f <- S_f * z_f + B_f` on folded frames.

  `x` `[B*F, h, w, C]` -> same. Frames with `frame_mask` False pass unchanged.
  """
  num_frames: int
  frames: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frame_mask: Optional[jax.Array] = None) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', layers.partitioned(nn.initializers.ones, ('frames', 'norm')),
                       (self.num_frames, channels), self.param_dtype)
    bias = self.param('bias', layers.partitioned(nn.initializers.zeros, ('frames', 'norm')),
                      (self.num_frames, channels), self.param_dtype)
    scale = scale[None, :self.frames].astype(self.dtype)  # [1, F, C]
    bias = bias[None, :self.frames].astype(self.dtype)
    if frame_mask is not None:
      video = frame_mask.astype(bool)[:, :, None]
      scale = jnp.where(video, scale, 1)
      bias = jnp.where(video, bias, 0)
    x = einops.rearrange(x, '(b f) h w c -> b f h w c', f=self.frames)
    x = x * scale[:, :, None, None] + bias[:, :, None, None]
    return einops.rearrange(x, 'b f h w c -> (b f) h w c')


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (+ frame adaptors after conv1 and conv2).

  `x` `[B*F, h, w, Cin]`, `temb` `[B*F, T]` -> `[B*F, h, w, out_channels]`.
  """
  out_channels: int
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  frame_adaptor: bool = False
  num_frames: int = 16
  frames: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array,
               frame_mask: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(layers.group_norm, num_groups=self.norm_num_groups,
                             epsilon=self.norm_eps, **kw)

    def adapt(h, name):
      if not self.frame_adaptor:
        return h
      return FrameAdaptor(self.num_frames, self.frames, name=name, **kw)(h, frame_mask)

    h = nn.silu(norm(name='norm1')(x))
    h = adapt(layers.conv(self.out_channels, name='conv1', **kw)(h), 'conv1_adaptor')
    temb = layers.dense(self.out_channels, name='time_emb_proj', **kw)(nn.silu(temb))
    h = h + temb[:, None, None, :]
    h = nn.silu(norm(name='norm2')(h))
    h = adapt(layers.conv(self.out_channels, name='conv2', **kw)(h), 'conv2_adaptor')
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, kernel_size=1, padding=0, name='conv_shortcut', **kw)(x)
    return layers.constrain(x + h, SPATIAL_AXES)


class BasicTransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock` (+ temporal attention); `[B*F, L, C]` -> same.

  Spatial part: x + attn1(norm1(x)), then + attn2(norm2(.), context), then + ff(norm3(.)); with
  `only_cross_attention`, attn1 attends to the context too.
  Temporal part (`temporal_attention`): attention over the F frames at each of the L positions.
  """
  heads: int
  dim_head: int
  only_cross_attention: bool = False
  temporal_attention: str = 'none'
  temporal_mask: str = 'causal'
  temporal_position: str = 'none'
  frames: int = 1
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _temporal(self, x: jax.Array, frame_mask: Optional[jax.Array]) -> jax.Array:
    """Temporal self-attention of the block input `[B*F, L, C]`, without residual."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    length = x.shape[1]
    t = einops.rearrange(x, '(b f) l c -> (b l) f c', f=self.frames)
    t = layers.constrain(t, ('batch', 'frames', 'channels'))
    t = layers.layer_norm(name='temporal_norm', **kw)(t)
    attend, post = temporal_masks(self.frames, self.temporal_mask, frame_mask)
    # Plain causal (no image frames): the kernel's causal flag instead of a tril mask.
    is_causal = self.temporal_mask == 'causal' and frame_mask is None
    attend = None if is_causal else attend
    if attend is not None and attend.shape[0] > 1:
      attend = jnp.repeat(attend, length, axis=0)  # [B, 1, F, F] -> [(b l), 1, F, F]
    positions = jnp.arange(self.frames) if self.temporal_position == 'rope' else None
    t = Attention(self.heads, self.dim_head, zero_out=True, attention_impl=self.attention_impl,
                  name='temporal_attn', **kw)(t, mask=attend, post_mask=post, positions=positions,
                                                is_causal=is_causal)
    if frame_mask is not None:  # Image frames get no temporal contribution.
      t = t * jnp.repeat(frame_mask.astype(t.dtype), length, axis=0)[:, :, None]
    return einops.rearrange(t, '(b l) f c -> (b f) l c', l=length)

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               frame_mask: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = functools.partial(Attention, self.heads, self.dim_head,
                             attention_impl=self.attention_impl, **kw)
    attn1_context = context if self.only_cross_attention else None
    h = x + attn(name='attn1')(layers.layer_norm(name='norm1', **kw)(x), attn1_context)
    h = h + attn(name='attn2')(layers.layer_norm(name='norm2', **kw)(h), context)
    if self.temporal_attention == 'parallel':  # MagicVideo: S-Attn(z) + T-Attn(z).
      h = h + self._temporal(x, frame_mask)
    elif self.temporal_attention == 'sequential':  # LaVie: temporal attention after cross-attention.
      h = h + self._temporal(h, frame_mask)
    h = h + FeedForward(name='ff', **kw)(layers.layer_norm(name='norm3', **kw)(h))
    return layers.constrain(h, TOKEN_AXES)


class Transformer2DModel(nn.Module):
  """diffusers `Transformer2DModel` (continuous input, one block); `[B*F, h, w, C]` -> same."""
  heads: int
  dim_head: int
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  temporal_attention: str = 'none'
  temporal_mask: str = 'causal'
  temporal_position: str = 'none'
  frames: int = 1
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               frame_mask: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, height, width, channels = x.shape
    inner = self.heads * self.dim_head
    if self.use_linear_projection:
      project = lambda n, f: layers.dense(f, name=n, **kw)
    else:  # 1x1 convs in SD 1.x checkpoints.
      project = lambda n, f: layers.conv(f, kernel_size=1, padding=0, name=n, **kw)
    h = layers.group_norm(num_groups=self.norm_num_groups, epsilon=1e-6, name='norm', **kw)(x)
    h = project('proj_in', inner)(h)
    h = einops.rearrange(h, 'n h w c -> n (h w) c')
    h = BasicTransformerBlock(
        self.heads, self.dim_head, only_cross_attention=self.only_cross_attention,
        temporal_attention=self.temporal_attention,
        temporal_mask=self.temporal_mask, temporal_position=self.temporal_position,
        frames=self.frames, attention_impl=self.attention_impl, name='transformer_blocks_0',
        **kw)(h, context, frame_mask)
    h = einops.rearrange(h, 'n (h w) c -> n h w c', h=height, w=width)
    h = project('proj_out', channels)(h)
    return layers.constrain(h + x, SPATIAL_AXES)


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
  """AnimateDiff's frame-position table `[1, length, dim]`: sin on even dims, cos on odd ones, of
  `position * 10000^(-2i/dim)`."""
  position = jnp.arange(length, dtype=jnp.float32)[:, None]
  freqs = jnp.exp(jnp.arange(0, dim, 2, dtype=jnp.float32) * (-math.log(10000.0) / dim))
  angles = position * freqs[None]
  table = jnp.zeros((length, dim), jnp.float32)
  table = table.at[:, 0::2].set(jnp.sin(angles)).at[:, 1::2].set(jnp.cos(angles))
  return table[None]


class PositionTable(nn.Module):
  """The sinusoidal table `pe` `[1, max_length, C]` of a motion module's block.

  Kept as a parameter (diffusers stores it in the MotionAdapter state dict), so a converted table is
  used and exported bit for bit; the model reads it through `stop_gradient`, it is not learnt.
  """
  max_length: int
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, frames: int) -> jax.Array:
    init = lambda _, shape, dtype: sinusoidal_positions(shape[1], shape[2]).astype(dtype)
    table = self.param('pe', layers.partitioned(init, (None, None, None)),
                       (1, self.max_length, self.features), self.param_dtype)
    return jax.lax.stop_gradient(table[:, :frames])


class ClipGroupNorm(nn.Module):
  """GroupNorm whose statistics span the whole clip (torch's GroupNorm on `[B, C, F, h, w]`).

  `x` `[B, F, h, w, C]`; with `frame_mask` `[B, F]` the statistics are over the video frames only.
  Two-pass variance in float32, as torch.
  """
  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frame_mask: Optional[jax.Array] = None) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', layers.partitioned(nn.initializers.ones, ('norm',)), (channels,),
                       self.param_dtype)
    bias = self.param('bias', layers.partitioned(nn.initializers.zeros, ('norm',)), (channels,),
                      self.param_dtype)
    g = einops.rearrange(x.astype(jnp.float32), 'b f h w (g c) -> b f h w g c', g=self.num_groups)
    axes = (1, 2, 3, 5)
    if frame_mask is None:
      mean = g.mean(axes, keepdims=True)
      var = jnp.square(g - mean).mean(axes, keepdims=True)
    else:
      weight = frame_mask.astype(jnp.float32)[:, :, None, None, None, None]
      count = jnp.maximum(weight.sum(1, keepdims=True), 1.0) * (g.shape[2] * g.shape[3] * g.shape[5])
      mean = (g * weight).sum(axes, keepdims=True) / count
      var = (jnp.square(g - mean) * weight).sum(axes, keepdims=True) / count
    g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = einops.rearrange(g, 'b f h w g c -> b f h w (g c)')
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class MotionTransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock` as AnimateDiff configures it, over frames `[N, F, C]`:
  x + attn1(norm1(x) + pe), + attn2(norm2(.) + pe) (both self-attention), + ff(norm3(.))."""
  heads: int
  dim_head: int
  max_length: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               is_causal: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    positions = PositionTable(self.max_length, x.shape[-1], param_dtype=self.param_dtype,
                              name='pos_embed')(x.shape[1]).astype(self.dtype)
    attn = functools.partial(Attention, self.heads, self.dim_head,
                             attention_impl=self.attention_impl, **kw)
    for i in (1, 2):
      h = layers.layer_norm(name=f'norm{i}', **kw)(x) + positions
      x = x + attn(name=f'attn{i}')(h, mask=mask, is_causal=is_causal)
    return x + FeedForward(name='ff', **kw)(layers.layer_norm(name='norm3', **kw)(x))


class MotionModule(nn.Module):
  """AnimateDiff's motion module (diffusers `AnimateDiffTransformer3D`); `[B*F, h, w, C]` -> same.

  Every position attends over the clip's frames; the output projection starts at zero, so a fresh
  module is the identity. Image frames (`frame_mask` False) pass unchanged and are not attended.
  """
  heads: int
  num_layers: int
  max_length: int
  frames: int
  norm_num_groups: int = 32
  temporal_mask: str = 'none'
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, frame_mask: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    _, height, width, channels = x.shape
    t = einops.rearrange(x, '(b f) h w c -> b f h w c', f=self.frames)
    t = ClipGroupNorm(self.norm_num_groups, name='norm', **kw)(t, frame_mask)
    t = einops.rearrange(t, 'b f h w c -> (b h w) f c')
    t = layers.constrain(t, ('batch', 'frames', 'channels'))
    t = layers.dense(channels, name='proj_in', **kw)(t)
    attend, _ = temporal_masks(self.frames, self.temporal_mask, frame_mask)
    is_causal = self.temporal_mask == 'causal' and frame_mask is None
    attend = None if is_causal else attend
    if attend is not None and attend.shape[0] > 1:
      attend = jnp.repeat(attend, height * width, axis=0)  # [B, 1, F, F] -> [(b h w), 1, F, F]
    for i in range(self.num_layers):
      t = MotionTransformerBlock(self.heads, channels // self.heads, self.max_length,
                                 attention_impl=self.attention_impl,
                                 name=f'transformer_blocks_{i}', **kw)(t, attend, is_causal)
    t = layers.dense(channels, name='proj_out', zero_init=True, **kw)(t)
    t = einops.rearrange(t, '(b h w) f c -> (b f) h w c', h=height, w=width)
    if frame_mask is not None:  # Image frames get no temporal contribution.
      t = t * einops.rearrange(frame_mask, 'b f -> (b f) 1 1 1').astype(t.dtype)
    return layers.constrain(x + t, SPATIAL_AXES)


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv (padding 1), named `conv`."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.conv(x.shape[-1], stride=2, padding=1, name='conv', dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv named `conv`."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv(x.shape[-1], name='conv', dtype=self.dtype, param_dtype=self.param_dtype)(x)


REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'offload_dots')


def resolve_remat_policy(remat: bool, remat_policy: Optional[str]) -> str:
  """`model.remat_policy` if set, else 'full' for `model.remat=True` (the behaviour before the
  policy existed: keep only each block's inputs) and 'none' without remat."""
  policy = remat_policy or ('full' if remat else 'none')
  if policy not in REMAT_POLICIES:
    raise ValueError(f'remat_policy={policy!r}; valid: {REMAT_POLICIES}')
  return policy


def checkpoint_policy(policy: str):
  """`jax.checkpoint_policies` entry of a `REMAT_POLICIES` name ('full': None, save nothing)."""
  cp = jax.checkpoint_policies
  if policy == 'full':
    return None
  if policy == 'offload_dots':  # Weight-stationary dot outputs go to host memory, not recomputed.
    return cp.offload_dot_with_no_batch_dims('device', 'pinned_host')
  return getattr(cp, policy)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """The U-Net fields every level shares (norms, video extensions, dtypes, remat)."""
  norm_num_groups: int
  norm_eps: float
  use_linear_projection: bool
  num_frames: int
  frame_adaptor: bool
  temporal_attention: str
  temporal_mask: str
  temporal_position: str
  motion_max_seq_length: int
  motion_transformer_layers_per_block: int
  motion_transformer_layers_per_mid_block: int
  use_motion_mid_block: bool
  attention_impl: Optional[str]
  remat: bool
  remat_policy: Optional[str]
  dtype: Dtype
  param_dtype: Dtype

  def remat_wrap(self, cls):
    """`cls` under `nn.remat` with the policy `remat` / `remat_policy` name (or `cls` for 'none')."""
    policy = resolve_remat_policy(self.remat, self.remat_policy)
    if policy == 'none':
      return cls
    return nn.remat(cls, policy=checkpoint_policy(policy))


class UNetBlock(nn.Module):
  """One U-Net level: diffusers' (CrossAttn)DownBlock2D, (CrossAttn)UpBlock2D or the cross-attention mid
  block, depending on `kind` ('down', 'up', 'mid').

  Down: `num_layers` x (resnet [+ attention]), then an optional downsampler; returns the output and the
  skip activations. Up: `num_layers` x (concat skip, resnet [+ attention]), then an optional upsampler.
  Mid: resnet, attention, resnet. With temporal_attention='animatediff', a motion module (`motion_heads`
  heads) follows each attention (or res block without one), the mid block's before its second resnet.
  """
  kind: str
  out_channels: int
  num_layers: int
  cross_attention: bool
  resample: bool
  heads: int
  config: BlockConfig
  frames: int = 1
  only_cross_attention: bool = False
  motion_heads: int = 8

  def _motion(self, x, frame_mask, i: int):
    u = self.config
    if u.temporal_attention != 'animatediff':
      return x
    num_layers = (u.motion_transformer_layers_per_mid_block if self.kind == 'mid' else
                  u.motion_transformer_layers_per_block)
    if self.kind == 'mid' and not u.use_motion_mid_block:
      return x
    cls = u.remat_wrap(MotionModule)
    return cls(self.motion_heads, num_layers, u.motion_max_seq_length, self.frames,
               norm_num_groups=u.norm_num_groups, temporal_mask=u.temporal_mask,
               attention_impl=u.attention_impl, dtype=u.dtype, param_dtype=u.param_dtype,
               name=f'motion_modules_{i}')(x, frame_mask)

  def _resnet(self, i: int):
    u = self.config
    cls = u.remat_wrap(ResnetBlock2D)
    return cls(self.out_channels, norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps,
               frame_adaptor=u.frame_adaptor, num_frames=u.num_frames, frames=self.frames,
               dtype=u.dtype, param_dtype=u.param_dtype, name=f'resnets_{i}')

  def _attention(self, i: int):
    u = self.config
    cls = u.remat_wrap(Transformer2DModel)
    return cls(self.heads, self.out_channels // self.heads, norm_num_groups=u.norm_num_groups,
               use_linear_projection=u.use_linear_projection,
               only_cross_attention=self.only_cross_attention,
               temporal_attention=u.temporal_attention, temporal_mask=u.temporal_mask,
               temporal_position=u.temporal_position, frames=self.frames,
               attention_impl=u.attention_impl, dtype=u.dtype, param_dtype=u.param_dtype,
               name=f'attentions_{i}')

  @nn.compact
  def __call__(self, x, temb, context, frame_mask, skips: Sequence[jax.Array] = ()):
    kw = dict(dtype=self.config.dtype, param_dtype=self.config.param_dtype)
    if self.kind == 'mid':
      x = self._resnet(0)(x, temb, frame_mask)
      x = self._attention(0)(x, context, frame_mask)
      x = self._motion(x, frame_mask, 0)
      return self._resnet(1)(x, temb, frame_mask)
    if self.kind == 'down':
      outputs = []
      for i in range(self.num_layers):
        x = self._resnet(i)(x, temb, frame_mask)
        if self.cross_attention:
          x = self._attention(i)(x, context, frame_mask)
        x = self._motion(x, frame_mask, i)
        outputs.append(x)
      if self.resample:
        x = Downsample2D(name='downsamplers_0', **kw)(x)
        outputs.append(x)
      return x, tuple(outputs)
    # Up: consume the skips last-in first-out.
    skips = list(skips)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self._resnet(i)(x, temb, frame_mask)
      if self.cross_attention:
        x = self._attention(i)(x, context, frame_mask)
      x = self._motion(x, frame_mask, i)
    if self.resample:
      x = Upsample2D(name='upsamplers_0', **kw)(x)
    return x


# ------------------------------------------------------------------------------------------------
# The U-Net.
# ------------------------------------------------------------------------------------------------


_DOWN_TYPES = {'CrossAttnDownBlock2D': True, 'DownBlock2D': False}
_UP_TYPES = {'CrossAttnUpBlock2D': True, 'UpBlock2D': False}


class UNet(nn.Module):
  """SD 1.x `UNet2DConditionModel` over video latents, with MagicVideo's video extensions.

  Fields are the keys of `configs/common.unet_sd15()` (see there and the module docstring), plus the
  upscaler options `num_class_embeds` and `only_cross_attention` (set by the converter from a diffusers
  config), `dtype`, `param_dtype`, `attention_impl` (passed to `layers.dot_product_attention`) and
  `remat` (rematerialise every res block and transformer block), `remat_policy` (what the remat
  keeps: see `REMAT_POLICIES`; None = 'full' with `remat`, 'none' without).
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  down_block_types: Sequence[str] = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                                     'CrossAttnDownBlock2D', 'DownBlock2D')
  up_block_types: Sequence[str] = ('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                                   'CrossAttnUpBlock2D')
  layers_per_block: int = 2
  attention_head_dim: Union[int, Sequence[int]] = 8  # diffusers' name: the number of heads in SD 1.x.
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  use_linear_projection: bool = False
  num_class_embeds: Optional[int] = None
  only_cross_attention: Union[bool, Sequence[bool]] = False
  num_frames: int = 16
  frame_adaptor: bool = True
  temporal_attention: str = 'parallel'
  temporal_mask: str = 'causal'
  temporal_position: str = 'none'
  motion_max_seq_length: int = 32
  motion_num_attention_heads: Union[int, Sequence[int]] = 8
  motion_transformer_layers_per_block: int = 1
  motion_transformer_layers_per_mid_block: int = 1
  use_motion_mid_block: bool = True
  fps_embedding: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False
  remat_policy: Optional[str] = None

  def _check_config(self, height: int, width: int, frames: int) -> None:
    levels = len(self.block_out_channels)
    if not len(self.down_block_types) == len(self.up_block_types) == levels:
      raise ValueError('block_out_channels, down_block_types and up_block_types must have the same '
                       f'length, got {levels}, {len(self.down_block_types)}, '
                       f'{len(self.up_block_types)}.')
    for t in self.down_block_types:
      if t not in _DOWN_TYPES:
        raise ValueError(f'down_block_types: unsupported {t!r}; use one of {tuple(_DOWN_TYPES)}.')
    for t in self.up_block_types:
      if t not in _UP_TYPES:
        raise ValueError(f'up_block_types: unsupported {t!r}; use one of {tuple(_UP_TYPES)}.')
    if self.temporal_attention not in TEMPORAL_ATTENTION:
      raise ValueError(f'temporal_attention must be one of {TEMPORAL_ATTENTION}, '
                       f'got {self.temporal_attention!r}.')
    if self.temporal_mask not in TEMPORAL_MASK:
      raise ValueError(f'temporal_mask must be one of {TEMPORAL_MASK}, got {self.temporal_mask!r}.')
    if self.temporal_position not in TEMPORAL_POSITION:
      raise ValueError(f'temporal_position must be one of {TEMPORAL_POSITION}, '
                       f'got {self.temporal_position!r}.')
    if not isinstance(self.only_cross_attention, bool) and \
        len(self.only_cross_attention) != levels:
      raise ValueError(f'only_cross_attention needs one bool per level ({levels}), got '
                       f'{self.only_cross_attention!r}.')
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
      raise ValueError(f'latent height and width must be multiples of {factor} '
                       f'(2 ** (len(block_out_channels) - 1)), got {height}x{width}.')
    if self.temporal_attention == 'animatediff':
      if self.temporal_position != 'none':
        raise ValueError("temporal_attention='animatediff' has its own sinusoidal frame positions: "
                         f"temporal_position must be 'none', got {self.temporal_position!r}.")
      if frames > self.motion_max_seq_length:
        raise ValueError(f'the clip has {frames} frames but the motion modules know positions of at '
                         f'most motion_max_seq_length={self.motion_max_seq_length} frames: use fewer '
                         "frames (or long_video='causal' to sample longer clips window by window).")
      heads = self.motion_num_attention_heads
      if not isinstance(heads, int) and len(heads) != levels:
        raise ValueError(f'motion_num_attention_heads needs one int per level ({levels}), got '
                         f'{heads!r}.')
    if self.frame_adaptor and frames > self.num_frames:
      raise ValueError(f'the clip has {frames} frames but the frame adaptors support at most '
                       f'num_frames={self.num_frames}: raise the config key `num_frames` (the '
                       'adaptors of the extra frames start at identity) or use fewer frames.')

  def _heads(self, level: int) -> int:
    heads = self.attention_head_dim
    return int(heads) if isinstance(heads, int) else int(heads[level])

  def _motion_heads(self, level: int) -> int:
    heads = self.motion_num_attention_heads
    return int(heads) if isinstance(heads, int) else int(heads[level])

  def _only_cross(self, level: int) -> bool:
    only = self.only_cross_attention
    return bool(only) if isinstance(only, bool) else bool(only[level])

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: Union[jax.Array, float, int],
               context: jax.Array, fps: Optional[jax.Array] = None,
               frame_mask: Optional[jax.Array] = None,
               class_labels: Optional[jax.Array] = None) -> jax.Array:
    """Predicts the noise (or v) of every frame.

    Args:
      sample: noisy latents `[B, F, h, w, in_channels]`.
      timesteps: `[B]` (int or float) or a scalar (broadcast to the batch).
      context: text embeddings `[B, L, cross_attention_dim]`.
      fps: frame rate of each clip `[B]`, or None for no fps conditioning.
      frame_mask: `[B, F]` bool, True = video frame (default all True); False marks still images
        appended for joint image-video training: they skip the adaptors, the fps embedding and the
        temporal attention (neither attending nor attended), i.e. they go through the image model.
      class_labels: `[B]` int in [0, num_class_embeds) (or a scalar), required when `num_class_embeds`
        is set: the SD x4 upscaler's noise level of its low-res input.

    Returns:
      `[B, F, h, w, out_channels]`.
    """
    batch, frames, height, width, _ = sample.shape
    self._check_config(height, width, frames)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = tuple(self.block_out_channels)
    levels = len(channels)
    temb_dim = channels[0] * 4
    video_layers = self.frame_adaptor or self.temporal_attention != 'none' or self.fps_embedding
    if frame_mask is not None:
      if frame_mask.shape != (batch, frames):
        raise ValueError(f'frame_mask must have shape [B, F] = {(batch, frames)}, '
                         f'got {frame_mask.shape}.')
      frame_mask = frame_mask.astype(bool) if video_layers else None

    # Timestep (+ fps) embedding, one per clip, repeated per frame.
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_emb = layers.timestep_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift)
    temb = layers.TimestepEmbedding(temb_dim, name='time_embedding', **kw)(t_emb.astype(self.dtype))
    if self.num_class_embeds:
      if class_labels is None:
        raise ValueError(f'this U-Net has num_class_embeds={self.num_class_embeds}: pass '
                         '`class_labels` [B] (the SD x4 upscaler: the noise level of the low-res input).')
      labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32), (batch,))
      temb = temb + nn.Embed(
          self.num_class_embeds, temb_dim, dtype=self.dtype, param_dtype=self.param_dtype,
          embedding_init=layers.partitioned(nn.initializers.normal(1.0), ('vocab', 'embed')),
          name='class_embedding')(labels)
    temb = einops.repeat(temb, 'b t -> (b f) t', f=frames)
    if self.fps_embedding:
      fps_module = layers.TimestepEmbedding(temb_dim, zero_init_output=True, name='fps_embedding',
                                              **kw)
      if fps is not None:
        fps = jnp.broadcast_to(jnp.asarray(fps), (batch,))
        f_emb = layers.timestep_embedding(fps, channels[0], self.flip_sin_to_cos, self.freq_shift)
        f_emb = einops.repeat(fps_module(f_emb.astype(self.dtype)), 'b t -> (b f) t', f=frames)
        if frame_mask is not None:  # A still image has no frame rate.
          f_emb = f_emb * einops.rearrange(frame_mask, 'b f -> (b f) 1').astype(f_emb.dtype)
        temb = temb + f_emb
      elif self.is_mutable_collection('params'):  # Create the parameters even without fps.
        fps_module(jnp.zeros((batch, channels[0]), self.dtype))
    context = einops.repeat(context.astype(self.dtype), 'b l d -> (b f) l d', f=frames)

    x = einops.rearrange(sample, 'b f h w c -> (b f) h w c').astype(self.dtype)
    x = layers.constrain(x, SPATIAL_AXES)
    x = layers.conv(channels[0], name='conv_in', **kw)(x)

    shared = BlockConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BlockConfig)})
    block = functools.partial(UNetBlock, config=shared, frames=frames)
    skips = [x]
    for i, kind in enumerate(self.down_block_types):
      x, outputs = block('down', channels[i], self.layers_per_block, _DOWN_TYPES[kind],
                         resample=i < levels - 1, heads=self._heads(i),
                         only_cross_attention=self._only_cross(i),
                         motion_heads=self._motion_heads(i), name=f'down_blocks_{i}')(x, temb, context, frame_mask)
      skips.extend(outputs)

    x = block('mid', channels[-1], 1, True, resample=False, heads=self._heads(levels - 1),
              motion_heads=self._motion_heads(levels - 1), name='mid_block')(x, temb, context, frame_mask)

    for i, kind in enumerate(self.up_block_types):
      level = levels - 1 - i
      n = self.layers_per_block + 1
      level_skips, skips = skips[-n:], skips[:-n]
      x = block('up', channels[level], n, _UP_TYPES[kind], resample=i < levels - 1,
                heads=self._heads(level), only_cross_attention=self._only_cross(level),
                motion_heads=self._motion_heads(level), name=f'up_blocks_{i}')(
                    x, temb, context, frame_mask, level_skips)
      x = layers.constrain(x, SPATIAL_AXES)

    x = layers.group_norm(num_groups=self.norm_num_groups, epsilon=self.norm_eps,
                          name='conv_norm_out', **kw)(x)
    x = layers.conv(self.out_channels, name='conv_out', **kw)(nn.silu(x))
    return einops.rearrange(x, '(b f) h w c -> b f h w c', f=frames)


def init_video_params(model: UNet, image_params: Any, rng: jax.Array, *args, **kwargs) -> Any:
  """Video U-Net parameters from image U-Net parameters: initialises only what the image tree lacks.

  The image parameters are used as they are; the video-only ones (adaptors, temporal layers, fps
  embedding) get their init (identity at the output). Under `jax.jit` this compiles several times faster
  than a full `model.init`, which draws every image parameter too. `args`/`kwargs` are example inputs of
  `UNet.__call__` (pass `fps` to get the fps parameters; they are created either way).

  Returns:
    The full params tree (video-only leaves boxed with their logical axes, the others as given).
  """
  _, variables = model.apply({'params': image_params}, *args, rngs={'params': rng},
                             mutable=['params'], **kwargs)
  return variables['params']
