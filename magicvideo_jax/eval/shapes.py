r"""Prompt adherence of a checkpoint on moving_shapes prompts, scored by the judge.

  python -m magicvideo_jax.eval.shapes --checkpoint magicvideo_jax/assets/shapes \
      --split test --num_prompts 64 [--steps 25 --guidance_scale 4 --json scores.json]

Prompts are the captions of the first `num_prompts` clips of a split (the test split's colour-shape-motion
combinations never occur in training). Prints colour / shape / motion / all-three accuracy and the
frame-to-frame consistency, with chance levels beside them.
"""

import argparse
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from magicvideo_jax import eval as eval_lib
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.eval import judge
from magicvideo_jax.sampling.pipeline import MagicVideoPipeline


def split_prompts(split: str, num_prompts: int, seed: int = 0) -> List[str]:
  """Captions of the first `num_prompts` clips of a moving_shapes split (default config)."""
  config = moving_shapes.MovingShapesConfig(name='default', seed=seed)
  prompts = []
  for index in range(num_prompts):
    example = moving_shapes.make_example(split, index, config)
    caption = example['caption']
    prompts.append(caption.decode() if isinstance(caption, bytes) else str(caption))
  return prompts


def generate(pipe, prompts: Sequence[str], *, batch_size: int = 16, num_frames: Optional[int] = None,
             steps: Optional[int] = None, guidance_scale: Optional[float] = None, seed: int = 0,
             sampler: Optional[str] = 'ddim', video_vae: bool = True, **settings) -> np.ndarray:
  """`[N, F, H, W, 3]` uint8 videos, `batch_size` prompts per call (one compile); settings left None
  take the checkpoint's defaults (sampling/request.py); `settings` go to the pipeline as they are
  (e.g. long_video)."""
  videos = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    pad = batch_size - len(chunk)
    out = pipe(chunk + chunk[-1:] * pad, num_frames=num_frames,
               num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed + start,
               sampler=sampler, **({} if video_vae else {'use_video_vae': False}), **settings)
    videos.append(out[:len(chunk)])
  return np.concatenate(videos, axis=0)


def evaluate(checkpoint: str, split: str = 'test', num_prompts: int = 64, **kwargs) -> Dict[str, float]:
  pipe = MagicVideoPipeline.from_pretrained(checkpoint)
  prompts = split_prompts(split, num_prompts)
  videos = generate(pipe, prompts, **kwargs)
  scores = judge.score(videos, prompts)
  scores.pop('judgements', None)
  return scores


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.eval.shapes', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--split', default='test', choices=('train', 'validation', 'test'))
  parser.add_argument('--num_prompts', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--guidance_scale', type=float, default=None)
  parser.add_argument('--sampler', default='ddim')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_frames', type=int, default=None)
  parser.add_argument('--no_video_vae', action='store_true', help='decode frame by frame')
  parser.add_argument('--json', default=None, help='also write the scores to this file')
  args = parser.parse_args(argv)
  t0 = time.time()
  scores = evaluate(args.checkpoint, args.split, args.num_prompts, batch_size=args.batch_size,
                    steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                    seed=args.seed, num_frames=args.num_frames, video_vae=not args.no_video_vae)
  print(judge.format_scores(scores, f'{args.checkpoint} on {args.num_prompts} {args.split} prompts'))
  print(f'({time.time() - t0:.0f} s)', file=sys.stderr)
  if args.json:
    eval_lib.write_json(args.json, {k: v for k, v in scores.items() if isinstance(v, (int, float))})
  return 0


if __name__ == '__main__':
  sys.exit(main())
