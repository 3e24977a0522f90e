"""CLIP text transformer (the SD 1.x text encoder), as `transformers.CLIPTextModel`.

Token + position embeddings, pre-LayerNorm encoder layers with causal self-attention, a final
LayerNorm. The output is the last hidden state `[B, L, D]` that the U-Net cross-attends to; the pooled
(EOS) output is not computed. The parameter tree mirrors the PyTorch state dict
(`text_model/encoder/layers_3/self_attn/q_proj/kernel`, ...), so checkpoints convert by name.
"""

from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from magicvideo_jax.models import layers

Dtype = Any


def activation(name: str):
  """The activation `hidden_act` names, as in `transformers.activations.ACT2FN`."""
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)  # transformers' 'gelu' is the exact erf GELU.
  raise ValueError(f"hidden_act must be 'quick_gelu' or 'gelu', got {name!r}.")


def _embed(num_embeddings: int, features: int, *, name: str, dtype: Dtype,
           param_dtype: Dtype) -> nn.Embed:
  """A lookup table with logical axes ('vocab', 'embed')."""
  return nn.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype, name=name,
      embedding_init=layers.partitioned(nn.initializers.normal(0.02), ('vocab', 'embed')))


class CLIPAttention(nn.Module):
  """Multi-head self-attention with q/k/v/out projections; `[B, L, D]` -> `[B, L, D]`."""
  hidden_size: int
  num_attention_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    split = lambda t: einops.rearrange(t, 'b l (n d) -> b l n d', n=self.num_attention_heads)
    q = split(layers.dense(self.hidden_size, name='q_proj', **kw)(x))
    k = split(layers.dense(self.hidden_size, name='k_proj', **kw)(x))
    v = split(layers.dense(self.hidden_size, name='v_proj', **kw)(x))
    out = layers.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    out = einops.rearrange(out, 'b l n d -> b l (n d)')
    return layers.dense(self.hidden_size, name='out_proj', **kw)(out)


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2."""
  hidden_size: int
  intermediate_size: int
  hidden_act: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.dense(self.intermediate_size, name='fc1', **kw)(x)
    x = activation(self.hidden_act)(x)
    return layers.dense(self.hidden_size, name='fc2', **kw)(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(epsilon=self.layer_norm_eps, name='layer_norm1', **kw)(x)
    x = x + CLIPAttention(self.hidden_size, self.num_attention_heads,
                          attention_impl=self.attention_impl, name='self_attn', **kw)(h, mask)
    h = layers.layer_norm(epsilon=self.layer_norm_eps, name='layer_norm2', **kw)(x)
    return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act,
                       name='mlp', **kw)(h)


class _CLIPTextEmbeddings(nn.Module):
  """token_embedding(ids) + position_embedding(0..L-1): `[B, L]` -> `[B, L, D]`."""
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = _embed(self.vocab_size, self.hidden_size, name='token_embedding', **kw)(input_ids)
    positions = _embed(self.max_position_embeddings, self.hidden_size, name='position_embedding',
                       **kw)(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class _CLIPEncoder(nn.Module):
  """A stack of `CLIPEncoderLayer`s named `layers_i`."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  layer_norm_eps: float
  hidden_act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(
          self.hidden_size, self.intermediate_size, self.num_attention_heads, self.layer_norm_eps,
          self.hidden_act, dtype=self.dtype, param_dtype=self.param_dtype,
          attention_impl=self.attention_impl, name=f'layers_{i}')(x, mask)
    return x


class _CLIPTextTransformer(nn.Module):
  """The body of `CLIPTextModel` (transformers' `CLIPTextTransformer`, named `text_model`)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int
  layer_norm_eps: float
  hidden_act: str
  dtype: Dtype
  param_dtype: Dtype
  attention_impl: Optional[str]

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[-1]
    if length > self.max_position_embeddings:
      raise ValueError(f'input_ids has {length} tokens; the model supports at most '
                       f'max_position_embeddings={self.max_position_embeddings}.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                            name='embeddings', **kw)(input_ids)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]  # [1, 1, L, L]
    x = _CLIPEncoder(self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                     self.num_attention_heads, self.layer_norm_eps, self.hidden_act,
                     attention_impl=self.attention_impl, name='encoder', **kw)(x, causal)
    return layers.layer_norm(epsilon=self.layer_norm_eps, name='final_layer_norm', **kw)(x)


_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
           'num_attention_heads', 'max_position_embeddings', 'layer_norm_eps', 'hidden_act',
           'dtype', 'param_dtype', 'attention_impl')


class CLIPTextModel(nn.Module):
  """CLIP text transformer. Fields are the keys of `configs.common.text_encoder_sd15()`.

  `__call__(input_ids [B, L] int) -> last_hidden_state [B, L, hidden_size]` (after the final
  LayerNorm), with L <= max_position_embeddings. Attention is causal, as in CLIP; padding tokens are
  attended to like any other (SD pads prompts to 77 tokens and uses every position).
  """
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    # Everything lives under `text_model`, the root of the transformers state dict.
    return _CLIPTextTransformer(**{f: getattr(self, f) for f in _FIELDS}, name='text_model')(
        input_ids)
