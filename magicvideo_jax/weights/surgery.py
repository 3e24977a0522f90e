"""Weight surgery: a base model's weights reused in a larger or different one.

- `load_init_checkpoint` (`config.train.init_from`): leaves of a pretrained folder replace a new model's
  where their paths match; `grow_weight` grows the leaves whose shape changed (U-Net input channels of
  the interpolation and image-to-video stages, frame-adaptor rows of longer clips).
- `grow_video_params`: the video-only leaves an image checkpoint lacks, at their identity init.
"""

import logging
import re
from typing import Any, Dict, Mapping, Optional, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magicvideo_jax import models as models_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights.torch_layout import iter_paths

Params = Dict[str, Any]


def grow_weight(path: str, loaded: np.ndarray, shape: Sequence[int]) -> Optional[np.ndarray]:
  """A base checkpoint's leaf grown to `shape`, or None when no rule applies (the caller raises).

  - `unet/conv_in/kernel` `[kh, kw, c_in, C]` -> `[kh, kw, c_in', C]` (c_in' > c_in): the base weights
    on the first c_in input channels, zeros on the new ones, so the new inputs are ignored at init.
  - frame adaptors `.../*_adaptor/{scale,bias}` `[F0, C]` -> `[F1, C]` (F1 > F0): linear resampling
    along the frames with both ends aligned (row j reads position j (F0 - 1) / (F1 - 1) of the base
    table): the base's clip span maps onto the longer clip's, so with F0 = K (the shapes base:
    16 adaptor rows, 16 keyframes) output frame k m gets base row k exactly.
  """
  loaded = np.asarray(loaded)
  shape = tuple(int(s) for s in shape)
  if path == 'unet/conv_in/kernel' and loaded.ndim == 4 and len(shape) == 4:
    if loaded.shape[:2] + loaded.shape[3:] == shape[:2] + shape[3:] and shape[2] > loaded.shape[2]:
      grown = np.zeros(shape, loaded.dtype)
      grown[:, :, :loaded.shape[2]] = loaded
      return grown
  parts = path.split('/')
  if (len(parts) >= 2 and parts[-2].endswith('_adaptor') and parts[-1] in ('scale', 'bias')
      and loaded.ndim == 2 and len(shape) == 2 and loaded.shape[1] == shape[1]):
    old, new = loaded.shape[0], shape[0]
    if new < old:
      return None
    if old == 1:
      return np.repeat(loaded, new, axis=0)
    position = np.arange(new) * (old - 1) / (new - 1)
    low = np.minimum(np.floor(position).astype(int), old - 2)
    weight = (position - low)[:, None]
    return ((1 - weight) * loaded[low] + weight * loaded[low + 1]).astype(loaded.dtype)
  return None


def load_init_checkpoint(params: Params, folder: str, include=('.*',)) -> Params:
  """Weight reuse: leaves of a pretrained folder replace ours where their path matches `include`.

  Leaves absent from the checkpoint keep their init (logged); a shape mismatch is an error unless
  `grow_weight` grows the leaf (U-Net input channels, frame-adaptor rows).
  """
  loaded = traverse_util.flatten_dict(ckpt_lib.load_params(folder), sep='/')
  patterns = [re.compile(p) for p in include]
  flat = traverse_util.flatten_dict(params, sep='/')
  kept, grown = [], []
  for path, value in flat.items():
    if not any(p.search(path) for p in patterns):
      continue
    if path not in loaded:
      kept.append(path)
      continue
    leaf = loaded[path]
    if tuple(leaf.shape) != tuple(value.shape):
      leaf = grow_weight(path, leaf, value.shape)
      if leaf is None:
        raise ValueError(f'config.train.init_from={folder}: {path} has shape {loaded[path].shape}, '
                         f'the model expects {value.shape}')
      grown.append(f'{path} {tuple(loaded[path].shape)} -> {tuple(value.shape)}')
    flat[path] = jnp.asarray(leaf, value.dtype)
  if grown:
    logging.info('init_from %s: %d leaves grown, e.g. %s', folder, len(grown), grown[:3])
  if kept:
    groups = sorted({re.sub(r'_\d+', '_N', p) for p in kept})
    logging.info('init_from %s: %d leaves keep their init, e.g. %s', folder, len(kept), groups[:6])
  return traverse_util.unflatten_dict(flat, sep='/')


def dummy_inputs(config) -> Dict[str, Any]:
  """Smallest inputs that create every parameter (parameter shapes do not depend on input sizes)."""
  mc = config.model
  vae_factor = 2 ** (len(mc.vae.block_out_channels) - 1)
  latent = 2 ** (len(mc.unet.block_out_channels) - 1)
  return dict(
      input_ids=jnp.zeros((1, 1), jnp.int32),
      image=jnp.zeros((1, latent * vae_factor, latent * vae_factor, mc.vae.in_channels), jnp.float32),
      latents=jnp.zeros((1, 1, latent, latent, mc.unet.in_channels), jnp.float32),
      timesteps=jnp.zeros((1,), jnp.int32),
      context=jnp.zeros((1, 1, mc.unet.cross_attention_dim), jnp.float32),
      fps=jnp.ones((1,), jnp.float32),
      class_labels=jnp.zeros((1,), jnp.int32),
  )


def _unet_kwargs(config, x: Mapping[str, Any]) -> Dict[str, Any]:
  """Keyword inputs of `UNet.__call__` that create every parameter: fps, and class labels when the
  U-Net has a class embedding (the upscaler's noise level)."""
  kwargs = dict(fps=x['fps'])
  if config.model.unet.num_class_embeds:
    kwargs['class_labels'] = x['class_labels']
  return kwargs


def abstract_params_for(config, modules: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Unboxed ShapeDtypeStructs of {'text_encoder', 'vae', 'unet'} (nothing allocated or compiled)."""
  modules = modules or models_lib.build_models(config.model)
  x = dummy_inputs(config)
  key = jax.random.key(0)
  shapes = lambda f: nn.unbox(jax.eval_shape(f, key)['params'])
  return dict(
      text_encoder=shapes(lambda k: modules['text_encoder'].init(k, x['input_ids'])),
      vae=shapes(lambda k: modules['vae'].init(k, x['image'])),
      unet=shapes(lambda k: modules['unet'].init(k, x['latents'], x['timesteps'], x['context'],
                                                 **_unet_kwargs(config, x))),
  )


def grow_params(module, params: Any, *args, seed: int = 0, method: Any = None, **kwargs) -> Params:
  """`params` completed with `module`'s init of the leaves they lack (the video-only ones).

  Runs `module.apply(..., *args, mutable=['params'])` once under `jax.jit`: only the missing leaves are
  drawn (a full `init` compiles every image parameter's initialiser too, several times slower).
  `args`/`kwargs` are example inputs that reach every missing parameter. Returns numpy arrays, unboxed.
  """

  def grow(p, key):
    _, variables = module.apply({'params': p}, *args, rngs={'params': key}, mutable=['params'],
                                method=method, **kwargs)
    return nn.unbox(variables['params'])

  grown = jax.jit(grow)(params, jax.random.key(seed))
  return jax.tree.map(np.asarray, grown)


def grow_video_params(config, params: Mapping[str, Any], modules: Optional[Mapping[str, Any]] = None,
                      seed: int = 0) -> Dict[str, Any]:
  """Initialises the video-only leaves (U-Net adaptors, temporal layers, fps embedding; VideoVAE
  temporal layers) that `params` {'text_encoder', 'vae', 'unet'} lack, at their identity init."""
  modules = modules or models_lib.build_models(config.model)
  template = abstract_params_for(config, modules)
  x = dummy_inputs(config)
  out = dict(params)
  for name in ('unet', 'vae'):
    have = set(iter_paths(params[name]))
    if all(p in have for p in iter_paths(template[name])):
      continue
    if name == 'unet':
      out[name] = grow_params(modules['unet'], params['unet'], x['latents'], x['timesteps'],
                              x['context'], seed=seed, **_unet_kwargs(config, x))
    else:
      out[name] = grow_params(modules['vae'], params['vae'], x['image'], seed=seed)
  return out
