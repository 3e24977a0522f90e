r"""The VDM baseline network applied to 16 frames of 256x256 pixels (MagicVideo's output size).

MagicVideo compares its 256x256 latent model with VDM; VDM itself generates 64x64 and upsamples with
further models, so "VDM at 256x256" needs a choice. Two readings, as variants:

- 'same' (default): the *same network*, weight for weight: the configs/vdm_64.py U-Net (4 levels,
  multipliers 1, 2, 4, 8) is fully convolutional and runs unchanged on 256x256 inputs. Its levels now
  sit at 256/128/64/32 and the attention blocks stay on the levels they belong to (the design
  resolutions 32/16/8 of `attention_resolutions` are relative to `resolution=64`), i.e. attention runs
  at 128/64/32. Same parameter count as vdm_64; the cost grows 16x for convs and up to 256x for
  spatial attention (its sequence is 16x longer). This is the literal "same network at 256x256" and
  the default.
- 'absolute': attention only at the absolute resolutions 32/16/8 (the sequence lengths VDM's
  attention was designed for). That needs two extra, attention-free 256-channel levels on top
  (multipliers 1, 1, 1, 2, 4, 8; levels at 256/128/64/32/16/8): the original network below them,
  with about 5% more parameters. The cheaper, "what one would build" reading.

  python -m magicvideo_jax.flops --config=configs/vdm_256.py            # same network
  python -m magicvideo_jax.flops --config=configs/vdm_256.py:absolute
"""

import ml_collections

from magicvideo_jax.configs import vdm_64


def get_config(variant: str = 'same') -> ml_collections.ConfigDict:
  variant = variant or 'same'
  variants = ('same', 'absolute')
  if variant not in variants:
    raise ValueError(f'configs/vdm_256.py:{variant}: unknown variant; choose one of {variants}')
  config = vdm_64.vdm_config(256)
  if variant == 'absolute':
    config.model.vdm.update(channel_mult=(1, 1, 1, 2, 4, 8), resolution=256)
  return config
