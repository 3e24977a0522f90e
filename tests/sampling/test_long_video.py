"""Known latent frames (inpainting) and long videos (sampling/long_video.py): window by window
('causal') and all at once on fused windows ('freenoise'), on the tiny converted SD pipeline of
conftest (4-frame video layers)."""

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


def test_window_starts_cover_every_frame_and_end_at_the_last():
  assert long_video.window_starts(10, 4, 3) == (0, 3, 6)
  assert long_video.window_starts(10, 4, 4) == (0, 4, 6)
  assert long_video.window_starts(4, 4, 2) == (0,) and long_video.window_starts(3, 4, 2) == (0,)
  assert long_video.window_starts(64, 16, 8) == tuple(range(0, 49, 8))


def test_fuse_windows_is_the_weighted_mean_of_each_frames_windows():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 10, 3, 1)).astype(np.float32)
  context = np.arange(2, dtype=np.float32)

  def fn(windows, repeat):  # Depends on the frame's place in its window and on its video.
    place = np.arange(4, dtype=np.float32)[None, :, None, None]
    return windows * (1 + place) + repeat(context)[:, None, None, None]

  fused = np.asarray(long_video.fuse_windows(fn, x, 4, 3))
  weights = np.array([1, 2, 2, 1], np.float32)
  total = np.zeros((2, 10, 3, 1)); norm = np.zeros(10)
  for start in (0, 3, 6):
    for place in range(4):
      frame = start + place
      total[:, frame] += weights[place] * (x[:, frame] * (1 + place) + context[:, None, None])
      norm[frame] += weights[place]
  np.testing.assert_allclose(fused, total / norm[None, :, None, None], rtol=1e-6)
  local = lambda windows, repeat: 3 * windows - 1  # Frame by frame: fusing changes nothing.
  np.testing.assert_allclose(long_video.fuse_windows(local, x, 4, 3), 3 * x - 1, rtol=1e-6)


def test_rescheduled_noise_repeats_shuffled_blocks():
  noise = jax.random.normal(jax.random.key(0), (2, 11, 2, 2, 1))
  out = np.asarray(long_video.reschedule_noise(jax.random.key(1), noise, 4, 2))
  np.testing.assert_array_equal(out[:, :4], np.asarray(noise)[:, :4])
  for start in range(4, 11, 2):
    block, source = out[:, start:start + 2], out[:, start - 4:start - 2]
    # Every frame of the block is one frame of its source block, none twice.
    order = [int(np.flatnonzero([np.array_equal(f, g) for g in source[0]])[0]) for f in block[0]]
    assert len(set(order)) == block.shape[1]
    np.testing.assert_array_equal(block, source[:, order])
  assert not np.array_equal(out[:, 4:8], out[:, :4])  # Shuffled (seeded: not the identity here).


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores (sampler compiles).
def test_freenoise_windows_of_the_model(pipes):
  """Frames independent (identity video layers): every window predicts a frame alike, so fused
  windows give each frame its own 4-frame sample. Directed temporal attention: frames only the first
  window holds see only earlier frames of it, so they match the first window sampled alone."""
  plain, mixed = pipes
  rng = np.random.default_rng(3)
  latents = rng.standard_normal((1, 9, LATENT, LATENT, 4)).astype(np.float32)
  for pipe in pipes:
    fused = pipe('a red circle', num_frames=9, latents=latents, temporal_window=(4, 2),
                 output_type='latent', **SETTINGS)
    assert fused.shape == (1, 9, LATENT, LATENT, 4)
    alone = pipe('a red circle', num_frames=4, latents=latents[:, :4], output_type='latent',
                 **SETTINGS)
    if pipe is plain:
      rest = pipe('a red circle', num_frames=4, latents=latents[:, 5:], output_type='latent',
                  **SETTINGS)
      np.testing.assert_allclose(fused[:, :4], alone, atol=2e-5)
      np.testing.assert_allclose(fused[:, 5:], rest, atol=2e-5)
    else:
      np.testing.assert_allclose(fused[:, :2], alone[:, :2], atol=2e-5)
      later = float(np.abs(fused[:, 2:4] - alone[:, 2:4]).max())
      print(f'freenoise: frames 2-3 moved by {later:.3f} by the windows that share them')
      assert later > 1e-2
  video = mixed('a red circle', num_frames=9, long_video='freenoise', long_video_overlap=2,
                seed=5, output_type='float', **SETTINGS)
  assert video.shape == (1, 9, SIZE, SIZE, 3) and np.isfinite(video).all()
  one = mixed('a red circle', num_frames=4, temporal_window=(4, 2), latents=latents[:, :4],
              output_type='latent', **SETTINGS)
  np.testing.assert_array_equal(one, alone)  # A single window is the ordinary loop.


def test_bad_requests(pipes):
  pipe = pipes[0]
  with pytest.raises(ValueError, match="long_video='causal'"):
    pipe('a', num_frames=9, **SETTINGS)
  with pytest.raises(ValueError, match='long_video_overlap=4'):
    pipe('a', num_frames=9, long_video='causal', long_video_overlap=4, **SETTINGS)
  with pytest.raises(ValueError, match="long_video='noise'; valid: causal, freenoise"):
    pipe('a', num_frames=9, long_video='noise', **SETTINGS)
  with pytest.raises(ValueError, match=r'temporal_window=\(5, 2\): length must be in \[2, 4\]'):
    pipe('a', num_frames=9, temporal_window=(5, 2), **SETTINGS)
  with pytest.raises(ValueError, match='stride in'):
    pipe('a', num_frames=9, temporal_window=(4, 4), **SETTINGS)
  with pytest.raises(ValueError, match='known_latents have shape'):
    pipe('a', num_frames=4, known_latents=np.zeros((1, 4, LATENT, LATENT, 4)), **SETTINGS)


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores (sampler compiles).
def test_cli(tiny_converted_dir, tmp_path, capsys):
  out = str(tmp_path / 'long.gif')
  args = ['--checkpoint', tiny_converted_dir, '--prompt', 'a red circle', '--output', out,
          '--num_frames', '7', '--height', str(SIZE), '--width', str(SIZE), '--steps', str(STEPS)]
  for method in long_video.METHODS:
    assert sample_cli.main(args + ['--long_video', method, '--long_video_overlap', '2']) == 0
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
