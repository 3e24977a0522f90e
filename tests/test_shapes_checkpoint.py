"""Regression guard for the whole stack: the bundled shapes checkpoint still follows its prompts."""

import os

import pytest

from magicvideo_jax import demo
from magicvideo_jax.eval import judge
from magicvideo_jax.eval import shapes

COLOUR_FLOOR = 0.75  # The full evaluation (64 prompts) measures about 0.9+; see BENCHMARKS.md.


@pytest.fixture(scope='module')
def pipe():
  if not os.path.isfile(os.path.join(demo.DEFAULT_CHECKPOINT, 'config.json')):
    pytest.fail(f'the bundled checkpoint {demo.DEFAULT_CHECKPOINT} is missing: '
                'run `bash launch/train_shapes.sh` to produce it')
  from magicvideo_jax.pipeline import MagicVideoPipeline
  return MagicVideoPipeline.from_pretrained(demo.DEFAULT_CHECKPOINT)


def test_bundled_checkpoint_follows_validation_prompts(pipe):
  prompts = shapes.split_prompts('validation', 8)
  videos = shapes.generate(pipe, prompts, batch_size=8)
  assert videos.shape == (8, 16, 32, 32, 3)
  scores = judge.score(videos, prompts)
  scores.pop('judgements')
  print(judge.format_scores(scores, 'bundled checkpoint, 8 validation prompts'))
  assert scores['colour_acc'] >= COLOUR_FLOOR
