"""CLIP dual encoder, as `transformers.CLIPModel`, and its contrastive objective.

A text tower with projection (`text_encoder`) and a vision tower with projection (`clip_vision`)
map captions and images into one space; `logit_scale` is CLIP's learned inverse temperature (log).
MagicVideo's unsupervised pre-training conditions the video U-Net on the image embeddings of
unlabelled frames and later on the text embeddings of captions (`magicvideo_jax/context.py`); this
module is the frozen encoder behind both, either imported from a transformers `CLIPModel` folder or
trained here with the 'clip' objective (`clip_loss`, registered in `train.LOSSES`).

The parameter tree mirrors the transformers state dict (`text_model/...`, `vision_model/...`,
`text_projection/kernel`, `visual_projection/kernel`, `logit_scale`), so weights convert by name. In
a training state and in exported folders it lives under `params['clip']`, its architecture under
`config.model.clip`:

  clip:
    text:    text_encoder.CONFIG_KEYS without projection_dim (vocab_size, ..., eos_token_id)
    vision:  clip_vision.CONFIG_KEYS without projection_dim (hidden_size, ..., image_size, patch_size)
    projection_dim, logit_scale_init_value
"""

import json
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from magicvideo_jax.models import clip_vision
from magicvideo_jax.models import conditioning
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
      logit_scale_init_value=float(clip.get('logit_scale_init_value', LOGIT_SCALE_INIT)),
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


def clip_config_from_transformers(cfg: Dict[str, Any]) -> Dict[str, Any]:
  """`config.model.clip` from a transformers `CLIPModel` config.json."""
  if 'text_config' not in cfg or 'vision_config' not in cfg:
    from magicvideo_jax.weights import convert  # pylint: disable=g-import-not-at-top
    raise convert.ConversionError('a CLIP dual encoder needs a transformers CLIPModel config.json '
                                  '(with text_config and vision_config).')
  text = text_encoder.text_config_from_transformers(cfg)
  vision = clip_vision.vision_config_from_transformers(cfg)
  if text['projection_dim'] != vision['projection_dim']:
    from magicvideo_jax.weights import convert  # pylint: disable=g-import-not-at-top
    raise convert.ConversionError(f'projection_dim differs between the towers: {text} / {vision}')
  return dict(text={k: text[k] for k in TEXT_KEYS}, vision={k: vision[k] for k in VISION_KEYS},
              projection_dim=int(text['projection_dim']),
              logit_scale_init_value=float(cfg.get('logit_scale_init_value', LOGIT_SCALE_INIT)))


def load_dual_encoder(folder: str) -> Tuple[Dict[str, Any], Any]:
  """(config.model.clip as a dict, params numpy tree) of a CLIP dual encoder folder.

  Accepts a transformers `CLIPModel` folder (config.json + *.safetensors), or one of ours holding
  `params['clip']` and `config.model.clip` (the export of a 'clip' objective run, or of a model
  trained on CLIP embeddings), or a training workdir with such an export in `model/`.

  Raises:
    FileNotFoundError: nothing loadable at `folder`.
    ConversionError: a transformers folder that is not a CLIPModel, or a tensor is missing,
      unexpected or mis-shaped; ours without a dual encoder.
  """
  from magicvideo_jax.weights import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.weights import convert  # pylint: disable=g-import-not-at-top
  for candidate in (folder, os.path.join(folder, 'model')):
    if ckpt_lib.is_pretrained_folder(candidate):
      config = ckpt_lib.load_config(candidate)
      if not config.model.get('clip'):
        raise convert.ConversionError(
            f'{candidate} holds no CLIP dual encoder (config.model.clip is not set): point '
            'config.model.conditioning.clip_dir at the export of a configs/shapes_unsupervised.py:'
            'clip run or at a transformers CLIPModel folder.')
      params = ckpt_lib.load_params(candidate)
      return config.model.clip.to_dict(), jax.tree.map(np.asarray, params['clip'])
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{folder}: no CLIP dual encoder there (expected a transformers '
                            'CLIPModel folder or a magicvideo_jax folder with config.model.clip).')
  with open(path) as f:
    clip_config = clip_config_from_transformers(json.load(f))
  state = convert.load_safetensors_folder(folder)
  if 'logit_scale' not in state:
    raise convert.ConversionError(f'{folder}: no `logit_scale` tensor: not a CLIPModel checkpoint.')
  logit_scale = np.asarray(state.pop('logit_scale'), np.float32).reshape(())
  template = dict(abstract_params(clip_config))
  template.pop('logit_scale')
  try:
    params = convert.state_dict_to_params(state, template)
  except convert.ConversionError as e:
    raise convert.ConversionError(f'{folder}: {e}') from None
  params['logit_scale'] = logit_scale
  return clip_config, params


# ----------------------------------------------------------------------------------------------------
# The contrastive objective.


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                     positives: jax.Array, valid: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Symmetric InfoNCE over a batch, with several positives per row.

  Args:
    image_embeds, text_embeds: `[B, D]` (normalised here).
    logit_scale: `[]`, log of the inverse temperature (clipped at `MAX_LOGIT_SCALE`).
    positives: bool `[B, B]`, symmetric: image i and text j match (e.g. equal captions). Row i's
      loss is -log of the softmax mass on its positives (CLIP's cross-entropy when the identity is
      the only positive), so clips that share a caption are not pushed apart.
    valid: bool `[B]`, pairs that take part (an empty caption does not).

  Returns:
    (loss, {'i2t_accuracy', 't2i_accuracy', 'temperature'}): accuracy = the row's best match is a
    positive.
  """
  image = conditioning.normalize_embedding(image_embeds.astype(jnp.float32))
  text = conditioning.normalize_embedding(text_embeds.astype(jnp.float32))
  scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), np.log(MAX_LOGIT_SCALE)))
  logits = scale * image @ text.T  # [B images, B texts]
  positives = positives & valid[:, None] & valid[None, :]
  weights = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)

  def direction(logits):
    logits = jnp.where(valid[None, :], logits, -1e9)  # Invalid columns are no candidates.
    on_positives = jnp.where(positives, logits, -1e9)
    per_row = jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(on_positives, axis=-1)
    hit = jnp.take_along_axis(positives, jnp.argmax(logits, axis=-1)[:, None], axis=-1)[:, 0]
    return jnp.sum(per_row * weights) / count, jnp.sum(hit * weights) / count

  loss_i2t, acc_i2t = direction(logits)
  loss_t2i, acc_t2i = direction(logits.T)
  return 0.5 * (loss_i2t + loss_t2i), dict(i2t_accuracy=acc_i2t, t2i_accuracy=acc_t2i,
                                           temperature=1.0 / scale)


def clip_loss(params: Dict[str, Any], batch: Dict[str, jax.Array], keys: jax.Array, *, modules,
              schedule, config: ml_collections.ConfigDict) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The 'clip' objective: contrastive loss of `params['clip']` on (one frame, caption) pairs.

  Same signature as `train.vae_loss`. Each clip of `batch['video']` `[B, F, H, W, 3]` in [-1, 1]
  contributes one frame chosen by its own key (`context.random_frames`); captions are
  `batch['input_ids']` `[B, L]`. Clips with identical captions count as positives of each other
  (a small caption vocabulary repeats captions within a batch), empty captions ("", dropped or
  uncaptioned) are left out. With gradient accumulation the negatives are those of a micro-batch.
  """
  del schedule
  from magicvideo_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  model = modules['clip']
  clip_config = config.model.clip
  frames = context_lib.random_frames(batch['video'], keys, config.data.num_frames)
  pixels = clip_vision.preprocess((frames.astype(jnp.float32) + 1.0) / 2.0,
                                  clip_config.vision.image_size)
  ids = batch['input_ids']
  out = model.apply({'params': params['clip']}, ids, pixels.astype(model.dtype))
  valid = text_encoder.eos_positions(ids, clip_config.text.eos_token_id) != 1
  positives = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
  return contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale, positives, valid)
