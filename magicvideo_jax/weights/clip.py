"""CLIP weights from transformers folders: one tower with its projection, or the dual encoder.

The text tower (`CLIPTextModelWithProjection`), the vision tower (`CLIPVisionModelWithProjection`) and
the dual encoder (`CLIPModel`, or one of our folders holding `params['clip']`) load from safetensors;
their transformers config.json becomes our config (`models.text_encoder.CONFIG_KEYS`,
`models.clip_vision.CONFIG_KEYS`, `config.model.clip`).
"""

import json
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from magicvideo_jax.models import clip as clip_lib
from magicvideo_jax.models import clip_vision
from magicvideo_jax.models import text_encoder
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights.torch_layout import (ConversionError, load_safetensors_folder,
                                                 state_dict_to_params)

Dtype = Any


def load_clip_tower(folder: str, *, weights_prefix: str, projection: str, model_class: str,
                    read_config, abstract_params) -> Tuple[Dict[str, Any], Any]:
  """(config, params) of one CLIP tower with its projection from a transformers folder.

  The folder holds `{model_class}WithProjection` or a whole `CLIPModel`, whose tensors under
  `weights_prefix` (e.g. 'text_model.') and `projection` (e.g. 'text_projection') are selected.
  `read_config(config.json dict)` gives our config, `abstract_params(config)` the target tree.
  """
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config.json in {folder}: expected a transformers CLIPModel or '
                            f'{model_class}WithProjection folder (save_pretrained).')
  with open(path) as f:
    config = read_config(json.load(f))
  state = {k: v for k, v in load_safetensors_folder(folder).items()
           if k.startswith((weights_prefix, projection + '.'))}
  if not any(k.startswith(projection + '.') for k in state):
    raise ConversionError(
        f'{folder} has no `{projection}.weight`: embeddings need a CLIPModel or '
        f'{model_class}WithProjection checkpoint (a bare {model_class} stops before the projection).')
  try:
    params = state_dict_to_params(state, abstract_params(config))
  except ConversionError as e:
    raise ConversionError(f'{folder}: {e}') from None
  return config, params


# `transformers.CLIPTextConfig` defaults: config.json files may leave them out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                              num_hidden_layers=12, num_attention_heads=8,
                              max_position_embeddings=77, layer_norm_eps=1e-5,
                              hidden_act='quick_gelu', projection_dim=512, eos_token_id=49407)


def text_config_from_transformers(cfg: Dict[str, Any]) -> Dict[str, Any]:
  """Our config (`text_encoder.CONFIG_KEYS`) from a transformers config.json: a `CLIPTextModelWithProjection`'s
  (`model_type` 'clip_text_model') or a `CLIPModel`'s (its `text_config`, with the top-level
  `projection_dim` that sizes `text_projection`). `eos_token_id` 2 becomes None (the legacy
  largest-id pooling that transformers applies to such configs)."""
  text = dict(cfg.get('text_config') or cfg)
  if 'text_config' in cfg and 'projection_dim' in cfg:
    text['projection_dim'] = cfg['projection_dim']
  out = {k: text.get(k, TEXT_DEFAULTS[k]) for k in text_encoder.CONFIG_KEYS}
  if out['eos_token_id'] == 2:
    out['eos_token_id'] = None
  if out['hidden_act'] not in ('quick_gelu', 'gelu'):
    raise ConversionError(f"hidden_act={out['hidden_act']!r} is not supported "
                                  "(only 'quick_gelu' and 'gelu').")
  return out


def load_clip_text(folder: str, param_dtype: Dtype = jnp.float32) -> Tuple[Dict[str, Any], Any]:
  """(config, params) of a transformers CLIP folder (config.json + *.safetensors).

  The folder holds a `CLIPTextModelWithProjection`, or a whole `CLIPModel` whose `text_model.*` and
  `text_projection.*` tensors are selected (the vision tower and `logit_scale` are skipped).
  `CLIPTextModelWithProjection(**config, param_dtype=param_dtype).apply({'params': params}, ids)`
  then runs it; params are numpy arrays.

  Raises:
    FileNotFoundError: no folder or no config.json.
    ConversionError: the folder has no text projection (e.g. a bare `CLIPTextModel`), or a tensor
      is missing, unexpected or mis-shaped (named in the message).
  """
  return load_clip_tower(
      folder, weights_prefix='text_model.', projection='text_projection',
      model_class='CLIPTextModel', read_config=text_config_from_transformers,
      abstract_params=lambda config: text_encoder.abstract_params(config, param_dtype))


# `transformers.CLIPVisionConfig` defaults: config.json files may leave them out.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                              projection_dim=512, layer_norm_eps=1e-5, hidden_act='quick_gelu')


def vision_config_from_transformers(cfg: Dict[str, Any]) -> Dict[str, Any]:
  """Our config (`clip_vision.CONFIG_KEYS`) from a transformers config.json: a `CLIPVisionModelWithProjection`'s
  (`model_type` 'clip_vision_model') or a `CLIPModel`'s (its `vision_config`, with the top-level
  `projection_dim` that sizes `visual_projection`)."""
  vision = dict(cfg.get('vision_config') or cfg)
  if 'vision_config' in cfg and 'projection_dim' in cfg:
    vision['projection_dim'] = cfg['projection_dim']
  out = {k: vision.get(k, VISION_DEFAULTS[k]) for k in clip_vision.CONFIG_KEYS}
  if out['hidden_act'] not in ('quick_gelu', 'gelu'):
    raise ConversionError(f"hidden_act={out['hidden_act']!r} is not supported "
                                  "(only 'quick_gelu' and 'gelu').")
  return out


def load_clip_vision(folder: str, param_dtype: Dtype = jnp.float32) -> Tuple[Dict[str, Any], Any]:
  """(config, params) of a transformers CLIP folder (config.json + *.safetensors).

  The folder holds a `CLIPVisionModelWithProjection`, or a whole `CLIPModel` whose `vision_model.*`
  and `visual_projection.*` tensors are selected (the text tower and `logit_scale` are skipped).
  `CLIPVisionModelWithProjection(**config, param_dtype=param_dtype).apply({'params': params}, x)`
  then runs it; params are numpy arrays.

  Raises:
    FileNotFoundError: no folder or no config.json.
    ConversionError: the folder has no vision projection (e.g. a bare `CLIPVisionModel`), or a
      tensor is missing, unexpected or mis-shaped (named in the message).
  """
  return load_clip_tower(
      folder, weights_prefix='vision_model.', projection='visual_projection',
      model_class='CLIPVisionModel', read_config=vision_config_from_transformers,
      abstract_params=lambda config: clip_vision.abstract_params(config, param_dtype))


def clip_config_from_transformers(cfg: Dict[str, Any]) -> Dict[str, Any]:
  """`config.model.clip` from a transformers `CLIPModel` config.json."""
  if 'text_config' not in cfg or 'vision_config' not in cfg:
    raise ConversionError('a CLIP dual encoder needs a transformers CLIPModel config.json '
                                  '(with text_config and vision_config).')
  text = text_config_from_transformers(cfg)
  vision = vision_config_from_transformers(cfg)
  if text['projection_dim'] != vision['projection_dim']:
    raise ConversionError(f'projection_dim differs between the towers: {text} / {vision}')
  return dict(text={k: text[k] for k in clip_lib.TEXT_KEYS}, vision={k: vision[k] for k in clip_lib.VISION_KEYS},
              projection_dim=int(text['projection_dim']),
              logit_scale_init_value=float(cfg.get('logit_scale_init_value', clip_lib.LOGIT_SCALE_INIT)))


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
  candidate = ckpt_lib.model_folder(folder)
  if candidate is not None:
    config = ckpt_lib.load_config(candidate)
    if not config.model.clip:
      raise ConversionError(
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
  state = load_safetensors_folder(folder)
  if 'logit_scale' not in state:
    raise ConversionError(f'{folder}: no `logit_scale` tensor: not a CLIPModel checkpoint.')
  logit_scale = np.asarray(state.pop('logit_scale'), np.float32).reshape(())
  template = dict(clip_lib.abstract_params(clip_config))
  template.pop('logit_scale')
  try:
    params = state_dict_to_params(state, template)
  except ConversionError as e:
    raise ConversionError(f'{folder}: {e}') from None
  params['logit_scale'] = logit_scale
  return clip_config, params
