r"""VDM baseline (Ho et al. 2022, App. A "T2V large 16x64x64"): 16 frames of 64x64 pixels.

The FLOPs baseline of MagicVideo's "around 64x fewer FLOPs than VDM" (DESIGN.md section 7); see
`magicvideo_jax/models/vdm.py` for the architecture. Not a training recipe: no VDM weights exist and
`magicvideo_jax.train` does not build it. Count its FLOPs with

  python -m magicvideo_jax.flops --config=configs/vdm_64.py

Hyper-parameters from the paper: base 256 channels, multipliers (1, 2, 4, 8), 2 res blocks a level,
1x3x3 convs, spatial then temporal attention (relative position bias) at 32/16/8, head dim 64, text
embedding added to the conditioning vector, epsilon target, 256 sampling steps, classifier-free
guidance. The text encoder here is SD's CLIP ViT-L/14 (768-d tokens, attention-pooled) as a stand-in
for VDM's BERT-large; its cost is not part of the denoiser count.
"""

import ml_collections

from magicvideo_jax import config as common


def vdm_t2v_large() -> ml_collections.ConfigDict:
  """`config.model.vdm`: the fields of `VDMUNet`."""
  return ml_collections.ConfigDict(dict(
      in_channels=3,
      out_channels=3,
      base_channels=256,
      channel_mult=(1, 2, 4, 8),
      num_res_blocks=2,
      attention_resolutions=(32, 16, 8),
      resolution=64,  # The input size attention_resolutions refer to.
      head_dim=64,
      embed_dim=1024,  # Width of the conditioning vector (4 x base, as DDPM).
      context_dim=768,
      num_frames=16,  # Longest clip: size of the relative position table.
      norm_num_groups=32,
  ))


def vdm_config(resolution: int) -> ml_collections.ConfigDict:
  """base_config() with the VDM as the denoiser (`model.kind='vdm'`); no VAE, no MagicVideo U-Net."""
  config = common.base_config()
  config.model.kind = 'vdm'
  config.model.vdm = vdm_t2v_large()
  del config.model['unet']
  del config.model['vae']
  config.model.dtype = 'bfloat16'  # Compute dtype on TPU/GPU; parameters stay float32.
  config.model.remat = True
  config.data.update(num_frames=16, resolution=resolution, global_batch_size=128,
                     frame_stride_range=(1, 1), caption_dropout=0.1)
  config.sampling.update(num_inference_steps=256, guidance_scale=5.0)
  config.train.trainable = ('^unet/',)  # The denoiser sits under 'unet' in the train state.
  return config


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  if variant:
    raise ValueError(f'configs/vdm_64.py:{variant}: this config has no variants')
  return vdm_config(64)
