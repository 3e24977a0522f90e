r"""MagicVideo at paper scale: SD 1.5 U-Net / VAE / CLIP ViT-L/14 text, 16 frames of 256x256.

Latents are 16 x 32 x 32 x 4. Start from converted SD 1.5 weights:

  python -m magicvideo_jax.convert --diffusers_dir /path/to/sd15 --output /ckpt/sd15
  python -m magicvideo_jax.main --config=configs/sd15_256.py --workdir=/runs/mv \
      --config.train.init_from=/ckpt/sd15 --config.tokenizer.path=/ckpt/sd15/tokenizer \
      --config.data.dataset=video_folder/webvid_256px_32f --config.data.data_dir=/data/tfds

Variants: 'video' (default: train adaptors + directed temporal attention + fps embedding, as
MagicVideo), 'all' (every U-Net parameter), 'lavie' (sequential temporal attention with RoPE,
bidirectional, joint image-video batches), 'animatediff' (AnimateDiff's motion modules alone train;
init_from a checkpoint converted with --motion_adapter_dir to fine-tune a released adapter).
"""

import ml_collections

from magicvideo_jax import config as common


def get_config(variant: str = 'video') -> ml_collections.ConfigDict:
  variant = variant or 'video'
  variants = ('video', 'all', 'lavie', 'animatediff')
  if variant not in variants:
    raise ValueError(f'configs/sd15_256.py:{variant}: unknown variant; choose one of {variants}')
  config = common.base_config()
  config.model.dtype = 'bfloat16'  # Compute dtype on TPU/GPU; parameters stay float32.
  config.model.remat = True
  # Per call: cuDNN flash on GPU, chunked softmax for the 1024-token self-attention elsewhere
  # (the full fp32 logits of the 32x32 levels dominate the train step's memory otherwise).
  config.model.attention_impl = 'auto'
  config.tokenizer.kind = 'clip'
  config.data.update(num_frames=16, resolution=256, global_batch_size=64, frame_stride_range=(1, 4),
                     caption_dropout=0.1)
  config.train.update(num_steps=100_000, learning_rate=1e-4, warmup_steps=1000, log_every=100,
                      checkpoint_every=1000)
  config.mesh.update(data=-1, fsdp=1)
  if variant == 'all':
    config.train.trainable = ('^unet/',)
  elif variant == 'lavie':
    config.model.unet.update(temporal_attention='sequential', temporal_mask='none',
                             temporal_position='rope')
    config.data.update(num_image_frames=4)
    config.train.image_loss_weight = 1.0
  elif variant == 'animatediff':
    config.model.unet.update(temporal_attention='animatediff', temporal_mask='none',
                             frame_adaptor=False, fps_embedding=False)
    config.train.trainable = (r'^unet/.*motion_modules(?!.*/pos_embed/)',)
  return config
