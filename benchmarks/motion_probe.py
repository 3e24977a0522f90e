r"""Where a video model decides motion: the mean object trajectory of its x0 prediction from noise.

For each prompt, `--samples` pure-noise latents at t = T - 1 go through the U-Net once; the
predicted clean latents are decoded and the object's centroid (brightness above the frame's median)
is averaged over the samples, frame by frame. A model that has not learned motion gives the same
flat trajectory for every motion word; one that has, a trajectory that follows the prompt.
Meaningful with zero terminal SNR schedules, where x_{T-1} is pure noise.

  python -m benchmarks.motion_probe --checkpoint magicvideo_jax/assets/shapes
"""

import argparse
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PROMPTS = ('a red circle moving left', 'a red circle moving right', 'a red circle moving up',
           'a red circle moving down')


def mean_trajectory(pipe, prompt: str, samples: int, seed: int = 0) -> np.ndarray:
  """`[frames, 2]`: the mean (x, y) centroid, as fractions of the frame, of the x0 prediction."""
  from magicvideo_jax import context as context_lib  # pylint: disable=g-import-not-at-top
  from magicvideo_jax import diffusion  # pylint: disable=g-import-not-at-top
  config = pipe.config
  res, frames = int(config.data.resolution), int(config.data.num_frames)
  shape = (samples, frames, res // pipe.vae_factor, res // pipe.vae_factor, pipe.latent_channels)
  noise = jax.random.normal(jax.random.key(seed), shape)
  ids = jnp.asarray(pipe.tokenizer([prompt] * samples))
  context = context_lib.text_context(config.model, pipe.modules, pipe.params, ids)
  t = jnp.full((samples,), pipe.schedule.num_train_timesteps - 1)
  fps = jnp.full((samples,), float(config.data.get('fps', 8.0)))
  out = pipe.modules['unet'].apply({'params': pipe.params['unet']}, noise, t, context, fps=fps)
  x0 = diffusion.predict_x0_eps(pipe.schedule, noise, out, t)[0]
  # A soft, brightness-weighted centroid: x0 predictions at t = T - 1 are blurry means, which the
  # judge's hard segmentation (eval/judge.py) would often reject as no object.
  weight = np.asarray(pipe.decode(x0, False), np.float32).mean(-1)  # [B, F, H, W] brightness
  weight = np.maximum(weight - np.median(weight, axis=(2, 3), keepdims=True), 0)
  ys, xs = np.mgrid[0:res, 0:res] / res
  total = weight.sum((2, 3)) + 1e-6
  centroid = np.stack([(weight * xs).sum((2, 3)) / total, (weight * ys).sum((2, 3)) / total], -1)
  return centroid.mean(0)


def main(argv: Sequence[str] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.motion_probe', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--samples', type=int, default=16)
  parser.add_argument('--prompt', action='append', default=None)
  args = parser.parse_args(argv)
  from magicvideo_jax.sampling.pipeline import MagicVideoPipeline  # pylint: disable=g-import-not-at-top
  pipe = MagicVideoPipeline.from_pretrained(args.checkpoint)
  for prompt in args.prompt or PROMPTS:
    trajectory = mean_trajectory(pipe, prompt, args.samples)[::3]
    print(f'{prompt:<28} x: {np.round(trajectory[:, 0], 2)}  y: {np.round(trajectory[:, 1], 2)}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
