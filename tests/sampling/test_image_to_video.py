"""Image-to-video with a first-frame-conditioned model (sampling/image_to_video.py): the condition, the
loss, growth from a base model, the pipeline's conditioning, training end to end and
configs/shapes_i2v.py.

Measured on this machine (float32, CPU):
- An image-to-video model grown from a random base (new conv_in channels at zero) samples exactly
  what the base samples from the same noise and image (held as known latents): max rel err 0.0
  (bound 1e-6).
- With its new channels moved, the pipeline's output equals the sampling loop written out here
  (frame 0 held, the condition in both halves of guidance): max rel err 1.2e-6 (bound 1e-5).
"""

import os
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_i2v
from configs import tiny
from magicvideo_jax import diffusion
from magicvideo_jax import losses
from magicvideo_jax import sample
from magicvideo_jax import video_io
from magicvideo_jax.sampling import image_to_video
from magicvideo_jax.sampling import pipeline as pipeline_lib
from magicvideo_jax.training import train
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import surgery
from model_helpers import init, perturb, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMES, SIZE = 3, 16  # The tiny VAE downsamples by 2: latents 8x8.
PROMPTS = ['a red circle moving left', 'a blue square moving up']
CALL = dict(num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.0,
            output_type='latent', seed=0)


def base_config():
  config = tiny.get_config('video')
  config.data.update(num_frames=FRAMES, resolution=SIZE)
  config.model.unet.num_frames = FRAMES
  return config


def i2v_config():
  config = tiny.get_config('i2v')
  config.data.update(num_frames=FRAMES, resolution=SIZE)
  config.model.unet.num_frames = FRAMES
  return config


def images(seed, count=2):
  return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def test_condition_layout():
  first = jnp.arange(1, 3, dtype=jnp.float32).reshape(2, 1, 1, 1) * jnp.ones((2, 2, 2, 4))
  nearest = np.asarray(image_to_video.make_condition(first, 4, 'nearest'))
  zeros = np.asarray(image_to_video.make_condition(first, 4, 'zeros'))
  assert nearest.shape == zeros.shape == (2, 4, 2, 2, 5)
  np.testing.assert_array_equal(nearest[:, :, 0, 0, 4], [[1, 0, 0, 0]] * 2)  # The mask: frame 0.
  np.testing.assert_array_equal(nearest[:, :, 0, 0, 0], [[1] * 4, [2] * 4])  # Frame 0 everywhere.
  np.testing.assert_array_equal(zeros[:, :, 0, 0, 0], [[1, 0, 0, 0], [2, 0, 0, 0]])
  with pytest.raises(ValueError, match='at least 2 frames'):
    image_to_video.given_mask(1)
  config = i2v_config()
  config.image_to_video.condition = 'mean'
  with pytest.raises(ValueError, match="config.image_to_video.condition='mean'; valid: nearest"):
    image_to_video.check_unet(config)
  config = i2v_config()
  config.model.unet.in_channels = 4
  with pytest.raises(ValueError, match=r'in_channels = 2 \* 4 \+ 1 = 9'):
    image_to_video.check_unet(config)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """A random base video model; the image-to-video model grown from it by the init_from surgery
  (exactly the base at init); the same with every weight moved (so that it uses its condition)."""
  root = tmp_path_factory.mktemp('i2v')
  paths = {name: str(root / name) for name in ('base', 'grown', 'moved')}
  config = base_config()
  _, params = init(config, 0)
  ckpt_lib.save_pretrained(paths['base'], train._export_config(config), params,
                           train.build_tokenizer(config))
  config = i2v_config()
  _, params = init(config, 1)
  grown = jax.tree.map(np.asarray, surgery.load_init_checkpoint(params, paths['base']))
  ckpt_lib.save_pretrained(paths['grown'], train._export_config(config), grown,
                           train.build_tokenizer(config))
  moved = dict(grown, unet=perturb(grown['unet'], 2))
  ckpt_lib.save_pretrained(paths['moved'], train._export_config(config), moved,
                           train.build_tokenizer(config))
  return paths


def test_loss_conditions_on_frame_0_only(folders):
  """The loss's gradient w.r.t. the clip through the condition is non-zero at frame 0 alone (no leak
  of the frames to predict), and frame 0's loss is weighted by first_frame_loss_weight."""
  config = ckpt_lib.load_config(folders['moved'])
  config.image_to_video.first_frame_loss_weight = 0.5
  params = ckpt_lib.load_params(folders['moved'])
  modules = pipeline_lib.models_lib.build_models(config.model)
  schedule = diffusion.Schedule.from_config(config.diffusion)
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((2, FRAMES, SIZE // 2, SIZE // 2, 4)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 2)

  def loss_through_condition(clip):
    return losses.denoising_loss(
        params['unet'], latents, image_to_video.condition_from_clip(clip), context, keys, keys,
        is_given=image_to_video.given_mask(FRAMES), given_weight=0.5, fps=jnp.full((2,), 8.0),
        unet=modules['unet'], schedule=schedule, config=config)[0]

  grad = np.abs(np.asarray(jax.jit(jax.grad(loss_through_condition))(latents))).sum(axis=(0, 2, 3, 4))
  print('|d loss / d clip| per frame through the condition:', np.array2string(grad, precision=3))
  assert grad[0] > 1e-6 and (grad[1:] == 0).all()

  batch = dict(video=jnp.asarray(rng.uniform(-1, 1, (2, FRAMES, SIZE, SIZE, 3)), jnp.float32),
               input_ids=jnp.asarray(train.build_tokenizer(config)(PROMPTS)),
               fps=jnp.full((2,), 8.0))
  loss, aux = jax.jit(lambda p, b: losses.LOSSES['image_to_video'](
      p, b, keys, modules=modules, schedule=schedule, config=config))(params, batch)
  assert set(aux) == {'first_frame_loss', 'later_frames_loss'}
  assert abs(aux['first_frame_loss'] - aux['later_frames_loss']) > 1e-4
  expected = ((0.5 * aux['first_frame_loss'] + (FRAMES - 1) * aux['later_frames_loss'])
              / (0.5 + FRAMES - 1))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.slow  # Three pipelines compile their sampling loops.
def test_pipeline_conditions_on_the_image(folders):
  base = pipeline_lib.MagicVideoPipeline.from_pretrained(folders['base'])
  grown = pipeline_lib.MagicVideoPipeline.from_pretrained(folders['grown'])
  moved = pipeline_lib.MagicVideoPipeline.from_pretrained(folders['moved'])
  assert grown.image_conditioned and not base.image_conditioned and grown.latent_channels == 4
  noise = np.random.default_rng(3).standard_normal((2, FRAMES, SIZE // 2, SIZE // 2, 4))
  noise = noise.astype(np.float32)
  # Grown with zeros on the new channels: the base's sample with the image as known latents.
  for seed in (4, 5):
    expected = base(PROMPTS, image=images(seed), latents=noise, **CALL)
    err = rel_err(grown(PROMPTS, image=images(seed), latents=noise, **CALL), expected)
    print(f'grown image-to-video model vs its base, same noise and image: max rel err {err:.2e}')
    assert err <= 1e-6

  # Moved: the condition matters, and the pipeline runs the loop written out here.
  first = images(4)
  ours = moved(PROMPTS, image=first, latents=noise, **CALL)
  assert rel_err(moved(PROMPTS, image=images(5), latents=noise, **CALL), ours) > 1e-3
  params = jax.device_get(moved.params)
  unet, config = moved.modules['unet'], moved.config
  frame0 = moved.encode(first[:, None] / 255.0)[:, 0]  # encode takes frames in [0, 1].
  condition = image_to_video.make_condition(jnp.asarray(frame0), FRAMES)
  context = jnp.concatenate([moved.encode_prompt(['', '']), moved.encode_prompt(PROMPTS)])
  fps = jnp.full((4,), float(config.data.fps))

  def apply(x_in, t):
    return unet.apply({'params': params['unet']}, x_in, t, context, fps=fps)

  guided = diffusion.guided_model_fn(apply, 3.0, condition=jnp.concatenate([condition] * 2))
  known = jnp.asarray(frame0[:, None])
  # The held frame's fixed noise: the pipeline's, from its seed (0) as pipeline.py draws it.
  known_noise = jax.random.normal(jax.random.fold_in(jax.random.split(jax.random.key(0))[0], 1),
                                  known.shape)

  def model_fn(x, t):  # Frame 0 held: every call sees it noised to its level.
    given = diffusion.add_noise(moved.schedule, known, known_noise, jnp.broadcast_to(t, (2,)))
    return guided(x.at[:, :1].set(given), t)

  reference = diffusion.sample_loop(model_fn, jnp.asarray(noise), moved.schedule, 2)
  reference = reference.at[:, :1].set(known)
  err = rel_err(ours, reference)
  print(f'pipeline vs the conditioned loop written out: max rel err {err:.2e}')
  assert err <= 1e-5

  # The image and its latents as known_latents are one request; frame 0 is held exactly.
  np.testing.assert_array_equal(moved(PROMPTS, known_latents=known, latents=noise, **CALL), ours)
  np.testing.assert_array_equal(ours[:, 0], frame0)
  with pytest.raises(ValueError, match='image-to-video model: pass image='):
    moved(PROMPTS, **CALL)
  with pytest.raises(ValueError, match="not with an image-to-video model"):
    moved(PROMPTS, image=first, temporal_window=(2, 1), **CALL)


@pytest.mark.slow  # A tiny training run (one compile) and one sampling.
def test_training_then_sample_with_image(tmp_path, shapes_data_dir, capsys):
  """configs/tiny.py:i2v trains through main, exports a model with its image_to_video section, and
  `sample --image` generates from a given first frame."""
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  cmd = [sys.executable, '-m', 'magicvideo_jax.main', '--config=configs/tiny.py:i2v',
         f'--workdir={workdir}', '--num_cpu_devices=1', f'--config.data.data_dir={shapes_data_dir}',
         '--config.data.prefetch=0', '--config.train.num_steps=2', '--config.train.log_every=1',
         '--config.train.checkpoint_every=2']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert 'first_frame_loss=' in proc.stderr and 'later_frames_loss=' in proc.stderr
  model = ckpt_lib.model_folder(workdir)
  assert ckpt_lib.load_config(model).image_to_video.condition == 'nearest'
  first = tmp_path / 'first.png'
  video_io.iio.imwrite(str(first), images(6, 1)[0])
  out = tmp_path / 'out.gif'
  assert sample.main(['--checkpoint', model, '--prompt', PROMPTS[0], '--image', str(first),
                      '--output', str(out), '--steps', '2']) == 0
  assert video_io.read_video(str(out)).shape == (8, 16, 16, 3)
  # Without the image, one line naming the flag, before any weights load.
  capsys.readouterr()
  assert sample.main(['--checkpoint', model, '--prompt', PROMPTS[0], '--output', str(out),
                      '--steps', '2']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and '--image is required' in err[0], err


def test_shapes_i2v_config_starts_from_the_bundle():
  """configs/shapes_i2v.py: the bundled model's weights, conv_in grown with zeros on the 5 new
  input channels; nothing else differs (checked without compiling: random leaves, then the
  surgery)."""
  config = shapes_i2v.get_config()
  _, fresh = init(config, 0)
  grown = traverse_util.flatten_dict(surgery.load_init_checkpoint(fresh, config.train.init_from),
                                     sep='/')
  bundle = traverse_util.flatten_dict(ckpt_lib.load_params(config.train.init_from), sep='/')
  assert grown.keys() == bundle.keys()
  kernel = np.asarray(grown['unet/conv_in/kernel'])
  assert kernel.shape[2] == 9 and not kernel[:, :, 4:].any()
  np.testing.assert_array_equal(kernel[:, :, :4], bundle['unet/conv_in/kernel'])
  different = [k for k in bundle if k != 'unet/conv_in/kernel'
               and not np.array_equal(np.asarray(grown[k]), np.asarray(bundle[k]))]
  assert not different, different[:5]
