r"""Image-to-video in miniature: the bundled shapes model taught to start from a given first frame.

The base (default magicvideo_jax/assets/shapes) becomes a first-frame-conditioned video U-Net
(sampling/image_to_video.py): in_channels 2 * 4 + 1 = [noisy latents | frame 0's latents at every
frame | mask of frame 0], `unet/conv_in` grown from the base with zeros on the new channels (so
training starts from exactly the base), the base's directed temporal attention kept (every frame
sees frame 0). The whole U-Net trains on moving_shapes clips with each clip's own frame 0 as the
condition; the VAE (with its VideoVAE decoder) and the text encoder stay the base's.

  python -m magicvideo_jax.main --config=configs/shapes_i2v.py --workdir=runs/shapes_i2v
  python -m magicvideo_jax.eval.image_to_video --checkpoint runs/shapes_i2v/model --split test

The argument is `[base=DIR]`.
"""

import ml_collections

from magicvideo_jax.configs import shapes_cascade
from magicvideo_jax import config as common

DEFAULT_BASE = shapes_cascade.DEFAULT_BASE


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  config, base = shapes_cascade.finetune_config(arg, 'shapes_i2v.py')
  config.model.unet.in_channels = 2 * int(config.model.vae.latent_channels) + 1
  config.image_to_video = common.image_to_video_defaults()
  # The base's video-stage schedule (configs/shapes.py): logit-normal timesteps, where layout and
  # motion are decided; a lower learning rate, since the base is already trained.
  config.train.update(objective='image_to_video', init_from=base, trainable=('^unet/',),
                      num_steps=1500, learning_rate=5e-4, warmup_steps=100, ema_decay=0.99,
                      timestep_sampling='logit_normal', timestep_logit_mean=1.2,
                      timestep_logit_std=1.5, log_every=50, checkpoint_every=500,
                      keep_checkpoints=2, sample_every=0)
  return config
