r"""Image-to-video on moving_shapes: the first frame of a real clip given, the rest generated.

  python -m magicvideo_jax.eval.image_to_video --checkpoint magicvideo_jax/assets/shapes \
      --split test --num_prompts 64 [--json out.json]

For each of a split's first clips, frame 0 is given (`pipe(caption, image=frame0)`) and the video
generated from the clip's caption: an image-to-video checkpoint (configs/shapes_i2v.py, bundled as
magicvideo_jax/assets/shapes_i2v) is conditioned on the frame, any other video checkpoint holds it
as known latents. Prints the PSNR of the video's frame 0 against the given frame
(the VAE's reconstruction bounds it), the judge's accuracies on the prompt (motion: does the video
move as asked from where the given frame put the object), and how often the judged colour and shape
are the given frame's.
"""

import argparse
import sys
from typing import Dict

import numpy as np

from magicvideo_jax import eval as eval_lib
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.eval import judge
from magicvideo_jax.sampling.pipeline import MagicVideoPipeline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of uint8 images."""
  mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
  return float('inf') if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def evaluate(checkpoint: str, split: str = 'test', num_prompts: int = 64, batch_size: int = 16,
             seed: int = 0, steps=None) -> Dict[str, float]:
  pipe = MagicVideoPipeline.from_pretrained(checkpoint)
  config = moving_shapes.MovingShapesConfig(name='default')
  examples = [moving_shapes.make_example(split, i, config) for i in range(num_prompts)]
  firsts = np.stack([e['video'][0] for e in examples])
  prompts = [e['caption'] for e in examples]
  videos = []
  for start in range(0, num_prompts, batch_size):
    chunk, images = prompts[start:start + batch_size], firsts[start:start + batch_size]
    pad = batch_size - len(chunk)
    out = pipe(chunk + chunk[-1:] * pad, image=np.concatenate([images, images[-1:].repeat(pad, 0)]),
               num_inference_steps=steps, seed=seed + start)
    videos.append(out[:len(chunk)])
    print(f'generated {start + len(chunk)}/{num_prompts}', file=sys.stderr, flush=True)
  videos = np.concatenate(videos)
  scores = judge.score(videos, prompts)
  judgements = scores.pop('judgements')
  given = [(moving_shapes.COLOUR_NAMES[e['colour']], moving_shapes.SHAPES[e['shape']])
           for e in examples]
  scores.update(
      psnr_frame0=float(np.mean([psnr(v[0], f) for v, f in zip(videos, firsts)])),
      given_colour_and_shape=float(np.mean([(j['colour'], j['shape']) == g
                                            for j, g in zip(judgements, given)])),
      num_videos=num_prompts, split=split, checkpoint=checkpoint)
  return scores


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.eval.image_to_video',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--split', default='test', choices=moving_shapes.SPLITS)
  parser.add_argument('--num_prompts', type=int, default=64)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  if args.num_prompts < 1:
    print(f'{parser.prog}: error: --num_prompts={args.num_prompts} must be >= 1', file=sys.stderr)
    return 2
  scores = evaluate(args.checkpoint, args.split, args.num_prompts, seed=args.seed, steps=args.steps)
  print(f'{args.num_prompts} {args.split} clips, frame 0 given: PSNR of frame 0 '
        f'{scores["psnr_frame0"]:.2f} dB; judge colour {scores["colour_acc"]:.3f} shape '
        f'{scores["shape_acc"]:.3f} motion {scores["motion_acc"]:.3f} all {scores["all_acc"]:.3f} '
        f'consistency {scores["consistency"]:.3f}; the given colour and shape kept '
        f'{scores["given_colour_and_shape"]:.3f}')
  if args.json:
    eval_lib.write_json(args.json, scores)
  return 0


if __name__ == '__main__':
  sys.exit(main())
