"""Regression guard for the whole stack: the bundled shapes checkpoint still follows its prompts."""

import os

import pytest

from magicvideo_jax import demo
from magicvideo_jax.eval import judge
from magicvideo_jax.eval import shapes

# Floors well under what the full evaluation (64 prompts a split) measures; see BENCHMARKS.md.
COLOUR_FLOOR = 0.85
MOTION_FLOOR = 0.7  # Chance is 0.2.
SHAPE_FLOOR = 0.6  # Chance is 0.25.
NUM_PROMPTS = 16  # One batch.


@pytest.fixture(scope='module')
def pipe():
  if not os.path.isfile(os.path.join(demo.DEFAULT_CHECKPOINT, 'config.json')):
    pytest.fail(f'the bundled checkpoint {demo.DEFAULT_CHECKPOINT} is missing: '
                'run `bash launch/train_shapes.sh` to produce it')
  from magicvideo_jax.sampling.pipeline import MagicVideoPipeline
  return MagicVideoPipeline.from_pretrained(demo.DEFAULT_CHECKPOINT)


def _validation_scores(pipe, name):
  """The judge's scores of `pipe` on the first NUM_PROMPTS validation prompts (one batch)."""
  prompts = shapes.split_prompts('validation', NUM_PROMPTS)
  videos = shapes.generate(pipe, prompts, batch_size=NUM_PROMPTS)
  assert videos.shape == (NUM_PROMPTS, 16, 32, 32, 3)
  scores = judge.score(videos, prompts)
  scores.pop('judgements')
  print(judge.format_scores(scores, f'{name}, {NUM_PROMPTS} validation prompts'))
  return scores


@pytest.mark.slow
def test_bundled_checkpoint_follows_validation_prompts(pipe):
  scores = _validation_scores(pipe, 'bundled checkpoint')
  assert scores['colour_acc'] >= COLOUR_FLOOR
  assert scores['motion_acc'] >= MOTION_FLOOR
  assert scores['shape_acc'] >= SHAPE_FLOOR


def test_recipe_chains_its_stages_and_matches_the_bundle():
  """Each video stage starts from the one before; the bundle was made by this config's model."""
  from configs import shapes as shapes_config
  from magicvideo_jax.weights import checkpoint
  chain = ('image', 'video') + shapes_config.RESTARTS
  for previous, stage in zip(chain, chain[1:]):
    assert shapes_config.get_config(stage).train.init_from == f'runs/shapes/{previous}/model'
  bundled = checkpoint.load_config(demo.DEFAULT_CHECKPOINT)
  config = shapes_config.get_config(shapes_config.RESTARTS[-1])
  for section in ('unet', 'text_encoder'):
    assert bundled.model[section].to_dict() == config.model[section].to_dict(), section
  assert bundled.diffusion.to_dict() == config.diffusion.to_dict()


def test_quick_recipe_is_the_same_model_on_a_smaller_budget():
  """`STAGE,quick` changes step counts only; its image_long ablation has the quick image + video budget."""
  from configs import shapes as shapes_config
  for stage in shapes_config.QUICK_STAGES[:-1]:
    steps = shapes_config.QUICK_STEPS[stage]
    full, quick = shapes_config.get_config(stage), shapes_config.get_config(f'{stage},quick')
    assert quick.train.num_steps == steps < full.train.num_steps
    quick.train.num_steps = full.train.num_steps
    assert quick.to_dict() == full.to_dict(), stage
  ablation = shapes_config.get_config('image_long,quick')
  assert ablation.train.num_steps == (shapes_config.QUICK_STEPS['image'] +
                                      shapes_config.QUICK_STEPS['video'])
  with pytest.raises(ValueError, match='quick recipe has the stages'):
    shapes_config.get_config('video2,quick')


CMD_CHECKPOINT = os.path.join(os.path.dirname(demo.DEFAULT_CHECKPOINT), 'shapes_cmd')
# Under the CMD bundle's 64-prompt validation scores (1.00 / 0.73 / 1.00), BENCHMARKS.md.
CMD_FLOORS = dict(colour=0.85, shape=0.5, motion=0.8)


@pytest.mark.slow
def test_bundled_cmd_checkpoint_follows_validation_prompts():
  """The CMD bundle (configs/cmd_shapes.py) through the same pipeline API and judge."""
  from magicvideo_jax.sampling.pipeline import CMDPipeline, MagicVideoPipeline
  pipe = MagicVideoPipeline.from_pretrained(CMD_CHECKPOINT)
  assert isinstance(pipe, CMDPipeline)
  scores = _validation_scores(pipe, 'bundled CMD checkpoint')
  assert scores['colour_acc'] >= CMD_FLOORS['colour']
  assert scores['shape_acc'] >= CMD_FLOORS['shape']
  assert scores['motion_acc'] >= CMD_FLOORS['motion']


def test_cmd_recipe_matches_the_cmd_bundle():
  """The CMD bundle was made by configs/cmd_shapes.py's model, its stages chained by init_from."""
  from configs import cmd_shapes
  from magicvideo_jax.weights import checkpoint
  assert cmd_shapes.get_config('content').train.init_from == 'runs/cmd_shapes/ae/model'
  assert cmd_shapes.get_config('motion').train.init_from == 'runs/cmd_shapes/content/model'
  bundled = checkpoint.load_config(CMD_CHECKPOINT)
  config = cmd_shapes.get_config('motion')
  assert bundled.model.to_dict() == config.model.to_dict()
  assert bundled.diffusion.to_dict() == config.diffusion.to_dict()


I2V_CHECKPOINT = os.path.join(os.path.dirname(demo.DEFAULT_CHECKPOINT), 'shapes_i2v')
# Under the image-to-video bundle's 64-clip validation scores (BENCHMARKS.md, "Image-to-video").
I2V_FLOORS = dict(psnr_frame0=26.0, motion_acc=0.7, given_colour_and_shape=0.75)


@pytest.mark.slow
def test_bundled_image_to_video_checkpoint_keeps_the_given_frame():
  """The image-to-video bundle (configs/shapes_i2v.py) on the first frames of 16 validation clips:
  frame 0 kept, the prompt's motion made, the given colour and shape kept."""
  from magicvideo_jax.eval import image_to_video
  scores = image_to_video.evaluate(I2V_CHECKPOINT, 'validation', NUM_PROMPTS)
  print({k: scores[k] for k in ('psnr_frame0', 'motion_acc', 'given_colour_and_shape')})
  for key, floor in I2V_FLOORS.items():
    assert scores[key] >= floor, (key, scores[key])


def test_i2v_recipe_matches_the_i2v_bundle():
  """The image-to-video bundle was made by configs/shapes_i2v.py's model from the shapes bundle."""
  from configs import shapes_i2v
  from magicvideo_jax.weights import checkpoint
  config = shapes_i2v.get_config()
  assert demo.DEFAULT_CHECKPOINT.endswith(os.path.normpath(config.train.init_from))
  bundled = checkpoint.load_config(I2V_CHECKPOINT)
  assert bundled.model.to_dict() == config.model.to_dict()
  assert bundled.image_to_video.to_dict() == config.image_to_video.to_dict()
  assert bundled.diffusion.to_dict() == config.diffusion.to_dict()
