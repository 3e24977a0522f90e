"""Regression guard for the whole stack: the bundled shapes checkpoint still follows its prompts."""

import os

import pytest

from magicvideo_jax import demo
from magicvideo_jax.eval import judge
from magicvideo_jax.eval import shapes

# Floors well under what the full evaluation (64 prompts a split) measures; see BENCHMARKS.md.
COLOUR_FLOOR = 0.75
MOTION_FLOOR = 0.3  # Chance is 0.2.


@pytest.fixture(scope='module')
def pipe():
  if not os.path.isfile(os.path.join(demo.DEFAULT_CHECKPOINT, 'config.json')):
    pytest.fail(f'the bundled checkpoint {demo.DEFAULT_CHECKPOINT} is missing: '
                'run `bash launch/train_shapes.sh` to produce it')
  from magicvideo_jax.pipeline import MagicVideoPipeline
  return MagicVideoPipeline.from_pretrained(demo.DEFAULT_CHECKPOINT)


def test_bundled_checkpoint_follows_validation_prompts(pipe):
  prompts = shapes.split_prompts('validation', 16)
  videos = shapes.generate(pipe, prompts, batch_size=16)
  assert videos.shape == (16, 16, 32, 32, 3)
  scores = judge.score(videos, prompts)
  scores.pop('judgements')
  print(judge.format_scores(scores, 'bundled checkpoint, 16 validation prompts'))
  assert scores['colour_acc'] >= COLOUR_FLOOR
  assert scores['motion_acc'] >= MOTION_FLOOR
