"""CLIP text transformer (the SD 1.x text encoder), as `transformers.CLIPTextModel`, and the text
tower with its projection, as `transformers.CLIPTextModelWithProjection`.

Token + position embeddings, pre-LayerNorm encoder layers with causal self-attention, a final
LayerNorm. `CLIPTextModel` returns the last hidden state `[B, L, D]` that the U-Net cross-attends to.
`CLIPTextModelWithProjection` also pools the EOS token's final state and projects it into CLIP's joint
image-text space (`text_embeds [B, projection_dim]`, the counterpart of `clip_vision`'s
`image_embeds`). The parameter tree mirrors the PyTorch state dict
(`text_model/encoder/layers_3/self_attn/q_proj/kernel`, `text_projection/kernel`, ...), so
checkpoints convert by name (`weights.clip.load_clip_text`). `CLIPEncoder` and `embed` are shared with the
vision tower (`clip_vision`).
"""

from typing import Any, Dict, NamedTuple, Optional

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


def embed(num_embeddings: int, features: int, *, name: str, dtype: Dtype,
           param_dtype: Dtype) -> nn.Embed:
  """A lookup table with logical axes ('vocab', 'embed') (token and position embeddings of both
  CLIP towers)."""
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
    tokens = embed(self.vocab_size, self.hidden_size, name='token_embedding', **kw)(input_ids)
    positions = embed(self.max_position_embeddings, self.hidden_size, name='position_embedding',
                       **kw)(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPEncoder(nn.Module):
  """A stack of `CLIPEncoderLayer`s named `layers_i`: `[B, L, D]` -> `[B, L, D]`.

  The encoder of both CLIP towers: causal `mask` `[1, 1, L, L]` for text, None for images.
  """
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


class CLIPTextTransformer(nn.Module):
  """The body of `CLIPTextModel` (transformers' `CLIPTextTransformer`, named `text_model`).

  `input_ids [B, L]` -> last hidden state `[B, L, hidden_size]` after the final LayerNorm.
  """
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
    x = CLIPEncoder(self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                     self.num_attention_heads, self.layer_norm_eps, self.hidden_act,
                     attention_impl=self.attention_impl, name='encoder', **kw)(x, causal)
    return layers.layer_norm(epsilon=self.layer_norm_eps, name='final_layer_norm', **kw)(x)


_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
           'num_attention_heads', 'max_position_embeddings', 'layer_norm_eps', 'hidden_act',
           'dtype', 'param_dtype', 'attention_impl')


class CLIPTextModel(nn.Module):
  """CLIP text transformer. Fields are the keys of `magicvideo_jax.config.text_encoder_sd15()`.

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
    return CLIPTextTransformer(**{f: getattr(self, f) for f in _FIELDS}, name='text_model')(
        input_ids)


# ----------------------------------------------------------------------------------------------------
# The text tower with its projection (CLIP's joint image-text space).

# Architecture fields of `CLIPTextModelWithProjection`, named as in `transformers.CLIPTextConfig`.
CONFIG_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
               'num_attention_heads', 'max_position_embeddings', 'layer_norm_eps', 'hidden_act',
               'projection_dim', 'eos_token_id')


class CLIPTextOutput(NamedTuple):
  """What `CLIPTextModelWithProjection` returns (a pytree)."""
  text_embeds: jax.Array  # [B, projection_dim], not L2-normalised.
  last_hidden_state: jax.Array  # [B, L, hidden_size], after the final LayerNorm.


def eos_positions(input_ids: jax.Array, eos_token_id: Optional[int]) -> jax.Array:
  """Index of each sequence's EOS token, the one CLIP pools: `[B, L]` int -> `[B]` int32.

  As transformers: the first position holding `eos_token_id` (0 if none does), or, with
  `eos_token_id=None`, the position of the largest id (CLIP's original rule: its vocabulary ends
  with EOS; transformers applies it to configs whose `eos_token_id` is 2, an old wrong value). A
  prompt with no tokens ("") has its EOS at position 1, right after BOS.
  """
  if eos_token_id is None:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


def pool_eos(last_hidden_state: jax.Array, input_ids: jax.Array,
             eos_token_id: Optional[int]) -> jax.Array:
  """The final state of each sequence's EOS token: `[B, L, D]`, `[B, L]` -> `[B, D]`."""
  index = eos_positions(input_ids, eos_token_id)
  return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]


class CLIPTextModelWithProjection(nn.Module):
  """CLIP text tower with its projection. Fields are `CONFIG_KEYS` (transformers' names).

  `__call__(input_ids [B, L] int) -> CLIPTextOutput(text_embeds [B, projection_dim],
  last_hidden_state [B, L, hidden_size])`: `text_embeds` is `text_projection` (no bias) of the EOS
  token's final state (`eos_positions` says which token that is; `eos_token_id=None` is the legacy
  "largest id" rule). Compare text and image embeddings after `conditioning.normalize_embedding`.
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'
  projection_dim: int = 512
  eos_token_id: Optional[int] = 49407
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
    # `text_model` and `text_projection` are the roots of the transformers state dict.
    last_hidden_state = CLIPTextTransformer(**{f: getattr(self, f) for f in _FIELDS},
                                            name='text_model')(input_ids)
    pooled = pool_eos(last_hidden_state, input_ids, self.eos_token_id)
    text_embeds = layers.dense(self.projection_dim, use_bias=False, name='text_projection',
                               dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
    return CLIPTextOutput(text_embeds=text_embeds, last_hidden_state=last_hidden_state)


def abstract_params(config: Dict[str, Any], param_dtype: Dtype = jnp.float32) -> Any:
  """Unboxed `ShapeDtypeStruct`s of the params of `CLIPTextModelWithProjection(**config)`."""
  model = CLIPTextModelWithProjection(**config, param_dtype=param_dtype)
  ids = jnp.zeros((1, config['max_position_embeddings']), jnp.int32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)['params'])


