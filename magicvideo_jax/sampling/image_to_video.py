"""Image-to-video with a trained first-frame model: the interpolation stage's mechanism with one given
frame (docs/DESIGN.md section 9).

The model is the video U-Net (`models/unet.py`) with `in_channels = 2 c + 1`; at every frame it sees

    [noisy latents (c) | condition latents (c) | mask (1)]

where the mask is 1 at frame 0 only and the condition latents are (`config.image_to_video.condition`)
frame 0's latents at every frame ('nearest', the default: as interpolation's nearest keyframe, every
frame has a spatially aligned copy of the given frame in its own input channels, where the per-frame
convolutions can copy the object from) or at frame 0 alone ('zeros': the rest must arrive through
temporal attention). MagicVideo's directed temporal attention suits it: every frame sees frame 0.

Weight reuse: `config.train.init_from` = a base video model folder; `unet/conv_in/kernel` grows along
its input channels with zeros (`weights.surgery.grow_weight`), so at init the model is the base.
Training: `config.train.objective = 'image_to_video'` (`losses.image_to_video_loss`): the diffusion
loss on all frames with the clip's own frame 0 as the condition (frame 0's loss weighted by
`config.image_to_video.first_frame_loss_weight`). Sampling: `MagicVideoPipeline` on such a folder
(`pipe(prompt, image=first)`, `sample --image`): the condition is concatenated at every step, the
same in both halves of classifier-free guidance (guidance on the text only), and the given frame
is also held as a known latent frame (each step sees it noised to its level, as in training), so the
video's frame 0 is the given frame's VAE reconstruction.
"""

import ml_collections
import numpy as np
import jax

from magicvideo_jax.sampling import interpolation

CONDITION_MODES = interpolation.CONDITION_MODES


def is_image_to_video_config(config: ml_collections.ConfigDict) -> bool:
  return config.get('image_to_video', None) is not None


def given_mask(num_frames: int) -> np.ndarray:
  """bool `[F]`: True at frame 0, the given one."""
  if num_frames < 2:
    raise ValueError(f'image-to-video needs at least 2 frames (frame 0 is given), got {num_frames}')
  return np.arange(num_frames) == 0


def make_condition(first_latents: jax.Array, num_frames: int, mode: str = 'nearest') -> jax.Array:
  """Frame 0's latents `[B, h, w, c]` -> the condition `[B, F, h, w, c + 1]` (module docstring)."""
  return interpolation.condition_from_given(first_latents[:, None], np.zeros(num_frames, int),
                                            given_mask(num_frames), mode)


def condition_from_clip(latents: jax.Array, mode: str = 'nearest') -> jax.Array:
  """The condition of a clip `[B, F, h, w, c]`: built from its frame 0 only."""
  return make_condition(latents[:, 0], latents.shape[1], mode)


def check_unet(config: ml_collections.ConfigDict) -> None:
  """A ValueError naming the config keys when the U-Net cannot take latents + condition."""
  interpolation.check_condition_channels(config, 'an image-to-video U-Net', 'first-frame latents')
  mode = config.image_to_video.get('condition', 'nearest')
  if mode not in CONDITION_MODES:
    raise ValueError(f'config.image_to_video.condition={mode!r}; valid: {", ".join(CONDITION_MODES)}')
