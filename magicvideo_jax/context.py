"""The U-Net's cross-attention context, as `config.model.conditioning` chooses it.

kind='text_tokens' (the default): the text encoder's last hidden state of the caption tokens,
  `[B, L, cross_attention_dim]`, as Stable Diffusion.
kind='clip_embedding': MagicVideo's unsupervised pre-training. A frozen CLIP dual encoder
  (`params['clip']`, `models/clip.py`, loaded from `conditioning.clip_dir`) embeds
    source='image'  (stage 1, unlabelled clips; captions ignored) one frame of each clip, chosen at
                    random by the example's own PRNG key;
    source='text'   (stage 2, and always when sampling from prompts) the caption: the text projection
                    of its EOS state;
  the L2-normalised embedding goes through `EmbeddingToContext` (`params['unet']
  ['embedding_to_context']`, new parameters that train with the U-Net) to `[B, num_tokens,
  cross_attention_dim]`. Both sources take the same path and parameters, so a model pre-trained on
  image embeddings is steered by text embeddings (CLIP puts both in one space).
  Stage 1 can perturb the image embedding toward where text embeddings lie (`image_noise`, LAFITE's
  h + xi * eps * |h| / |eps| on the normalised h: a random direction of norm xi), so that the text
  embeddings of stage 2 and sampling fall among what stage 1 saw, not across the modality gap.
  Classifier-free guidance: the dropped condition is the zero embedding, whose context is a learned
  constant. In stage 1 an image embedding is dropped with probability `image_dropout`; with text,
  a caption with no tokens is dropped: the input pipeline's caption dropout ("") in training, the
  empty negative prompt when sampling.

`config.model.conditioning` keys (defaults: `magicvideo_jax.config.conditioning_defaults()`):
  kind           'text_tokens' | 'clip_embedding'
  source         'image' | 'text' (clip_embedding, training only; sampling always uses text)
  num_tokens     context tokens per embedding
  clip_dir       the frozen dual encoder: a transformers CLIPModel folder, or one of ours with
                 `config.model.clip` (the export of a 'clip' objective run); copied into
                 `params['clip']` at the start of a run, its architecture into `config.model.clip`.
                 Empty: taken from `config.train.init_from` (e.g. stage 2 from stage 1's export).
  image_dropout  stage 1: probability that a clip's image embedding is the zero embedding
  image_noise    stage 1: norm xi of the random perturbation added to the normalised image embedding
                 (0: none). Cosine to the clean embedding is about 1/sqrt(1 + xi^2): xi = 0.78 puts
                 it at 0.79, e.g. the image-text cosine `benchmarks/clip_gap.py` measures.
"""

import json
import logging
import os
import re
from typing import Any, Dict

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from magicvideo_jax import config as config_lib
from magicvideo_jax.models import clip as clip_lib
from magicvideo_jax.models import clip_vision
from magicvideo_jax.models import conditioning
from magicvideo_jax.models import layers
from magicvideo_jax.models import text_encoder
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import clip as clip_weights

KINDS = ('text_tokens', 'clip_embedding')
SOURCES = ('image', 'text')
# Per-example PRNG streams derived by fold_in from the step's example keys (which the loss splits
# for latents, timesteps and noise), so adding a stream leaves those draws unchanged.
_FRAME_STREAM = 0x66726d  # 'frm'
_DROP_STREAM = 0x64726f  # 'dro'
_NOISE_STREAM = 0x6e6f69  # 'noi'


def uses_clip_embedding(model_config: Any) -> bool:
  return model_config.conditioning.kind == 'clip_embedding'


# ----------------------------------------------------------------------------------------------------
# Set-up: config, parameters.


def resolve_derived(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A filled copy of `config` (`config_lib.fill_defaults`) with the values that come from other
  folders, computed once and logged; `config` itself is not changed:
    model.vae.scaling_factor  from `train.init_from`'s checkpoint (it belongs to the VAE weights)
    model.clip                the frozen dual encoder's architecture (`prepare_config`)
  """
  config = config_lib.fill_defaults(config)
  if config.train.init_from:
    factor = ckpt_lib.load_config(config.train.init_from).model.vae.scaling_factor
    if factor != config.model.vae.scaling_factor:
      logging.info('model.vae.scaling_factor=%s from %s', factor, config.train.init_from)
      with config.unlocked():
        config.model.vae.scaling_factor = factor
  prepare_config(config)
  if uses_clip_embedding(config.model):
    logging.info('model.clip from %s', config.model.conditioning.clip_dir or config.train.init_from)
  return config_lib.fill_defaults(config)  # model.clip as set: its defaulted keys.


def prepare_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.model.conditioning` and, for 'clip_embedding', sets `config.model.clip` (the
  frozen dual encoder's architecture) from `clip_dir` or from `config.train.init_from`."""
  section = config.model.conditioning
  if section['kind'] not in KINDS:
    raise ValueError(f'config.model.conditioning.kind={section["kind"]!r}; valid: {KINDS}')
  if section['kind'] != 'clip_embedding':
    return
  if section['source'] not in SOURCES:
    raise ValueError(f'config.model.conditioning.source={section["source"]!r}; valid: {SOURCES}')
  if int(section['num_tokens']) < 1:
    raise ValueError(f'config.model.conditioning.num_tokens={section["num_tokens"]} must be >= 1')
  if not 0.0 <= float(section['image_dropout']) < 1.0:
    raise ValueError(f'config.model.conditioning.image_dropout={section["image_dropout"]} must be '
                     'in [0, 1).')
  if float(section['image_noise']) < 0.0:
    raise ValueError(f'config.model.conditioning.image_noise={section["image_noise"]} must be '
                     '>= 0.')
  if section['source'] == 'image' and config.data.precomputed_latents:
    raise ValueError("config.model.conditioning.source='image' embeds the clip's frames: it needs "
                     'pixels, not config.data.precomputed_latents=True.')
  clip_config = _dual_encoder_config(config, section)
  with config.unlocked():
    config.model.clip = ml_collections.ConfigDict(clip_config)
  length = config.model.text_encoder.max_position_embeddings  # The tokenizer pads to it.
  if config.model.clip.text.max_position_embeddings < length:
    raise ValueError(
        f'The dual encoder of {section["clip_dir"] or config.train.init_from} reads at most '
        f'{config.model.clip.text.max_position_embeddings} tokens; the tokenizer pads to '
        f'config.model.text_encoder.max_position_embeddings={length}.')
  probe = 'unet/embedding_to_context/proj/kernel'
  if not any(re.search(p, probe) for p in config.train.trainable):
    logging.warning('config.train.trainable=%s does not train %s: the new embedding-to-context '
                    'layer keeps its random init.', tuple(config.train.trainable), probe)


def _dual_encoder_config(config: ml_collections.ConfigDict, section: Any) -> Dict[str, Any]:
  if section['clip_dir']:
    return _read_dual_encoder_config(section['clip_dir'])
  init_from = config.train.init_from
  if init_from:
    inherited = ckpt_lib.load_config(init_from).model.clip
    if inherited:  # Its weights come with init_from's: they must be among those taken.
      include = tuple(config.train.init_from_include)
      if not any(re.search(p, 'clip/logit_scale') for p in include):
        raise ValueError(f'The dual encoder comes from config.train.init_from={init_from}, but '
                         f'config.train.init_from_include={include} does not take clip/: add '
                         "'^clip/' or set config.model.conditioning.clip_dir.")
      return inherited.to_dict()
  if config.model.clip:  # A config that names the architecture only: random weights.
    clip_lib.check_config(config.model.clip)
    logging.warning('config.model.clip is set but neither config.model.conditioning.clip_dir nor '
                    'config.train.init_from provides its weights: the frozen dual encoder is random.')
    return config.model.clip.to_dict()
  raise ValueError("config.model.conditioning.kind='clip_embedding' needs the frozen dual encoder: "
                   'set config.model.conditioning.clip_dir (a transformers CLIPModel folder or the '
                   'export of a configs/shapes_unsupervised.py:clip run).')


def _read_dual_encoder_config(folder: str) -> Dict[str, Any]:
  """config.model.clip of a dual encoder folder, without loading its weights."""
  candidate = ckpt_lib.model_folder(folder)
  if candidate is not None:
    clip_config = ckpt_lib.load_config(candidate).model.clip
    if not clip_config:
      raise ValueError(f'config.model.conditioning.clip_dir={folder} holds no dual encoder '
                       '(its config has no model.clip).')
    return clip_config.to_dict()
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.model.conditioning.clip_dir={folder}: no dual encoder there '
                            '(a transformers CLIPModel folder or one of ours with model.clip).')
  with open(path) as f:
    return clip_weights.clip_config_from_transformers(json.load(f))


def embedding_to_context(model_config: Any) -> conditioning.EmbeddingToContext:
  return conditioning.EmbeddingToContext(
      num_tokens=int(model_config.conditioning.num_tokens),
      cross_attention_dim=int(model_config.unet.cross_attention_dim),
      **layers.config_dtypes(model_config))


def init_params(modules, config: ml_collections.ConfigDict, key: jax.Array,
                params: Dict[str, Any]) -> Dict[str, Any]:
  """`params` plus the dual encoder (`params['clip']`, when `modules` has one) and, for
  'clip_embedding', the U-Net's `embedding_to_context` (boxed, like `train.init_params`)."""
  params = dict(params)
  if 'clip' in modules:
    params['clip'] = modules['clip'].init(jax.random.fold_in(key, 1),
                                          *clip_lib.dummy_inputs(config.model.clip))['params']
  if uses_clip_embedding(config.model):
    if not config.model.clip:
      raise ValueError("config.model.conditioning.kind='clip_embedding' but config.model.clip is not "
                       'set: call context.prepare_config(config) first (it reads the dual '
                       "encoder's architecture from config.model.conditioning.clip_dir).")
    embeds = jnp.zeros((1, config.model.clip.projection_dim), jnp.float32)
    params['unet'] = dict(params['unet'], **{conditioning.NAME: embedding_to_context(
        config.model).init(jax.random.fold_in(key, 2), embeds)['params']})
  return params


def load_frozen_encoder(params: Dict[str, Any], config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """`params` (host arrays) with `params['clip']` read from `conditioning.clip_dir` (unchanged
  without one). Shapes must match the architecture `prepare_config` set."""
  folder = config.model.conditioning.clip_dir
  if not (uses_clip_embedding(config.model) and folder):
    return params
  _, loaded = clip_weights.load_dual_encoder(folder)
  want = traverse_util.flatten_dict(params['clip'], sep='/')
  got = traverse_util.flatten_dict(loaded, sep='/')
  if want.keys() != got.keys():
    raise ValueError(f'config.model.conditioning.clip_dir={folder}: parameters differ from '
                     f'config.model.clip (e.g. {sorted(want.keys() ^ got.keys())[:3]}).')
  out = {}
  for path, value in want.items():
    if tuple(got[path].shape) != tuple(value.shape):
      raise ValueError(f'config.model.conditioning.clip_dir={folder}: clip/{path} has shape '
                       f'{got[path].shape}, the model expects {value.shape}.')
    out[path] = jnp.asarray(got[path], value.dtype)
  logging.info('frozen dual encoder from %s', folder)
  return dict(params, clip=traverse_util.unflatten_dict(out, sep='/'))


# ----------------------------------------------------------------------------------------------------
# Contexts.


def random_frames(video: jax.Array, keys: jax.Array, num_frames: int) -> jax.Array:
  """One frame per clip, uniform over its first `num_frames` (the video frames; appended images
  come after them), chosen by the clip's key: `[B, F, H, W, C]`, keys `[B]` -> `[B, H, W, C]`."""
  index = frame_indices(keys, num_frames)
  return jnp.take_along_axis(video, index[:, None, None, None, None], axis=1)[:, 0]


def frame_indices(keys: jax.Array, num_frames: int) -> jax.Array:
  """The frame `random_frames` picks for each clip: keys `[B]` -> int32 `[B]` in [0, num_frames)."""
  return jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, _FRAME_STREAM), (), 0,
                                               num_frames))(keys).astype(jnp.int32)


def perturb_embeddings(embeds: jax.Array, keys: jax.Array, scale: float) -> jax.Array:
  """LAFITE's perturbation: L2-normalised `embeds` `[B, D]` plus a random direction of norm `scale`,
  drawn from each example's key `[B]` (`embeddings_to_context` normalises the result again)."""
  embeds = conditioning.normalize_embedding(embeds.astype(jnp.float32))
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _NOISE_STREAM),
                                               embeds.shape[-1:]))(keys)
  return embeds + scale * conditioning.normalize_embedding(noise)


def embeddings_to_context(model_config: Any, params: Dict[str, Any], embeds: jax.Array,
                          keep: jax.Array) -> jax.Array:
  """Projected CLIP embeddings `[B, D]` -> context `[B, num_tokens, cross_attention_dim]`:
  L2-normalised, the zero embedding where `keep` `[B]` is False, then `EmbeddingToContext`."""
  embeds = conditioning.normalize_embedding(embeds.astype(jnp.float32))
  embeds = jax.lax.stop_gradient(embeds * keep[:, None].astype(jnp.float32))  # Frozen encoder.
  module = embedding_to_context(model_config)
  return module.apply({'params': params['unet'][conditioning.NAME]}, embeds.astype(module.dtype))


def text_context(model_config: Any, modules, params: Dict[str, Any],
                 input_ids: jax.Array) -> jax.Array:
  """The context of captions / prompts `[B, L]` (training with text, and every sampler).

  'text_tokens': the text encoder's last hidden state `[B, L, D]`. 'clip_embedding': the dual
  encoder's text embedding through `embeddings_to_context`; a prompt with no tokens ("") gives the
  zero embedding (the unconditional context of classifier-free guidance).
  """
  if not uses_clip_embedding(model_config):
    return modules['text_encoder'].apply({'params': params['text_encoder']}, input_ids)
  out = modules['clip'].apply({'params': params['clip']}, input_ids)
  nonempty = text_encoder.eos_positions(input_ids, model_config.clip.text.eos_token_id) != 1
  return embeddings_to_context(model_config, params, out.text_embeds, nonempty)


def pooled_text(model_config: Any, hidden: jax.Array, input_ids: jax.Array) -> jax.Array:
  """CMD's text features for the motion DiT: the final state of each prompt's EOS token `[B, D]`
  (CLIP's pooled output), the EOS id being `model.cmd.eos_token_id` (None: the largest id, CLIP's
  rule)."""
  return text_encoder.pool_eos(hidden, input_ids, model_config.cmd.eos_token_id)


def image_context(model_config: Any, modules, params: Dict[str, Any], video: jax.Array,
                  keys: jax.Array, num_frames: int) -> jax.Array:
  """Stage 1: the context of one randomly chosen frame per clip (`random_frames`) of `video`
  `[B, F, H, W, 3]` in [-1, 1]; each clip's embedding is perturbed by `image_noise`
  (`perturb_embeddings`) and zeroed with probability `image_dropout`. Returns
  `[B, num_tokens, cross_attention_dim]`."""
  clip_config = model_config.clip
  frames = random_frames(video, keys, num_frames)
  pixels = clip_vision.preprocess((frames.astype(jnp.float32) + 1.0) / 2.0,
                                  clip_config.vision.image_size)
  clip = modules['clip']
  out = clip.apply({'params': params['clip']}, None, pixels.astype(clip.dtype))
  section = model_config.conditioning
  embeds = out.image_embeds
  if float(section['image_noise']) > 0.0:
    embeds = perturb_embeddings(embeds, keys, float(section['image_noise']))
  rate = float(section['image_dropout'])
  keep = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _DROP_STREAM)) >= rate)(keys)
  return embeddings_to_context(model_config, params, embeds, keep)


def training_context(params: Dict[str, Any], batch: Dict[str, jax.Array], keys: jax.Array, *,
                     modules, config: ml_collections.ConfigDict) -> jax.Array:
  """The diffusion loss's context for a batch: `[B, L, cross_attention_dim]` (module docstring).

  `keys` are the per-example keys `[B]` of the step (the frame choice and the stage-1 dropout
  derive their own streams from them).
  """
  section = config.model.conditioning
  if section['kind'] == 'clip_embedding' and section['source'] == 'image':
    return image_context(config.model, modules, params, batch['video'], keys,
                         config.data.num_frames)
  return text_context(config.model, modules, params, batch['input_ids'])


def describe(model_config: Any) -> str:
  """One line for logs."""
  section = model_config.conditioning
  if section['kind'] != 'clip_embedding':
    return 'text tokens'
  clip = model_config.clip
  return (f"CLIP {section['source']} embeddings ({clip.projection_dim}-d, dual encoder "
          f"{section['clip_dir'] or 'from init_from'}) -> {section['num_tokens']} context tokens")

