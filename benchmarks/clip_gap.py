r"""How interchangeable a CLIP dual encoder's image and text embeddings are, on moving_shapes.

Stage 1 of the unsupervised recipe conditions the video model on the image embedding of one frame,
stage 2 on the text embedding of the caption: the second can only reuse what the first learned as far
as the two land in the same place. Prints mean cosine similarities (embeddings L2-normalised):

  image vs its own caption's text      the modality gap (1 would be interchangeable)
  image vs image, same caption         the spread within one caption's frames
  text vs text, captions differing only in motion / only in colour

and the stage-1 perturbation `config.model.conditioning.image_noise` (LAFITE's xi) whose cosine to
the clean image embedding, about 1/sqrt(1 + xi^2), equals the image-text cosine.

  python -m benchmarks.clip_gap --checkpoint runs/shapes_unsupervised/clip/model
"""

import argparse
import itertools
from typing import Dict, Sequence

import numpy as np


def similarities(checkpoint: str, split: str = 'validation', num_clips: int = 512,
                 seed: int = 0) -> Dict[str, float]:
  from magicvideo_jax.data import moving_shapes  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.eval import clip_zero_shot  # pylint: disable=g-import-not-at-top
  embed_text, embed_frames = clip_zero_shot.load_encoder(checkpoint)
  frames, truth = clip_zero_shot.sample_frames(split, num_clips, seed)
  captions = [moving_shapes.caption(moving_shapes.COLOUR_NAMES[c], moving_shapes.SHAPES[s],
                                    moving_shapes.MOTIONS[m]) for c, s, m in truth]
  image, text = embed_frames(frames), embed_text(captions)
  same_caption = np.equal.outer(captions, captions) & ~np.eye(num_clips, dtype=bool)

  combos = moving_shapes.all_combinations()  # (colour, shape, motion) names.
  all_text = embed_text([moving_shapes.caption(*c) for c in combos])

  def mean_over_pairs(differs_in: int) -> float:
    sims = [all_text[i] @ all_text[j] for i, j in itertools.combinations(range(len(combos)), 2)
            if [a != b for a, b in zip(combos[i], combos[j])] == [k == differs_in for k in range(3)]]
    return float(np.mean(sims))

  return {'image vs its own caption text': float(np.mean(np.sum(image * text, axis=-1))),
          'image vs image, same caption': float(np.mean((image @ image.T)[same_caption])),
          'text vs text, only motion differs': mean_over_pairs(2),
          'text vs text, only colour differs': mean_over_pairs(0)}


def main(argv: Sequence[str] = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.clip_gap', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help="a 'clip' run's exported model folder")
  parser.add_argument('--split', default='validation', choices=('train', 'validation', 'test'))
  parser.add_argument('--num_clips', type=int, default=512)
  args = parser.parse_args(argv)
  sims = similarities(args.checkpoint, args.split, args.num_clips)
  for name, value in sims.items():
    print(f'  cos({name}): {value:.3f}')
  xi = matching_image_noise(sims['image vs its own caption text'])
  print(f'  image_noise matching the gap: {xi:.2f}')


def matching_image_noise(cosine: float) -> float:
  """xi with 1/sqrt(1 + xi^2) = cosine (in many dimensions a random direction is nearly
  orthogonal to the embedding)."""
  if not 0.0 < cosine <= 1.0:
    raise ValueError(f'no perturbation gives cosine {cosine:.3f}: it must be in (0, 1]')
  return float(np.sqrt(1.0 / cosine**2 - 1.0))


if __name__ == '__main__':
  main()
