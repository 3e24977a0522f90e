r"""How well a super-resolution stage restores real moving_shapes clips, against bilinear upsampling.

Renders N test clips at the upscaler's output resolution (`config.data`), area-averages them by its
factor, upscales them back (bilinear; the SR model at each `--strength`, see `VideoUpscaler.__call__`)
and prints, for each way back:

  psnr          of the output against the real high-resolution clips (dB, pixels in [0, 1]),
  lowres_psnr   of the output area-averaged again against the low-resolution input (is it kept?),
  consistency, all_acc   the judge's (`magicvideo_jax.eval.judge`) against the clips' captions.

  python -m benchmarks.sr_fidelity --upscaler runs/shapes_cascade/upscaler/model --strength 1 0.5 0.3
"""

import argparse
import sys
import time
from typing import Dict, Sequence

import numpy as np


def real_clips(config, split: str, num_clips: int):
  """(videos `[N, F, H, W, 3]` float in [0, 1], captions) at the upscaler's training format."""
  from magicvideo_jax.data import moving_shapes  # pylint: disable=g-import-not-at-top
  shapes = moving_shapes.MovingShapesConfig(name='sr_fidelity', resolution=int(config.data.resolution),
                                            num_frames=int(config.data.num_frames))
  examples = [moving_shapes.make_example(split, i, shapes) for i in range(num_clips)]
  videos = np.stack([e['video'] for e in examples]).astype(np.float32) / 255.0
  return videos, [e['caption'] for e in examples]


def measure(upscaler_dir: str, strengths: Sequence[float], *, split: str = 'test',
            num_clips: int = 32, batch_size: int = 8, seed: int = 0) -> Dict[str, Dict[str, float]]:
  from magicvideo_jax.sampling import upscaler as upscaler_lib  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.eval import cascade  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.eval import judge  # pylint: disable=g-import-not-at-top
  model = upscaler_lib.VideoUpscaler.from_pretrained(upscaler_dir)
  videos, captions = real_clips(model.config, split, num_clips)
  factor = model.vae_factor
  low_res = upscaler_lib.downsample(videos, factor)
  outputs = {'bilinear': cascade.bilinear_upsample(low_res, factor)}
  for strength in strengths:
    parts = []
    for start in range(0, num_clips, batch_size):
      chunk = slice(start, start + batch_size)
      parts.append(model(2.0 * low_res[chunk] - 1.0, captions[chunk], strength=strength,
                         seed=seed + start))
    outputs[f'SR strength {strength:g}'] = np.concatenate(parts)
  results = {}
  for name, out in outputs.items():
    scores = judge.score(out, captions)
    results[name] = dict(psnr=cascade.psnr(out, videos),
                         lowres_psnr=cascade.psnr(upscaler_lib.downsample(out, factor), low_res),
                         consistency=scores['consistency'], all_acc=scores['all_acc'])
  real = judge.score(videos, captions)
  results['real clips'] = dict(psnr=float('inf'), lowres_psnr=float('inf'),
                               consistency=real['consistency'], all_acc=real['all_acc'])
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.sr_fidelity', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--upscaler', required=True, help='super-resolution model folder')
  parser.add_argument('--strength', type=float, nargs='+', default=[1.0])
  parser.add_argument('--split', default='test', choices=('train', 'validation', 'test'))
  parser.add_argument('--num_clips', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=8)
  args = parser.parse_args(argv)
  t0 = time.time()
  results = measure(args.upscaler, args.strength, split=args.split, num_clips=args.num_clips,
                    batch_size=args.batch_size)
  print(f'{args.num_clips} {args.split} clips, upscaled {args.upscaler}')
  print(f'{"way back":<20}{"psnr":>8}{"lowres_psnr":>13}{"consistency":>13}{"all_acc":>9}')
  for name, r in results.items():
    print(f'{name:<20}{r["psnr"]:>8.2f}{r["lowres_psnr"]:>13.2f}{r["consistency"]:>13.3f}'
          f'{r["all_acc"]:>9.3f}')
  print(f'({time.time() - t0:.0f} s)', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
