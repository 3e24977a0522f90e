r"""Zero-shot attribute accuracy of a CLIP dual encoder on moving_shapes frames.

  python -m magicvideo_jax.eval.clip_zero_shot --checkpoint runs/shapes_unsupervised/clip/model \
      [--split validation --num_clips 512 --json scores.json]

One frame of each clip (a seeded random one) is embedded by the vision tower and matched against the
text embeddings of all 140 captions (7 colours x 4 shapes x 5 motions); the best caption's colour,
shape and motion are compared with the clip's. A single frame shows colour and shape but not motion,
so motion should stay near chance (0.20): what stage 1 (conditioning on one frame's embedding) can
teach the video model about motion has to come from elsewhere. The checkpoint is the export of a
'clip' objective run (configs/shapes_unsupervised.py:clip), or any folder of ours with
`config.model.clip` and a tokenizer.
"""

import argparse
import sys
from typing import Callable, Dict, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from magicvideo_jax import eval as eval_lib
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.models import clip as clip_lib
from magicvideo_jax.models import clip_vision
from magicvideo_jax.models import conditioning
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import clip as clip_weights


def load_encoder(checkpoint: str) -> Tuple[Callable, Callable]:
  """`(embed_text(captions), embed_frames(uint8 frames [N, H, W, 3]))` of a dual encoder.

  Both return L2-normalised embeddings `[N, D]` as numpy arrays. `checkpoint` is a pretrained folder
  or a workdir holding one in `model/`.
  """
  folder = ckpt_lib.model_folder(checkpoint) or checkpoint
  config = ckpt_lib.load_config(folder)
  clip_config, params = clip_weights.load_dual_encoder(folder)
  tokenizer = ckpt_lib.load_tokenizer(folder, config)
  apply = jax.jit(clip_lib.build_clip(ml_collections.ConfigDict(dict(clip=clip_config))).apply)

  def embed_text(captions: Sequence[str]) -> np.ndarray:
    return np.asarray(conditioning.normalize_embedding(
        apply({'params': params}, tokenizer(list(captions))).text_embeds))

  def embed_frames(frames: np.ndarray) -> np.ndarray:
    pixels = clip_vision.preprocess(frames, clip_config['vision']['image_size'])
    return np.asarray(conditioning.normalize_embedding(
        apply({'params': params}, None, pixels).image_embeds))

  return embed_text, embed_frames


def sample_frames(split: str, num_clips: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """One seeded random frame of each of a split's first `num_clips` clips `[N, H, W, 3]`, and the
  clips' (colour, shape, motion) indices `[N, 3]`."""
  data_config = moving_shapes.MovingShapesConfig(name='default')
  rng = np.random.default_rng(seed)
  frames, truth = [], []
  for index in range(num_clips):
    example = moving_shapes.make_example(split, index, data_config)
    frames.append(example['video'][rng.integers(len(example['video']))])
    truth.append((example['colour'], example['shape'], example['motion']))
  return np.stack(frames), np.array(truth)


def evaluate(checkpoint: str, split: str = 'validation', num_clips: int = 512,
             seed: int = 0) -> Dict[str, float]:
  """{'colour_acc', 'shape_acc', 'motion_acc', 'all_acc', 'num_clips'} of the dual encoder."""
  embed_text, embed_frames = load_encoder(checkpoint)
  combos = moving_shapes.all_combinations()
  text = embed_text([moving_shapes.caption(*c) for c in combos])
  frames, truth = sample_frames(split, num_clips, seed)
  best = np.argmax(embed_frames(frames) @ text.T, axis=-1)
  predicted = np.array([(moving_shapes.COLOUR_NAMES.index(combos[b][0]),
                         moving_shapes.SHAPES.index(combos[b][1]),
                         moving_shapes.MOTIONS.index(combos[b][2])) for b in best])
  hits = predicted == truth
  return dict(colour_acc=float(hits[:, 0].mean()), shape_acc=float(hits[:, 1].mean()),
              motion_acc=float(hits[:, 2].mean()), all_acc=float(hits.all(axis=1).mean()),
              num_clips=num_clips)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m magicvideo_jax.eval.clip_zero_shot',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--split', default='validation', choices=('train', 'validation', 'test'))
  parser.add_argument('--num_clips', type=int, default=512)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='also write the scores to this file')
  args = parser.parse_args(argv)
  scores = evaluate(args.checkpoint, args.split, args.num_clips, args.seed)
  chance = dict(colour_acc=1 / 7, shape_acc=1 / 4, motion_acc=1 / 5, all_acc=1 / 140)
  print(f'{args.checkpoint}: zero-shot on one frame of {args.num_clips} {args.split} clips')
  for key, value in chance.items():
    print(f'  {key:<11} {scores[key]:6.3f}  (chance {value:.3f})')
  if args.json:
    eval_lib.write_json(args.json, scores)
  return 0


if __name__ == '__main__':
  sys.exit(main())
