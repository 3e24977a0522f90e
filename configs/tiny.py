r"""Tiny config: seconds per step on a laptop CPU; used by the tests and as a smoke run.

  python -m magicvideo_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
      --config.data.data_dir=/tmp/tfds

Variants (`--config=configs/tiny.py:VARIANT`): 'video' (default, MagicVideo's video stage training
adaptors + temporal attention + fps embedding), 'image' (text-to-image U-Net, all parameters),
'all' (video model, every parameter trains), 'vae' (autoencoder), 'i2v' (image-to-video: the video
U-Net conditioned on frame 0, sampling/image_to_video.py), and CMD's three stages
(configs/cmd_shapes.py in small): 'cmd_ae', 'cmd_content', 'cmd_motion' (chain them with
--config.train.init_from=<previous run>/model).
"""

import ml_collections

from magicvideo_jax import config as common


def get_config(variant: str = 'video') -> ml_collections.ConfigDict:
  variant = variant or 'video'
  variants = ('video', 'image', 'all', 'vae', 'i2v', 'cmd_ae', 'cmd_content', 'cmd_motion')
  if variant not in variants:
    raise ValueError(f'configs/tiny.py:{variant}: unknown variant; choose one of {variants}')
  config = common.base_config()
  config.model.text_encoder.update(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=16)
  config.model.vae.update(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
  config.model.unet.update(
      block_out_channels=(32, 64), down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1, attention_head_dim=4,
      cross_attention_dim=32, norm_num_groups=8, num_frames=8, temporal_position='rope')
  config.model.video_vae.num_frames = 8
  config.tokenizer = common.shapes_tokenizer()

  config.data.update(dataset='moving_shapes/tiny', num_frames=8, resolution=16,
                     global_batch_size=8, frame_stride_range=(1, 1), caption_dropout=0.1,
                     num_threads=2, prefetch=2)
  config.train.update(num_steps=20, learning_rate=1e-3, warmup_steps=5, log_every=5,
                      checkpoint_every=10, sample_every=0)
  config.sampling.update(num_inference_steps=10, guidance_scale=3.0)
  config.train.sample_prompts = ('a red circle moving left', 'a blue square moving up')

  if variant == 'image':
    config.model.unet = common.image_only(config.model.unet)
    config.data.num_frames = 1
    config.train.trainable = ('^unet/', '^text_encoder/')
  elif variant == 'all':
    config.train.trainable = ('^unet/', '^text_encoder/')
  elif variant == 'i2v':
    config.model.unet.in_channels = 2 * config.model.vae.latent_channels + 1
    config.image_to_video = common.image_to_video_defaults()
    config.train.update(objective='image_to_video', trainable=('^unet/',))
  elif variant == 'vae':
    config.train.objective = 'vae'
    config.train.trainable = ('^vae/',)
    config.data.num_frames = 1
  elif variant.startswith('cmd_'):
    config.model.unet = common.image_only(config.model.unet)
    config.model.kind = 'cmd'
    config.model.cmd = common.cmd_defaults()
    config.model.cmd.autoencoder.update(width=16, depth=1, heads=2, patch_size=2,
                                        motion_channels=2, positions='learned',
                                        content_frame='learned')
    config.model.cmd.dit.update(hidden_size=32, depth=1, heads=2, patch_size=2,
                                content_patch_size=2)
    config.model.cmd.eos_token_id = 2  # tokenizer.WordTokenizer's <eos>.
    config.sampling.motion_guidance_scale = 2.0
    stage = variant[len('cmd_'):]
    config.train.objective = {'ae': 'cmd_autoencoder'}.get(stage, variant)
    config.train.trainable = {'ae': ('^cmd_autoencoder/',), 'content': ('^unet/',),
                              'motion': ('^motion_dit/',)}[stage]
  return config
