r"""The cascade in miniature on moving_shapes: keyframe interpolation x3 and video super-resolution x2.

Both stages grow from a trained shapes base model (configs/shapes.py; default the bundled
magicvideo_jax/assets/shapes, 16 keyframes of 32x32), whose config.json this file reads so that the
new models always fit the base they start from:

  interpolation  16 keyframes -> 46 frames (m = 3) at 32x32: the base video U-Net with
                 in_channels 2 * 4 + 1 (noisy latents | keyframe latents | mask), frame adaptors for 46
                 frames, bidirectional temporal attention; init_from the base (conv_in grown with zero
                 weights on the new channels, adaptors resampled along frames); the whole U-Net trains,
                 the text encoder and VAE stay the base's. Data: moving_shapes/frames46 (the 'default'
                 motions over 46 frames at 24 fps; every third frame is a 16-frame clip).
  upscaler       32x32 -> 64x64: an SD-x4-upscaler-style U-Net (7 inputs = latents + low-res RGB,
                 noise-level class embedding, no attention at the first level) with LaVie's temporal
                 attention (sequential, bidirectional, RoPE; no frame adaptors, so any clip length),
                 trained from scratch on 16-frame clips of moving_shapes/res64; it samples from the
                 upsampled input at strength 0.3 (image-to-image). The VAE is the base's,
                 reused and frozen: it was trained on 32x32 frames but is convolutional, and reconstructs
                 64x64 shapes clips as well (PSNR 32.4 dB vs 32.3 dB at 32x32, 64 test frames); the text
                 encoder is the base's too.

  python -m magicvideo_jax.main --config=configs/shapes_cascade.py:interpolation \
      --workdir=runs/shapes_cascade/interpolation
  python -m magicvideo_jax.main --config=configs/shapes_cascade.py:upscaler,base=runs/shapes/video/model \
      --workdir=runs/shapes_cascade/upscaler

The argument is `STAGE[,base=DIR]`; launch/train_cascade.sh runs both stages and the evaluation.
"""

import os

import ml_collections

from magicvideo_jax import config as common

STAGES = ('interpolation', 'upscaler')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE = 'magicvideo_jax/assets/shapes'
KEYFRAMES, FACTOR = 16, 3


def parse_arg(arg: str):
  """'STAGE[,base=DIR]' -> (stage, base folder)."""
  stage, *options = (arg or 'interpolation').split(',')
  base = DEFAULT_BASE
  for option in options:
    key, _, value = option.partition('=')
    if key != 'base' or not value:
      raise ValueError(f'configs/shapes_cascade.py:{arg}: options are base=DIR, got {option!r}')
    base = value
  if stage not in STAGES:
    raise ValueError(f'configs/shapes_cascade.py:{stage}: unknown stage; choose one of {STAGES}')
  return stage, base


def base_model_config(base: str) -> ml_collections.ConfigDict:
  """The config.json of the base model folder (relative paths: from the cwd, else the repo root)."""
  from magicvideo_jax.weights import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  folder = base if os.path.isdir(base) or os.path.isabs(base) else os.path.join(ROOT, base)
  if not os.path.isfile(os.path.join(folder, ckpt_lib.CONFIG_FILE)):
    raise FileNotFoundError(f'configs/shapes_cascade.py: base model folder {base} has no config.json '
                            '(train the base with launch/train_shapes.sh, or pass base=DIR)')
  return ckpt_lib.load_config(folder)


def finetune_config(arg: str, file: str):
  """(config, base) of a config file that fine-tunes a shapes base model and takes `[base=DIR]`:
  the base's model, tokenizer, diffusion and sampling sections, moving_shapes clips of its size."""
  base = DEFAULT_BASE
  for option in filter(None, (arg or '').split(',')):
    key, _, value = option.partition('=')
    if key != 'base' or not value:
      raise ValueError(f'configs/{file}:{arg}: options are base=DIR, got {option!r}')
    base = value
  loaded = base_model_config(base)
  config = common.base_config()
  for section in ('model', 'tokenizer', 'diffusion', 'sampling'):
    config[section] = ml_collections.ConfigDict(loaded[section].to_dict())
  config.data.update(dataset='moving_shapes/default', num_frames=int(loaded.data.num_frames),
                     resolution=int(loaded.data.resolution), fps=float(loaded.data.fps),
                     global_batch_size=4, num_threads=2)
  return config, base


def get_config(arg: str = 'interpolation') -> ml_collections.ConfigDict:
  from magicvideo_jax.sampling import interpolation  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.sampling import upscaler  # pylint: disable=g-import-not-at-top
  stage, base = parse_arg(arg)
  loaded = base_model_config(base)
  config = common.base_config()
  config.model = ml_collections.ConfigDict(loaded.model.to_dict())
  config.model.video_vae.enabled = False
  config.tokenizer = ml_collections.ConfigDict(loaded.tokenizer.to_dict())
  config.diffusion = ml_collections.ConfigDict(loaded.diffusion.to_dict())
  latent_channels = int(config.model.vae.latent_channels)
  config.data.update(caption_dropout=0.1, num_threads=2, prefetch=2, frame_stride_range=(1, 1))
  config.train.update(init_from=base, trainable=('^unet/',), log_every=50, checkpoint_every=500,
                      keep_checkpoints=2, warmup_steps=100, ema_decay=0.99, sample_every=0)
  # DPM-Solver++ with log-SNR-uniform steps: 15 steps (DDIM-50 quality, tests/test_diffusion.py) keep
  # the stages, which run on 46 frames, affordable.
  config.sampling.update(sampler='dpmsolver++', num_inference_steps=15, sigma_spacing='lu_lambdas')

  if stage == 'interpolation':
    frames = (KEYFRAMES - 1) * FACTOR + 1
    config.interpolation = interpolation.default_config()
    config.interpolation.update(factor=FACTOR, condition='nearest', keyframe_loss_weight=1.0)
    # Bidirectional temporal attention: an in-between frame must see the keyframe after it.
    config.model.unet.update(in_channels=2 * latent_channels + 1, num_frames=frames,
                             temporal_mask='none')
    config.data.update(dataset='moving_shapes/frames46', num_frames=frames,
                       resolution=int(loaded.data.resolution), global_batch_size=2,
                       fps=FACTOR * float(loaded.data.fps))  # Sampling default: 24.
    config.train.update(objective='interpolation', num_steps=1500, learning_rate=5e-4)
    config.sampling.guidance_scale = 2.0  # The keyframes carry the content; text guides lightly.
  elif stage == 'upscaler':
    config.upscaler = upscaler.default_config()
    # Sampling from the upsampled input (image-to-image) instead of pure noise: a from-scratch
    # miniature upscaler redraws each frame's outline differently from pure noise (cascaded
    # consistency 0.56 at strength 1 vs 0.68 at 0.3 on 64 test prompts; BENCHMARKS.md).
    config.upscaler.strength = 0.3
    config.model.unet = ml_collections.ConfigDict(dict(
        common.unet_sd15().to_dict(),
        in_channels=latent_channels + 3, out_channels=latent_channels, block_out_channels=(32, 64),
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), layers_per_block=1,
        attention_head_dim=4, cross_attention_dim=int(config.model.text_encoder.hidden_size),
        norm_num_groups=8, use_linear_projection=True, num_class_embeds=1000,
        only_cross_attention=False, num_frames=(KEYFRAMES - 1) * FACTOR + 1, frame_adaptor=False,
        temporal_attention='sequential', temporal_mask='none', temporal_position='rope',
        fps_embedding=False))
    # Whole 16-frame clips (not 8): the stage runs on 46 frames, and its temporal attention
    # (RoPE) should have seen positions as far apart as it can in training.
    config.data.update(dataset='moving_shapes/res64', num_frames=16,
                       resolution=2 * int(loaded.data.resolution), global_batch_size=2)
    config.train.update(objective='upscaler', num_steps=1500, learning_rate=1e-3,
                        init_from_include=('^text_encoder/', '^vae/'))
    config.sampling.guidance_scale = 1.0  # Text barely matters to 2x SR: no guidance, half the cost.
  return config
