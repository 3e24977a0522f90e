r"""CMD in miniature on moving_shapes: a clip of 16 latent frames (16x16x4, the shapes VAE's) becomes one
content frame and a small motion latent (models/cmd.py; Yu et al., ICLR 2024).

Stages (each a run of magicvideo_jax.main; launch/train_cmd.sh runs them all and the evaluation):
  ae       CMD's autoencoder on the frozen VAE's latents of clips: width 64, depth 2 + 2, 4 heads,
           patch 2, D = 4 motion channels, learned frame / row / column positions (without them a
           network this small reconstructs only the clip's mean), learned content-frame weights.
           The VAE, text encoder and U-Net come from the base model (init_from, include all).
  content  the content-frame model: the base model's U-Net with its video layers off (an image
           U-Net, no new parameters) fine-tuned on (caption, z_c) pairs of the frozen autoencoder.
  motion   the motion DiT (hidden 128, depth 4, 4 heads, patch 2; content patch kp 4) on z_m given
           the clean z_c and the caption's pooled text features; its export is the CMD checkpoint.

  python -m magicvideo_jax.main --config=configs/cmd_shapes.py:ae --workdir=runs/cmd_shapes/ae

The argument is `STAGE[,base=DIR][,runs=DIR][,latents=NAME]`: base is the shapes model the VAE, text
encoder and U-Net start from (default the bundled magicvideo_jax/assets/shapes); runs the folder of
the stages' workdirs, from which content and motion start (default runs/cmd_shapes); latents the
dataset `encoded_latents/NAME` of moving_shapes encoded by the base's VAE, which every stage reads
instead of pixels (the frozen VAE encoder was about two thirds of a motion step; default shapes_bundle,
`none` for pixels). launch/train_cmd.sh builds it first:

  python -m magicvideo_jax.tools.encode_latents --source moving_shapes/default \
      --checkpoint magicvideo_jax/assets/shapes --resolution 32 --name shapes_bundle --dtype float32

Ablations (CMD's Tab. 4b/4c) are overrides: of the ae stage
`--config.model.cmd.autoencoder.content_frame=mean`, `--config.model.cmd.autoencoder.motion_channels=8`;
of the motion stage `--config.model.cmd.dit.content_patch_size=2` (BENCHMARKS.md).
"""

import ml_collections

from magicvideo_jax.configs import shapes_cascade
from magicvideo_jax import config as common

STAGES = ('ae', 'content', 'motion')
STEPS = dict(ae=1500, content=800, motion=5000)
DEFAULT_LATENTS = 'shapes_bundle'
DEFAULT_RUNS = 'runs/cmd_shapes'


def parse_arg(arg: str):
  """'STAGE[,base=DIR][,runs=DIR][,latents=NAME]' -> (stage, base, runs, latents or None)."""
  stage, *options = (arg or 'motion').split(',')
  stage = stage or 'motion'
  if stage not in STAGES:
    raise ValueError(f'configs/cmd_shapes.py:{stage}: unknown stage; choose one of {STAGES}')
  values = dict(base=shapes_cascade.DEFAULT_BASE, runs=DEFAULT_RUNS, latents=DEFAULT_LATENTS)
  for option in options:
    key, _, value = option.partition('=')
    if key not in values or not value:
      raise ValueError(f'configs/cmd_shapes.py:{arg}: options are base=DIR, runs=DIR and '
                       f'latents=NAME, got {option!r}')
    values[key] = value
  latents = None if values['latents'] == 'none' else values['latents']
  return stage, values['base'], values['runs'], latents


def get_config(arg: str = 'motion') -> ml_collections.ConfigDict:
  stage, base, runs, latents = parse_arg(arg)
  loaded = shapes_cascade.base_model_config(base)
  config = common.base_config()
  for section in ('model', 'tokenizer', 'diffusion', 'sampling'):
    config[section] = ml_collections.ConfigDict(loaded[section].to_dict())
  config.model.unet = common.image_only(config.model.unet)
  config.model.kind = 'cmd'
  config.model.cmd = common.cmd_defaults()
  config.model.cmd.autoencoder.update(width=64, depth=2, heads=4, patch_size=2, motion_channels=4,
                                      positions='learned', content_frame='learned')
  config.model.cmd.dit.update(hidden_size=128, depth=4, heads=4, patch_size=2,
                              content_patch_size=4, position_grid='true')
  config.model.cmd.eos_token_id = 2  # The word tokenizer's <eos> (tokenizer.WordTokenizer).
  # Our guidance convention: uncond + w (cond - uncond); CMD's paper writes (1 + w') e_c - w' e_u,
  # so w = w' + 1. The motion DiT is guided on text only; the content frame is in both branches.
  # Both 3 (the bundle's): on 64 validation prompts, motion guidance 1 / 2 / 3 / 4 / 6 traded shape
  # (0.72 / 0.73 / 0.64 / 0.66 / 0.66) against motion (0.72 / 0.78 / 0.78 / 0.80 / 0.83) with the
  # content frame at 4; 3 and 3 gave the most "all three" (BENCHMARKS.md).
  config.sampling.update(guidance_scale=3.0, motion_guidance_scale=3.0)
  config.data.update(dataset='moving_shapes', split='train', num_frames=int(loaded.data.num_frames),
                     resolution=int(loaded.data.resolution), fps=float(loaded.data.fps),
                     global_batch_size=8, caption_dropout=0.1, num_threads=2, prefetch=2)
  if latents:
    config.data.update(dataset=f'encoded_latents/{latents}', precomputed_latents=True)
  config.train.update(log_every=50, checkpoint_every=500, keep_checkpoints=1, warmup_steps=50,
                      learning_rate=1e-3, ema_decay=0.99, sample_every=0)
  config.eval.update(every_steps=500, split='validation', num_batches=4)
  if stage == 'ae':
    config.data.caption_dropout = 0.0
    # The paper's AdamW betas (0.5, 0.9); a miniature's learning rate.
    config.train.update(objective='cmd_autoencoder', trainable=('^cmd_autoencoder/',),
                        num_steps=STEPS['ae'], init_from=base,
                        init_from_include=('^vae/', '^text_encoder/', '^unet/'),
                        adam_b1=0.5, adam_b2=0.9, ema_decay=0.0)
  elif stage == 'content':
    config.data.global_batch_size = 16
    config.train.update(objective='cmd_content', trainable=('^unet/',), num_steps=STEPS['content'],
                        init_from=f'{runs}/ae/model', learning_rate=3e-4,
                        timestep_sampling='logit_normal', timestep_logit_mean=0.5,
                        timestep_logit_std=1.5)
  else:
    config.data.global_batch_size = 16
    config.train.update(objective='cmd_motion', trainable=('^motion_dit/',),
                        num_steps=STEPS['motion'], init_from=f'{runs}/content/model',
                        timestep_sampling='logit_normal', timestep_logit_mean=1.2,
                        timestep_logit_std=1.5)
  return config
