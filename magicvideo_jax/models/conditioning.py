"""Conditioning on CLIP embeddings, for MagicVideo's unsupervised pre-training.

MagicVideo first trains on unlabelled video conditioned on CLIP *image* embeddings of its frames,
then fine-tunes on text-video pairs: CLIP maps images and captions into one space, so a model
conditioned on image embeddings can be steered by text embeddings. `EmbeddingToContext` is the
bridge: it turns one projected CLIP embedding `[B, projection_dim]` (an image's `image_embeds` from
`clip_vision.CLIPVisionModelWithProjection`, or a caption's `text_embeds`, i.e. the text projection
of the EOS state as in `transformers.CLIPTextModelWithProjection`) into a short sequence of context
tokens for the U-Net. Both modalities take the same path and the same parameters.

How the U-Net consumes it: `UNet.__call__(sample, timesteps, context)` reads `context [B, L,
cross_attention_dim]` only in the key/value projections (`attn2.to_k`, `attn2.to_v`) of every
transformer block's cross-attention, so any L works. For pre-training, pass
`context = EmbeddingToContext(num_tokens, cross_attention_dim)(normalize_embedding(image_embeds))`
(`[B, num_tokens, cross_attention_dim]`; e.g. the embedding of a clip's middle frame, or the
re-normalised mean of its frames' normalised embeddings, one per clip). For fine-tuning, feed a
caption's `text_embeds` through the same module, alone or with the tokens concatenated to the
text encoder's `last_hidden_state` along L. SD 1.x's text encoder is the text tower of CLIP
ViT-L/14, whose `projection_dim` (768) equals SD's `cross_attention_dim`.
"""

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from magicvideo_jax.models import layers

Dtype = Any

# The parameters of an `EmbeddingToContext` live under this name (see its docstring).
NAME = 'embedding_to_context'


def normalize_embedding(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """L2-normalises CLIP embeddings along the last axis, as CLIP does before comparing them
  (`x / |x|`; `eps` guards an all-zero row). `[..., D]` -> `[..., D]`, same dtype."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
  return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


class EmbeddingToContext(nn.Module):
  """A projected CLIP embedding -> context tokens: LayerNorm, Dense to num_tokens * dim, reshape.

  `__call__(embeds [B, projection_dim]) -> context [B, num_tokens, cross_attention_dim]`.

  The LayerNorm makes the tokens nearly independent of the embedding's scale, so raw and
  L2-normalised embeddings of either modality (whose norms differ) land in the same range. An
  all-zero embedding (the condition dropped, for classifier-free guidance) gives a learned constant
  context. Unless given another `name`, the module names itself `embedding_to_context` inside its
  parent, so its parameters sit at `.../embedding_to_context/{norm,proj}/...`; they exist in no
  image checkpoint. A top-level `init` returns `{'norm', 'proj'}`: keep that tree under the key
  `NAME`.
  """
  num_tokens: int = 4
  cross_attention_dim: int = 768
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.name is None:  # A fixed name instead of Linen's automatic `EmbeddingToContext_0`.
      object.__setattr__(self, 'name', NAME)
    super().__post_init__()

  @nn.compact
  def __call__(self, embeds: jax.Array) -> jax.Array:
    if embeds.ndim != 2:
      raise ValueError(f'embeds must be [B, projection_dim], got shape {tuple(embeds.shape)}.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.layer_norm(epsilon=self.layer_norm_eps, name='norm', **kw)(embeds)
    x = layers.dense(self.num_tokens * self.cross_attention_dim, name='proj', **kw)(x)
    return einops.rearrange(x, 'b (n d) -> b n d', n=self.num_tokens)
