"""The models: CLIP text encoder, SD VAE, MagicVideo video U-Net, VDM baseline, CLIP dual encoder,
CMD's autoencoder and motion DiT.

`build_models(config.model)` turns a config's model section into Linen modules.
"""

from typing import Any, Dict

import einops

from magicvideo_jax.models import cmd as cmd_lib
from magicvideo_jax.models import layers
from magicvideo_jax.models.clip import build_clip
from magicvideo_jax.models.text_encoder import CLIPTextModel
from magicvideo_jax.models.unet import UNet
from magicvideo_jax.models.vae import AutoencoderKL
from magicvideo_jax.models.video_vae import build_video_vae


def build_text_encoder(model_config: Any):
  return CLIPTextModel(**layers.config_fields(model_config.text_encoder),
                       **layers.config_dtypes(model_config),
                       attention_impl=model_config.attention_impl)


def uses_video_vae(model_config: Any) -> bool:
  return 'video_vae' in model_config and bool(model_config.video_vae.enabled)


def build_vae(model_config: Any):
  """The SD autoencoder, or the VideoVAE when `model.video_vae.enabled`."""
  if uses_video_vae(model_config):
    return build_video_vae(model_config)
  return AutoencoderKL(**layers.config_fields(model_config.vae),
                       **layers.config_dtypes(model_config),
                       attention_impl=model_config.attention_impl)


def encode_frames(vae, vae_params, frames, scaling_factor: float):
  """Frames `[B, F, H, W, 3]` in [-1, 1] -> scaled posterior means `[B, F, h, w, c]` of an image VAE."""
  b = frames.shape[0]
  mean, _ = vae.apply({'params': vae_params}, einops.rearrange(frames, 'b f h w c -> (b f) h w c'),
                      method='encode')
  return einops.rearrange(mean, '(b f) h w c -> b f h w c', b=b) * scaling_factor


def build_unet(model_config: Any):
  return UNet(**layers.config_fields(model_config.unet), **layers.config_dtypes(model_config),
              attention_impl=model_config.attention_impl,
              remat=model_config.remat, remat_policy=model_config.remat_policy)


def is_cmd(model_config: Any) -> bool:
  """A CMD model (`model.kind == 'cmd'`): the U-Net is the content-frame model, beside CMD's
  autoencoder and motion DiT (models/cmd.py)."""
  return model_config.get('kind') == 'cmd'


def build_cmd(model_config: Any) -> Dict[str, Any]:
  """{'cmd_autoencoder', 'motion_dit'} of `model.cmd` ({'autoencoder': fields, 'dit': fields}),
  in the model's dtypes."""
  shared = dict(layers.config_dtypes(model_config), attention_impl=model_config.attention_impl)
  section = model_config.cmd
  return dict(
      cmd_autoencoder=cmd_lib.build_cmd_autoencoder(dict(shared, **layers.config_fields(
          section.autoencoder))),
      motion_dit=cmd_lib.build_motion_dit(dict(shared, **layers.config_fields(section.dit))))


def build_models(model_config: Any) -> Dict[str, Any]:
  """{'text_encoder', 'vae', 'unet'} Linen modules of a config's `model` section, plus 'clip' (the
  CLIP dual encoder, models/clip.py) when `model.clip` describes one and CMD's 'cmd_autoencoder' and
  'motion_dit' for a CMD model (`is_cmd`)."""
  modules = dict(
      text_encoder=build_text_encoder(model_config),
      vae=build_vae(model_config),
      unet=build_unet(model_config),
  )
  if model_config.clip is not None:
    modules['clip'] = build_clip(model_config)
  if is_cmd(model_config):
    modules.update(build_cmd(model_config))
  return modules
