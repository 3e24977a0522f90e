"""eval.image_to_video and eval.long_video end to end on the bundled shapes checkpoint (2 prompts,
few steps: the CLIs, not the numbers, which BENCHMARKS.md records)."""

import json

import numpy as np
import pytest

from magicvideo_jax.eval import image_to_video
from magicvideo_jax.eval import long_video as long_eval

BUNDLED = 'magicvideo_jax/assets/shapes'


def test_psnr():
  a = np.zeros((4, 4, 3), np.uint8)
  assert image_to_video.psnr(a, a) == float('inf')
  b = a.copy()
  b[0, 0, 0] = 255
  assert abs(image_to_video.psnr(a, b) - 10 * np.log10(48)) < 1e-9


@pytest.mark.slow  # Samples the bundled model twice.
def test_clis(tmp_path, capsys):
  out = str(tmp_path / 'i2v.json')
  assert image_to_video.main(['--checkpoint', BUNDLED, '--num_prompts', '2', '--steps', '3',
                              '--json', out]) == 0
  scores = json.load(open(out))
  assert scores['num_videos'] == 2 and 10 < scores['psnr_frame0'] < 60
  out = str(tmp_path / 'long.json')
  assert long_eval.main(['--checkpoint', BUNDLED, '--num_frames', '32', '--num_prompts', '2',
                         '--steps', '3', '--json', out]) == 0
  result = json.load(open(out))
  assert len(result['windows']) == 2 and result['num_frames'] == 32
  assert '| frames 16-31 |' in capsys.readouterr().out
  assert long_eval.main(['--checkpoint', BUNDLED, '--num_frames', '32', '--num_prompts', '2',
                         '--steps', '3', '--method', 'freenoise', '--json', out]) == 0
  result = json.load(open(out))
  assert result['method'] == 'freenoise' and len(result['windows']) == 2
  assert long_eval.main(['--checkpoint', BUNDLED, '--num_frames', '20']) == 2
