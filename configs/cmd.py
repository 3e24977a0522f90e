r"""CMD (Yu et al., ICLR 2024, arXiv 2403.14148): content U-Net + motion DiT + CMD autoencoder.

  python -m magicvideo_jax.cmd_flops --config=configs/cmd.py:sd21_512x1024 --json

Variants (`--config=configs/cmd.py:VARIANT`):
- 'sd21_512x1024' (default): the paper's text-to-video setup, 16 frames of 512 x 1024, the SD 2.1
  U-Net as content model (latents 64 x 128), content patch kp 8.
- 'sd15_512': SD 1.5 U-Net, 16 frames of 512 x 512, kp 4.

Sections: `model.unet` the content U-Net (an image U-Net, MagicVideo's video layers off),
`model.cmd.autoencoder` (`CMDAutoencoder` fields), `model.cmd.dit` (`build_motion_dit` fields).
Autoencoder depth 8 with 8 heads of 48 (the released code), not the paper table's depth 12 / head
dim 64: App. D's autoencoder training forward (0.77 TFLOPs) is depth 8's; depth 12 gives 1.16.
Counts only for now: the input pipeline crops square clips, so `data.width` is read by cmd_flops only.
"""

import ml_collections

from magicvideo_jax import config as common

VARIANTS = ('sd21_512x1024', 'sd15_512')


def text_encoder_sd21() -> ml_collections.ConfigDict:
  """OpenCLIP ViT-H/14 text tower as SD 2.x ships it (23 of its 24 layers, width 1024)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
      num_attention_heads=16, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act='gelu'))


def get_config(variant: str = 'sd21_512x1024') -> ml_collections.ConfigDict:
  variant = variant or 'sd21_512x1024'
  if variant not in VARIANTS:
    raise ValueError(f'configs/cmd.py:{variant}: unknown variant; choose one of {VARIANTS}')
  config = common.base_config()
  config.model.kind = 'cmd'
  config.model.dtype = 'bfloat16'
  unet = common.image_only(common.unet_sd15())
  if variant == 'sd21_512x1024':
    # A new ConfigDict: attention_head_dim changes type (int -> heads per level, head dim 64).
    unet = ml_collections.ConfigDict(dict(unet.to_dict(), attention_head_dim=(5, 10, 20, 20),
                                          cross_attention_dim=1024, use_linear_projection=True))
    config.model.text_encoder = text_encoder_sd21()
    config.data.update(num_frames=16, resolution=512, width=1024)
    content_patch = 8
    # App. D's training forwards match 512 x 512 clips (cmd_flops docstring); sampling is 512 x 1024.
    config.flops = ml_collections.ConfigDict(dict(train_size=(512, 512), published=True))
  else:
    config.data.update(num_frames=16, resolution=512, width=512)
    content_patch = 4
    config.flops = ml_collections.ConfigDict(dict(train_size=(512, 512), published=False))
  config.model.unet = unet
  config.model.cmd = common.cmd_defaults()
  config.model.cmd.autoencoder.update(width=384, depth=8, heads=8, patch_size=2,
                                      motion_channels=8, content_frame='learned')
  config.model.cmd.dit.update(size='XL', patch_size=2, content_patch_size=content_patch)
  config.sampling.num_inference_steps = 50
  return config
