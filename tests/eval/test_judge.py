"""The moving-shapes judge on the dataset's own held-out test clips, degraded clips and noise.

Run with `pytest -s` to see the score tables.
"""

import json

import numpy as np
import pytest
from scipy import ndimage

from magicvideo_jax.data import moving_shapes as ms
from magicvideo_jax.eval import judge

CONFIG = ms.MovingShapesConfig(name='judge', num_frames=16, resolution=32, test_size=96, seed=0)


@pytest.fixture(scope='module')
def test_clips():
  examples = list(ms.generate_split('test', CONFIG))
  return np.stack([e['video'] for e in examples]), [e['caption'] for e in examples]


def _degrade(videos, rng, sigma, noise):
  """Blur (sigma in pixels at 32x32) and Gaussian noise, like imperfect model samples."""
  scale = videos.shape[2] / 32
  blurred = ndimage.gaussian_filter(videos.astype(np.float64),
                                    (0, 0, sigma * scale, sigma * scale, 0))
  return np.clip(np.round(blurred + rng.normal(0.0, noise, videos.shape)), 0, 255).astype(np.uint8)


def test_real_test_clips(test_clips):
  videos, captions = test_clips
  scores = judge.score(videos, captions)
  print('\n' + judge.format_scores(scores, 'moving_shapes test split, 16x32x32'))
  for key in ('colour_acc', 'shape_acc', 'motion_acc', 'all_acc'):
    assert scores[key] >= 0.95, (key, scores[key])
  assert scores['consistency'] >= 0.85


@pytest.mark.parametrize('resolution', [32, 64])
def test_degraded_clips(resolution):
  config = ms.MovingShapesConfig(name='judge', num_frames=8, resolution=resolution, test_size=48,
                                 seed=1)
  examples = list(ms.generate_split('test', config))
  videos = _degrade(np.stack([e['video'] for e in examples]), np.random.default_rng(0),
                    sigma=0.8, noise=20.0)
  scores = judge.score(videos, [e['caption'] for e in examples])
  print('\n' + judge.format_scores(scores, f'blurred (0.8 px) + noise (std 20), 8x{resolution}px'))
  for key in ('colour_acc', 'shape_acc', 'motion_acc'):
    assert scores[key] >= 0.9, (key, scores[key])


@pytest.mark.parametrize('kind', ['uniform', 'smooth'])
def test_noise_is_near_chance(test_clips, kind):
  _, captions = test_clips
  rng = np.random.default_rng(1)
  shape = (len(captions), 16, 32, 32, 3)
  if kind == 'uniform':
    noise = rng.integers(0, 256, size=shape, dtype=np.uint8)
  else:  # Blobs: spatially correlated noise.
    noise = _degrade(rng.normal(128.0, 80.0, size=shape), rng, sigma=1.5, noise=0.0)
  scores = judge.score(noise, captions)
  print('\n' + judge.format_scores(scores, f'{kind} noise'))
  chance = judge.chance_levels()
  for key in ('colour_acc', 'shape_acc', 'motion_acc'):
    assert scores[key] <= chance[key] + 0.1, (key, scores[key])
  assert scores['all_acc'] <= 0.05
  assert scores['consistency'] <= 0.3


def test_wrong_prompts_score_low(test_clips):
  """The judge reads the video, not the prompt: shuffled prompts drop to about chance."""
  videos, captions = test_clips
  shuffled = [captions[i] for i in np.random.default_rng(2).permutation(len(captions))]
  scores = judge.score(videos, shuffled)
  print('\n' + judge.format_scores(scores, 'test clips with shuffled prompts'))
  assert scores['all_acc'] <= 0.2
  for key in ('colour_acc', 'shape_acc', 'motion_acc'):
    assert scores[key] <= 0.5, (key, scores[key])


def test_every_shape_and_motion():
  rng = np.random.default_rng(3)
  for i, (shape, motion) in enumerate(
      [(s, m) for s in ms.SHAPES for m in ms.MOTIONS]):
    colour = ms.COLOUR_NAMES[i % len(ms.COLOUR_NAMES)]
    video, _ = ms.render_clip(colour, shape, motion, num_frames=8, resolution=48, rng=rng)
    result = judge.judge_video(video)
    assert (result['colour'], result['shape'], result['motion']) == (colour, shape, motion)
    assert 0.0 <= result['consistency'] <= 1.0 and result['present'] == 1.0


def test_consistency_penalises_flicker(test_clips):
  videos = test_clips[0][:32]
  rng = np.random.default_rng(4)

  def mean_consistency(vs):
    return float(np.mean([judge.judge_video(v)['consistency'] for v in vs]))

  real = mean_consistency(videos)
  shuffled = mean_consistency([v[rng.permutation(len(v))] for v in videos])
  recoloured = videos.copy()
  recoloured[:, 1::2] = recoloured[:, 1::2, ..., ::-1]  # RGB -> BGR every other frame.
  flicker = mean_consistency(recoloured)
  dropped = videos.copy()
  dropped[:, 5:8] = dropped[:, 5:8, :1, :1]  # Three frames of plain background.
  gone = mean_consistency(dropped)
  print(f'\nconsistency: real {real:.3f}, shuffled frames {shuffled:.3f}, '
        f'colour flicker {flicker:.3f}, object missing in 3 frames {gone:.3f}')
  assert real >= 0.85
  assert shuffled <= real - 0.25 and flicker <= real - 0.25 and gone <= real - 0.1


def test_input_formats(test_clips):
  videos, captions = test_clips
  as_uint8 = judge.judge_video(videos[0])
  as_float = judge.judge_video(videos[0].astype(np.float32) / 255.0)
  for key in ('colour', 'shape', 'motion'):
    assert as_uint8[key] == as_float[key]
  np.testing.assert_allclose(as_uint8['consistency'], as_float['consistency'], atol=1e-6)
  tuples = [ms.parse_caption(c) for c in captions[:8]]
  scores = judge.score(list(videos[:8]), tuples)
  assert scores['all_acc'] == judge.score(videos[:8], captions[:8])['all_acc']
  with pytest.raises(ValueError, match='prompts'):
    judge.score(videos[:2], captions[:3])
  with pytest.raises(ValueError, match=r'\[T, H, W, 3\]'):
    judge.judge_video(videos[0, 0])


def test_empty_video():
  result = judge.judge_video(np.full((8, 32, 32, 3), 20, np.uint8))
  assert result['colour'] is None and result['shape'] is None and result['motion'] is None
  assert result['consistency'] == 0.0 and result['present'] == 0.0


def test_json_report_makes_its_folder(tmp_path):
  from magicvideo_jax import eval as eval_lib
  path = tmp_path / 'new' / 'folder' / 'scores.json'
  eval_lib.write_json(str(path), {'motion_acc': 0.75, 'num_videos': 4})
  assert json.loads(path.read_text()) == {'motion_acc': 0.75, 'num_videos': 4}
