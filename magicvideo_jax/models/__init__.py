"""The models: CLIP text encoder, SD VAE, MagicVideo video U-Net, VDM baseline, CLIP dual encoder.

`build_models(config.model)` turns a config's model section into Linen modules.
"""

from typing import Any, Dict

import einops
import jax.numpy as jnp


def _fields(section: Any) -> Dict[str, Any]:
  """ConfigDict -> module kwargs with lists turned into tuples (Linen fields must be hashable)."""
  items = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in items.items()}


def dtypes(model_config: Any) -> Dict[str, Any]:
  return dict(
      dtype=jnp.dtype(model_config.get('dtype', 'float32')),
      param_dtype=jnp.dtype(model_config.get('param_dtype', 'float32')),
  )


def build_text_encoder(model_config: Any):
  from magicvideo_jax.models.text_encoder import CLIPTextModel
  return CLIPTextModel(**_fields(model_config.text_encoder), **dtypes(model_config),
                       attention_impl=model_config.get('attention_impl', None))


def uses_video_vae(model_config: Any) -> bool:
  return bool(model_config.get('video_vae') and model_config.video_vae.get('enabled', False))


def build_vae(model_config: Any):
  """The SD autoencoder, or the VideoVAE when `model.video_vae.enabled`."""
  if uses_video_vae(model_config):
    from magicvideo_jax.models.video_vae import build_video_vae  # pylint: disable=g-import-not-at-top
    return build_video_vae(model_config)
  from magicvideo_jax.models.vae import AutoencoderKL
  return AutoencoderKL(**_fields(model_config.vae), **dtypes(model_config),
                       attention_impl=model_config.get('attention_impl', None))


def encode_frames(vae, vae_params, frames, scaling_factor: float):
  """Frames `[B, F, H, W, 3]` in [-1, 1] -> scaled posterior means `[B, F, h, w, c]` of an image VAE."""
  b = frames.shape[0]
  mean, _ = vae.apply({'params': vae_params}, einops.rearrange(frames, 'b f h w c -> (b f) h w c'),
                      method='encode')
  return einops.rearrange(mean, '(b f) h w c -> b f h w c', b=b) * scaling_factor


def build_unet(model_config: Any):
  from magicvideo_jax.models.unet import UNet
  return UNet(**_fields(model_config.unet), **dtypes(model_config),
              attention_impl=model_config.get('attention_impl', None),
              remat=model_config.get('remat', False),
              remat_policy=model_config.get('remat_policy', None))


def build_models(model_config: Any) -> Dict[str, Any]:
  """{'text_encoder', 'vae', 'unet'} Linen modules of a config's `model` section, plus 'clip' (the
  CLIP dual encoder, models/clip.py) when `model.clip` describes one."""
  modules = dict(
      text_encoder=build_text_encoder(model_config),
      vae=build_vae(model_config),
      unet=build_unet(model_config),
  )
  if model_config.get('clip', None):
    from magicvideo_jax.models.clip import build_clip  # pylint: disable=g-import-not-at-top
    modules['clip'] = build_clip(model_config)
  return modules
