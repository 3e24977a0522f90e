r"""Long videos from a shapes checkpoint, judged window by window.

  python -m magicvideo_jax.eval.long_video --checkpoint magicvideo_jax/assets/shapes \
      --num_frames 64 --num_prompts 32 [--overlap 8 --split validation --json out.json]

Generates `num_frames`-frame videos (`long_video='causal'`) for the captions of a split's first
clips and judges each aligned window of the model's length (frames 0-15, 16-31, ...) for colour,
shape and motion, and its frame-to-frame consistency. The first window is one sampler call; every
later one holds points where the generation continued from earlier frames (every
window - overlap frames), so "first window" vs "later windows" (and the windows straddling two
aligned ones, frames 8-23, 24-39, ...) compares consistency inside one generation with
consistency across seams. Also: the fraction of videos whose judged colour and shape are the same
in every window.
"""

import argparse
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from magicvideo_jax import eval as eval_lib
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.eval import judge
from magicvideo_jax.eval import shapes as shapes_eval
from magicvideo_jax.sampling import long_video
from magicvideo_jax.sampling.pipeline import MagicVideoPipeline


def score_windows(videos: np.ndarray, prompts: Sequence[str], window: int) -> Dict[str, object]:
  """Per-window judge scores of `[N, T, H, W, 3]` videos (T a multiple of `window`)."""
  n, frames = videos.shape[:2]
  count = frames // window
  per_window = []
  identity = np.zeros((n, count), object)
  for w in range(count):
    scores = judge.score(videos[:, w * window:(w + 1) * window], prompts)
    for i, j in enumerate(scores.pop('judgements')):
      identity[i, w] = (j['colour'], j['shape'])
    per_window.append(scores)
  seams = [judge.score(videos[:, w * window + window // 2:(w + 1) * window + window // 2], prompts)
           for w in range(count - 1)]
  for scores in seams:
    scores.pop('judgements')
  kept = float(np.mean([len(set(row)) == 1 for row in identity]))
  later = [s['consistency'] for s in per_window[1:]]
  return dict(
      windows=per_window, straddling=seams,
      consistency_first_window=per_window[0]['consistency'],
      consistency_later_windows=float(np.mean(later)) if later else None,
      consistency_straddling=float(np.mean([s['consistency'] for s in seams])) if seams else None,
      colour_and_shape_kept=kept)


def evaluate(checkpoint: str, num_frames: int = 64, num_prompts: int = 32, split: str = 'validation',
             overlap: Optional[int] = None, steps: Optional[int] = None, seed: int = 0,
             batch_size: int = 16) -> Dict[str, object]:
  pipe = MagicVideoPipeline.from_pretrained(checkpoint)
  window = pipe.max_frames
  if num_frames % window:
    raise ValueError(f'--num_frames={num_frames} must be a multiple of the model\'s {window} frames')
  overlap = long_video.check(window, num_frames, overlap)
  prompts = shapes_eval.split_prompts(split, num_prompts)
  videos = shapes_eval.generate(pipe, prompts, batch_size=batch_size, num_frames=num_frames,
                                steps=steps, seed=seed, sampler=None, long_video='causal',
                                long_video_overlap=overlap)
  result = score_windows(videos, prompts, window)
  result.update(checkpoint=checkpoint, num_frames=num_frames, num_prompts=len(prompts), split=split,
                overlap=overlap)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.eval.long_video',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--num_frames', type=int, default=64)
  parser.add_argument('--num_prompts', type=int, default=32)
  parser.add_argument('--split', default='validation', choices=moving_shapes.SPLITS)
  parser.add_argument('--overlap', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None)
  args = parser.parse_args(argv)
  try:
    result = evaluate(args.checkpoint, args.num_frames, args.num_prompts, args.split, args.overlap,
                      args.steps, args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 2
  print('| window | colour | shape | motion | all three | consistency |')
  print('| --- | --- | --- | --- | --- | --- |')
  window = args.num_frames // len(result['windows'])
  for w, s in enumerate(result['windows']):
    print(f'| frames {w * window}-{(w + 1) * window - 1} | {s["colour_acc"]:.3f} | '
          f'{s["shape_acc"]:.3f} | {s["motion_acc"]:.3f} | {s["all_acc"]:.3f} | '
          f'{s["consistency"]:.3f} |')
  print(f'consistency: first window (one generation) {result["consistency_first_window"]:.3f}, '
        f'later windows {result["consistency_later_windows"]:.3f}, straddling windows '
        f'{result["consistency_straddling"]:.3f}; colour and shape the same in every window: '
        f'{result["colour_and_shape_kept"]:.3f}')
  if args.json:
    eval_lib.write_json(args.json, result)
  return 0


if __name__ == '__main__':
  sys.exit(main())
