"""CLIP dual encoder, as `transformers.CLIPModel`, and its contrastive objective.

A text tower with projection (`text_encoder`) and a vision tower with projection (`clip_vision`)
map captions and images into one space; `logit_scale` is CLIP's learned inverse temperature (log).
MagicVideo's unsupervised pre-training conditions the video U-Net on the image embeddings of
unlabelled frames and later on the text embeddings of captions (`magicvideo_jax/context.py`); this
module is the frozen encoder behind both, either imported from a transformers `CLIPModel` folder or
trained here with the 'clip' objective (`losses.clip_loss`).

The parameter tree mirrors the transformers state dict (`text_model/...`, `vision_model/...`,
`text_projection/kernel`, `visual_projection/kernel`, `logit_scale`), so weights convert by name. In
a training state and in exported folders it lives under `params['clip']`, its architecture under
`config.model.clip`:

  clip:
    text:    text_encoder.CONFIG_KEYS without projection_dim (vocab_size, ..., eos_token_id)
    vision:  clip_vision.CONFIG_KEYS without projection_dim (hidden_size, ..., image_size, patch_size)
    projection_dim, logit_scale_init_value
"""

from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from magicvideo_jax.models import clip_vision
from magicvideo_jax.models import layers
from magicvideo_jax.models import text_encoder

Dtype = Any

TEXT_KEYS = tuple(k for k in text_encoder.CONFIG_KEYS if k != 'projection_dim')
VISION_KEYS = tuple(k for k in clip_vision.CONFIG_KEYS if k != 'projection_dim')
LOGIT_SCALE_INIT = 2.6592  # log(1 / 0.07), transformers' CLIPConfig default.
MAX_LOGIT_SCALE = 100.0  # CLIP clips the temperature's inverse at 100.


class CLIPOutput(NamedTuple):
  """What `CLIPModel` returns (a pytree); an embedding is None when its input was not given."""
  text_embeds: Optional[jax.Array]  # [B, projection_dim], not normalised.
  image_embeds: Optional[jax.Array]  # [B, projection_dim], not normalised.
  logit_scale: jax.Array  # [], log of the inverse temperature.


class CLIPModel(nn.Module):
  """CLIP text and vision towers with projections, and the learned temperature.

  `__call__(input_ids [B, L] int or None, pixel_values [B, S, S, C] or None) -> CLIPOutput`:
  the towers run for the inputs given (`init` needs both). `pixel_values` are CLIP-normalised
  (`clip_vision.preprocess`). `text` and `vision` are the towers' fields (`TEXT_KEYS`,
  `VISION_KEYS`) as FrozenDicts (`build_clip` makes them from a config).
  """
  text: Any
  vision: Any
  projection_dim: int = 512
  logit_scale_init_value: float = LOGIT_SCALE_INIT
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids: Optional[jax.Array] = None,
               pixel_values: Optional[jax.Array] = None) -> CLIPOutput:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
    logit_scale = self.param(
        'logit_scale', layers.partitioned(nn.initializers.constant(self.logit_scale_init_value), ()),
        (), self.param_dtype)
    text_embeds = image_embeds = None
    if input_ids is not None:
      text = dict(self.text)
      eos_token_id = text.pop('eos_token_id')
      hidden = text_encoder.CLIPTextTransformer(**text, name='text_model', **kw)(input_ids)
      pooled = text_encoder.pool_eos(hidden, input_ids, eos_token_id)
      text_embeds = layers.dense(self.projection_dim, use_bias=False, name='text_projection',
                                 dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
    if pixel_values is not None:
      _, pooled = clip_vision.CLIPVisionTransformer(**dict(self.vision), name='vision_model',
                                                    **kw)(pixel_values)
      image_embeds = layers.dense(self.projection_dim, use_bias=False, name='visual_projection',
                                  dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
    return CLIPOutput(text_embeds=text_embeds, image_embeds=image_embeds, logit_scale=logit_scale)


def _plain(section: Any) -> Dict[str, Any]:
  items = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in items.items()}


def check_config(clip_config: Any) -> None:
  """Raises a ValueError naming the `config.model.clip` key that is missing or unknown."""
  for section, keys in (('text', TEXT_KEYS), ('vision', VISION_KEYS)):
    have = set(_plain(clip_config[section]))
    if have != set(keys):
      raise ValueError(f'config.model.clip.{section} must have exactly the keys {keys}; missing '
                       f'{sorted(set(keys) - have)}, unknown {sorted(have - set(keys))}.')


def build_clip(model_config: Any) -> CLIPModel:
  """The dual encoder described by `model_config.clip`, with the model's dtypes."""
  clip = model_config.clip
  check_config(clip)
  return CLIPModel(
      text=flax.core.FrozenDict(_plain(clip.text)), vision=flax.core.FrozenDict(_plain(clip.vision)),
      projection_dim=int(clip.projection_dim),
      logit_scale_init_value=float(clip.logit_scale_init_value),
      # A model section of its own: eval/clip_zero_shot.py and abstract_params pass {clip} only.
      dtype=jnp.dtype(model_config.get('dtype', 'float32')),
      param_dtype=jnp.dtype(model_config.get('param_dtype', 'float32')),
      attention_impl=model_config.get('attention_impl', None))


def dummy_inputs(clip_config: Any) -> Tuple[jax.Array, jax.Array]:
  """(input_ids [1, L], pixel_values [1, S, S, C]) that create every parameter."""
  text, vision = clip_config['text'], clip_config['vision']
  size = vision['image_size']
  return (jnp.zeros((1, text['max_position_embeddings']), jnp.int32),
          jnp.zeros((1, size, size, vision['num_channels']), jnp.float32))


def abstract_params(clip_config: Any, param_dtype: Dtype = jnp.float32) -> Any:
  """Unboxed `ShapeDtypeStruct`s of the params of the dual encoder `clip_config` describes."""
  model = build_clip(ml_collections.ConfigDict(dict(
      clip=_to_dict(clip_config), param_dtype=jnp.dtype(param_dtype).name)))
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(clip_config))[
      'params'])


def _to_dict(clip_config: Any) -> Dict[str, Any]:
  return clip_config.to_dict() if hasattr(clip_config, 'to_dict') else dict(clip_config)


# ----------------------------------------------------------------------------------------------------
# The contrastive objective.


