"""Known latent frames (inpainting) and long videos window by window (sampling/long_video.py), on
the tiny converted SD pipeline of conftest (4-frame video layers)."""

import json

from flax import traverse_util
import jax
import numpy as np
import pytest

from magicvideo_jax import MagicVideoPipeline
from magicvideo_jax import sample as sample_cli
from magicvideo_jax import video_io
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.eval import long_video as long_eval
from magicvideo_jax.sampling import long_video

STEPS, SIZE, LATENT = 3, 32, 16
SETTINGS = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=1.0)


@pytest.fixture(scope='module')
def pipes(tiny_sd_dir):
  """The converted pipeline (video layers at identity: frames independent) and a copy whose
  temporal attention has random output projections (frames see the frames before them)."""
  plain = MagicVideoPipeline.from_pretrained(tiny_sd_dir, num_frames=4)
  mixed = MagicVideoPipeline.from_pretrained(tiny_sd_dir, num_frames=4)
  flat = traverse_util.flatten_dict(jax.device_get(mixed.params), sep='/')
  rng = np.random.default_rng(0)
  for path in flat:
    if 'temporal_attn/to_out_0/kernel' in path:
      flat[path] = (0.2 * rng.standard_normal(flat[path].shape)).astype(np.float32)
  mixed.params = traverse_util.unflatten_dict(flat, sep='/')
  return plain, mixed


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores (sampler compiles).
def test_known_frames_are_kept_and_lead(pipes):
  plain, mixed = pipes
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((1, 4, LATENT, LATENT, 4)).astype(np.float32)
  known = rng.standard_normal((1, 2, LATENT, LATENT, 4)).astype(np.float32)
  for pipe in pipes:
    free = pipe('a red circle', num_frames=4, latents=latents, output_type='latent', **SETTINGS)
    given = pipe('a red circle', num_frames=4, latents=latents, output_type='latent',
                 known_latents=known, **SETTINGS)
    np.testing.assert_array_equal(given[:, :2], known)
    diff = float(np.abs(given[:, 2:] - free[:, 2:]).max())
    print(f'{"mixed" if pipe is mixed else "identity"} temporal layers: later frames move by {diff:.2e}')
    if pipe is plain:  # Frames independent: the given ones cannot change the others.
      assert diff <= 1e-5
    else:
      assert diff > 1e-2


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores (sampler compiles).
def test_long_video_windows(pipes):
  _, pipe = pipes
  assert long_video.windows(10, 4, 2) == 4 and long_video.windows(4, 4, 2) == 1
  first = pipe('a red circle', num_frames=4, output_type='latent', seed=5, **SETTINGS)
  long = pipe('a red circle', num_frames=9, long_video='causal', long_video_overlap=2,
              output_type='latent', seed=5, **SETTINGS)
  assert long.shape == (1, 9, LATENT, LATENT, 4)
  np.testing.assert_array_equal(long[:, :4], first)  # Window 1 is an ordinary sample.
  second = pipe('a red circle', num_frames=4, output_type='latent', seed=6,
                known_latents=first[:, 2:], **SETTINGS)
  np.testing.assert_array_equal(long[:, 4:6], second[:, 2:])  # Window 2 continues from it.
  frames = pipe('a red circle', num_frames=9, long_video='causal', long_video_overlap=2, seed=5,
                output_type='float', **SETTINGS)
  assert frames.shape == (1, 9, SIZE, SIZE, 3)
  np.testing.assert_allclose(frames[:, :8], np.concatenate(
      [pipe.decode(long[:, :4]), pipe.decode(long[:, 4:8])], axis=1), atol=1e-6)


def test_bad_requests(pipes):
  pipe = pipes[0]
  with pytest.raises(ValueError, match="long_video='causal'"):
    pipe('a', num_frames=9, **SETTINGS)
  with pytest.raises(ValueError, match='long_video_overlap=4'):
    pipe('a', num_frames=9, long_video='causal', long_video_overlap=4, **SETTINGS)
  with pytest.raises(ValueError, match="long_video='freenoise'; valid: causal"):
    pipe('a', num_frames=9, long_video='freenoise', **SETTINGS)
  with pytest.raises(ValueError, match='known_latents have shape'):
    pipe('a', num_frames=4, known_latents=np.zeros((1, 4, LATENT, LATENT, 4)), **SETTINGS)


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores (sampler compiles).
def test_cli(tiny_converted_dir, tmp_path, capsys):
  out = str(tmp_path / 'long.gif')
  args = ['--checkpoint', tiny_converted_dir, '--prompt', 'a red circle', '--output', out,
          '--num_frames', '7', '--height', str(SIZE), '--width', str(SIZE), '--steps', str(STEPS)]
  assert sample_cli.main(args + ['--long_video', 'causal', '--long_video_overlap', '2']) == 0
  assert video_io.read_video(out).shape == (7, SIZE, SIZE, 3)
  assert sample_cli.main(args) == 2
  assert sample_cli.main(args + ['--long_video', 'causal', '--long_video_overlap', '9']) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
  assert len(errors) == 2
  assert "long_video='causal'" in errors[0] and 'long_video_overlap=9' in errors[1]


def test_window_scores_of_real_clips():
  """The scorer on 32-frame "videos" made of two real 16-frame clips: the same clip twice keeps its
  colour and shape; two different clips do not."""
  examples = [moving_shapes.make_example('validation', i, moving_shapes.MovingShapesConfig(
      name='default')) for i in range(6)]
  clips = np.stack([e['video'] for e in examples])
  prompts = [e['caption'] for e in examples]
  same = long_eval.score_windows(np.concatenate([clips, clips], axis=1), prompts, 16)
  assert same['colour_and_shape_kept'] == 1.0
  json.dumps(same)  # What eval.long_video --json writes.
  assert [w['all_acc'] for w in same['windows']] == [1.0, 1.0]
  shuffled = np.concatenate([clips, clips[::-1]], axis=1)
  other = long_eval.score_windows(shuffled, prompts, 16)
  print('kept (different second clip):', other['colour_and_shape_kept'])
  assert other['colour_and_shape_kept'] < 1.0
  assert other['consistency_straddling'] < same['consistency_straddling']


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores (sampler compiles).
def test_image_is_the_first_frame(pipes, tmp_path, tiny_converted_dir, capsys):
  _, pipe = pipes
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  out = pipe(['a red circle', 'the red line'], num_frames=4, image=image, output_type='latent',
             **SETTINGS)
  expected = pipe.encode(np.broadcast_to(image[None, None] / 255.0, (2, 1, SIZE, SIZE, 3)))
  np.testing.assert_array_equal(out[:, :1], expected)
  with pytest.raises(ValueError, match='image has shape'):
    pipe('a', num_frames=4, image=image[:16], **SETTINGS)
  path = str(tmp_path / 'first.png')
  video_io.iio.imwrite(path, image)
  video = str(tmp_path / 'i2v.gif')
  assert sample_cli.main(['--checkpoint', tiny_converted_dir, '--prompt', 'a red circle',
                          '--output', video, '--image', path, '--num_frames', '3', '--height',
                          str(SIZE), '--width', str(SIZE), '--steps', str(STEPS)]) == 0
  assert video_io.read_video(video).shape == (3, SIZE, SIZE, 3)
  assert sample_cli.main(['--checkpoint', tiny_converted_dir, '--prompt', 'a', '--output', video,
                          '--image', str(tmp_path / 'missing.png')]) == 2
  assert 'file not found' in capsys.readouterr().err
