"""CLIP vision transformer with its projection, as `transformers.CLIPVisionModelWithProjection`.

Patch embedding (a strided conv without bias), a learned class token, position embeddings,
`pre_layrnorm` (sic: transformers' name), the pre-LN encoder layers of the text tower (bidirectional
here), then `post_layernorm` of the class token and `visual_projection` into CLIP's joint image-text
space. Used for MagicVideo's unsupervised pre-training: unlabelled frames are conditioned on their
CLIP image embeddings, which live in the same space as the text embeddings that replace them when
fine-tuning on captions.

The parameter tree mirrors the PyTorch state dict, so weights convert by name (`weights.clip.load_clip_vision`):
`vision_model/encoder/layers_3/self_attn/q_proj/kernel`, `visual_projection/kernel`, ...
"""

from typing import Any, Dict, NamedTuple, Tuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magicvideo_jax.models import layers
from magicvideo_jax.models import text_encoder

Dtype = Any

# CLIP's image normalisation (`CLIPImageProcessor` image_mean / image_std), RGB.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The architecture fields, named as in `transformers.CLIPVisionConfig`.
CONFIG_KEYS = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
               'num_channels', 'image_size', 'patch_size', 'projection_dim', 'layer_norm_eps',
               'hidden_act')


def vision_config_vit_l14() -> Dict[str, Any]:
  """CLIP ViT-L/14 at 224px (openai/clip-vit-large-patch14, the CLIP of SD 1.x's text encoder)."""
  return dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, num_channels=3, image_size=224, patch_size=14,
              projection_dim=768, layer_norm_eps=1e-5, hidden_act='quick_gelu')


class CLIPVisionOutput(NamedTuple):
  """What `CLIPVisionModelWithProjection` returns (a pytree)."""
  image_embeds: jax.Array  # [B, projection_dim], not L2-normalised.
  # [B, 1 + (image_size // patch_size)**2, hidden_size], the class token first.
  last_hidden_state: jax.Array


class _CLIPVisionEmbeddings(nn.Module):
  """[class token; patch_embedding(pixels)] + position_embedding.

  `[B, H, W, C]` -> `[B, 1 + P, D]`, P = (image_size // patch_size)**2 patches in row-major order.
  """
  hidden_size: int
  image_size: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    class_embedding = self.param(
        'class_embedding',
        layers.partitioned(nn.initializers.normal(self.hidden_size**-0.5), ('embed',)),
        (self.hidden_size,), self.param_dtype)
    # Non-overlapping patches; no bias, as CLIP. (`layers.conv` always has one.)
    patches = nn.Conv(
        self.hidden_size, kernel_size=(self.patch_size,) * 2, strides=(self.patch_size,) * 2,
        padding='VALID', use_bias=False, name='patch_embedding', **kw,
        kernel_init=layers.partitioned(layers.default_kernel_init,
                                       ('kernel_h', 'kernel_w', 'embed', 'hidden')))(pixel_values)
    patches = einops.rearrange(patches, 'b h w d -> b (h w) d')  # Row-major, as torch's flatten(2).
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype),
                           (patches.shape[0], 1, self.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    num_positions = (self.image_size // self.patch_size)**2 + 1
    positions = text_encoder.embed(
        num_positions, self.hidden_size, name='position_embedding', **kw)(jnp.arange(num_positions))
    return x + positions[None]


class CLIPVisionTransformer(nn.Module):
  """The body (transformers' `CLIPVisionModel`, named `vision_model`).

  `[B, H, W, C]` -> (last_hidden_state `[B, 1 + P, D]`, pooled output `[B, D]`).
  """
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_channels: int
  image_size: int
  patch_size: int
  layer_norm_eps: float
  hidden_act: str
  dtype: Dtype
  param_dtype: Dtype
  attention_impl: Any

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> Tuple[jax.Array, jax.Array]:
    expected = (self.image_size, self.image_size, self.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(
          f'pixel_values has shape {tuple(pixel_values.shape)}; the model expects [B, '
          f'{self.image_size}, {self.image_size}, {self.num_channels}] (image_size='
          f'{self.image_size}; resize with `clip_vision.preprocess`).')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size,
                              name='embeddings', **kw)(pixel_values)
    x = layers.layer_norm(epsilon=self.layer_norm_eps, name='pre_layrnorm', **kw)(x)
    # The text tower's encoder; no mask: every token sees every other.
    x = text_encoder.CLIPEncoder(
        self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
        self.layer_norm_eps, self.hidden_act, attention_impl=self.attention_impl, name='encoder',
        **kw)(x, None)
    pooled = layers.layer_norm(epsilon=self.layer_norm_eps, name='post_layernorm', **kw)(x[:, 0])
    return x, pooled


class CLIPVisionModelWithProjection(nn.Module):
  """CLIP image encoder. Fields are `CONFIG_KEYS` (transformers' `CLIPVisionConfig` names).

  `__call__(pixel_values [B, image_size, image_size, num_channels], CLIP-normalised (`preprocess`))
  -> CLIPVisionOutput(image_embeds [B, projection_dim], last_hidden_state [B, 1 + P, hidden_size])`
  with P = (image_size // patch_size)**2 patches. `image_embeds` are not normalised; compare them
  (and text embeddings) after `conditioning.normalize_embedding`, as CLIP does. Position embeddings
  are not interpolated: the input must be image_size x image_size.
  """
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  projection_dim: int = 512
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Any = None

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
    fields = [k for k in CONFIG_KEYS if k != 'projection_dim']
    # `vision_model` and `visual_projection` are the roots of the transformers state dict.
    last_hidden_state, pooled = CLIPVisionTransformer(
        **{f: getattr(self, f) for f in fields}, dtype=self.dtype, param_dtype=self.param_dtype,
        attention_impl=self.attention_impl, name='vision_model')(pixel_values)
    image_embeds = layers.dense(self.projection_dim, use_bias=False, name='visual_projection',
                                dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
    return CLIPVisionOutput(image_embeds=image_embeds, last_hidden_state=last_hidden_state)


def preprocess(images: Any, image_size: int = 224) -> jax.Array:
  """CLIP's image preprocessing: resize the short side, centre-crop, normalise.

  Like `CLIPImageProcessor` (bicubic resize of the shortest edge to `image_size`, centre crop,
  rescale to [0, 1], normalise with CLIP's mean/std), with JAX's antialiased bicubic instead of
  PIL's, so values differ slightly (about one uint8 step) from the PyTorch pipeline after a resize.

  Args:
    images: `[..., H, W, 3]`, uint8 in 0..255 or float in [0, 1] (e.g. frames `[B, F, H, W, 3]`).
    image_size: side of the square output (the model's `image_size`).

  Returns:
    `[..., image_size, image_size, 3]` float32, ready for `CLIPVisionModelWithProjection`.
  """
  images = jnp.asarray(images)
  x = images.astype(jnp.float32)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = x / 255.0
  *lead, h, w, c = x.shape
  if c != len(CLIP_MEAN):
    raise ValueError(f'images must be RGB [..., H, W, 3], got shape {tuple(images.shape)}.')
  x = x.reshape((-1, h, w, c))
  # The short side becomes image_size, the long one is floored, as transformers' resize does.
  if w <= h:
    new_h, new_w = int(image_size * h / w), image_size
  else:
    new_h, new_w = image_size, int(image_size * w / h)
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (x.shape[0], new_h, new_w, c), method='bicubic', antialias=True)
    x = jnp.clip(x, 0.0, 1.0)  # Bicubic overshoots; PIL clamps to the uint8 range.
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  x = (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
  return x.reshape((*lead, image_size, image_size, c))


def abstract_params(config: Dict[str, Any], param_dtype: Dtype = jnp.float32) -> Any:
  """Unboxed `ShapeDtypeStruct`s of the params of `CLIPVisionModelWithProjection(**config)`."""
  model = CLIPVisionModelWithProjection(**config, param_dtype=param_dtype)
  pixels = jnp.zeros((1, config['image_size'], config['image_size'], config['num_channels']))
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), pixels)['params'])


def count_params(params: Any) -> int:
  """Number of scalars in a (possibly abstract) params tree."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(params))))

