"""The cascade: interpolation model (growth from a base, conditioning, loss, sampler), the chained
pipeline base -> interpolation -> SR, the sample CLI's cascade flags, and configs/shapes_cascade.py.

Measured on this machine (float32, CPU):
- An interpolation U-Net (9 inputs) grown from a random base U-Net (4 inputs; every leaf random,
  zero-initialised ones included) by `surgery.load_init_checkpoint` computes the base's output on the
  noisy latents whatever the condition: max rel err 0.0 (bound 1e-6).
- The loss's gradient w.r.t. the clip that feeds the condition is exactly zero at the in-between frames
  (no leak of the frames to predict) and non-zero at every keyframe.
"""

import copy
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from magicvideo_jax.data import moving_shapes
from magicvideo_jax.sampling import cascade
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax import diffusion
from magicvideo_jax.sampling import interpolation
from magicvideo_jax import models as models_lib
from magicvideo_jax.sampling import pipeline as pipeline_lib
from magicvideo_jax import sample
from magicvideo_jax.training import train
from magicvideo_jax.sampling import upscaler as upscaler_lib
from magicvideo_jax import video_io
from magicvideo_jax.weights import surgery
from magicvideo_jax import losses
from model_helpers import init, perturb, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYFRAMES, FACTOR = 3, 2  # -> 5 frames.
FRAMES = (KEYFRAMES - 1) * FACTOR + 1
SIZE = 16  # Base resolution; the tiny VAE downsamples by 2 -> latents 8x8.
PROMPTS = ['a red circle moving left', 'a blue square moving up']


# --------------------------------------------------------------------------------------------------
# Tiny configs: the base (tiny.py's video model), an interpolation model grown from it, an upscaler.


def base_config():
  config = tiny.get_config('video')
  config.data.update(num_frames=KEYFRAMES, resolution=SIZE)
  config.model.unet.num_frames = KEYFRAMES  # Adaptor rows = keyframes, as the shapes base (16).
  return config


def interpolation_config():
  config = base_config()
  config.interpolation = interpolation.default_config()
  config.interpolation.factor = FACTOR
  config.model.unet.update(in_channels=9, num_frames=FRAMES, temporal_mask='none')
  config.data.num_frames = FRAMES
  config.train.update(objective='interpolation', trainable=('^unet/',))
  return config


def upscaler_config():
  config = base_config()
  config.upscaler = upscaler_lib.default_config()
  config.model.unet.update(in_channels=7, num_class_embeds=1000, use_linear_projection=True,
                           down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                           up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), frame_adaptor=False,
                           temporal_attention='sequential', temporal_mask='none',
                           fps_embedding=False)
  config.data.resolution = 2 * SIZE
  config.train.update(objective='upscaler', trainable=('^unet/',))
  config.sampling.guidance_scale = 1.0
  return config


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """Checkpoint folders: a random base (every leaf random, zero-initialised ones included), an
  interpolation model grown from it by `surgery.load_init_checkpoint` (then perturbed so that it uses its
  condition), a random upscaler."""
  root = tmp_path_factory.mktemp('cascade')
  paths = types.SimpleNamespace(base=str(root / 'base'), interpolation=str(root / 'interpolation'),
                                upscaler=str(root / 'upscaler'))
  config = base_config()
  _, params = init(config, 0)
  ckpt_lib.save_pretrained(paths.base, train._export_config(config), params,
                           train.build_tokenizer(config))
  config = interpolation_config()
  _, params = init(config, 2)
  params = jax.tree.map(np.asarray, surgery.load_init_checkpoint(params, paths.base))
  params['unet'] = perturb(params['unet'], 3)  # Its VAE stays the base's: keyframes pass as latents.
  ckpt_lib.save_pretrained(paths.interpolation, train._export_config(config), params,
                           train.build_tokenizer(config))
  config = upscaler_config()
  _, params = init(config, 4)
  ckpt_lib.save_pretrained(paths.upscaler, train._export_config(config), params,
                           train.build_tokenizer(config))
  return paths


# --------------------------------------------------------------------------------------------------
# The interpolation model.


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_grown_conv_in_keeps_the_base_output(folders):
  """At init from a base folder, the interpolation U-Net on [noisy | condition] = the base U-Net on the
  noisy latents, for any condition; the new input channels start at zero."""
  base_modules = models_lib.build_models(base_config().model)
  base = ckpt_lib.load_params(folders.base)
  config = interpolation_config()
  config.model.unet.update(num_frames=KEYFRAMES, temporal_mask='causal')  # The base's, but 9 inputs.
  config.data.num_frames = KEYFRAMES
  modules, fresh = init(config, 5)
  grown = surgery.load_init_checkpoint(fresh, folders.base, ('^unet/',))
  kernel = np.asarray(grown['unet']['conv_in']['kernel'])
  np.testing.assert_array_equal(kernel[:, :, :4], base['unet']['conv_in']['kernel'])
  assert kernel.shape == (3, 3, 9, 32) and not kernel[:, :, 4:].any()
  rng = np.random.default_rng(0)
  noisy = rng.standard_normal((2, KEYFRAMES, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
  condition = rng.standard_normal((2, KEYFRAMES, SIZE // 2, SIZE // 2, 5)).astype(np.float32)
  t, fps = np.array([10, 900], np.int32), np.array([8.0, 4.0], np.float32)
  ctx = rng.standard_normal((2, 16, 32)).astype(np.float32)
  expected = jax.jit(base_modules['unet'].apply)({'params': base['unet']}, noisy, t, ctx, fps=fps)
  apply = jax.jit(modules['unet'].apply)
  ours = apply({'params': grown['unet']}, np.concatenate([noisy, condition], -1), t, ctx, fps=fps)
  err = rel_err(ours, expected)
  print(f'interpolation U-Net grown from the base vs the base on the noisy latents: max rel err {err:.2e}')
  assert err <= 1e-6
  # The fresh (not grown) model differs, so the equality above is the growth's doing.
  other = apply({'params': fresh['unet']}, np.concatenate([noisy, condition], -1), t, ctx, fps=fps)
  assert rel_err(other, expected) > 1e-2


def test_grow_weight_rules():
  rng = np.random.default_rng(0)
  table = rng.standard_normal((4, 3)).astype(np.float32)
  grown = surgery.grow_weight('unet/mid_block/resnets_0/conv1_adaptor/scale', table, (10, 3))
  np.testing.assert_allclose(grown[::3], table, rtol=1e-6)  # Exact rows at the keyframes (m = 3).
  np.testing.assert_allclose(grown[1], (2 * table[0] + table[1]) / 3, rtol=1e-6)
  kernel = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
  assert surgery.grow_weight('unet/conv_in/kernel', kernel, (3, 3, 2, 8)) is None  # Shrink.
  assert surgery.grow_weight('unet/conv_out/kernel', kernel, (3, 3, 9, 8)) is None
  assert surgery.grow_weight('unet/conv_in/kernel', kernel, (3, 3, 9, 16)) is None
  assert surgery.grow_weight('unet/mid_block/resnets_0/conv1_adaptor/scale', table,
                                   (2, 3)) is None


def test_condition_layout():
  keyframes = jnp.arange(1, 4, dtype=jnp.float32).reshape(1, 3, 1, 1, 1) * jnp.ones((1, 3, 2, 2, 4))
  nearest = np.asarray(interpolation.make_condition(keyframes, 3, 'nearest'))
  zeros = np.asarray(interpolation.make_condition(keyframes, 3, 'zeros'))
  assert nearest.shape == zeros.shape == (1, 7, 2, 2, 5)
  np.testing.assert_array_equal(nearest[0, :, 0, 0, 4], [1, 0, 0, 1, 0, 0, 1])  # The mask.
  np.testing.assert_array_equal(zeros[0, :, 0, 0, 4], [1, 0, 0, 1, 0, 0, 1])
  np.testing.assert_array_equal(nearest[0, :, 0, 0, 0], [1, 1, 2, 2, 2, 3, 3])  # Nearest keyframe.
  np.testing.assert_array_equal(zeros[0, :, 0, 0, 0], [1, 0, 0, 2, 0, 0, 3])
  np.testing.assert_array_equal(interpolation.keyframe_sources(5, 2), [0, 0, 1, 1, 2])  # Ties: earlier.
  assert interpolation.num_target_frames(16, 3) == 46
  with pytest.raises(ValueError, match=r'\(K - 1\) \* 3 \+ 1'):
    interpolation.keyframe_mask(45, 3)


@pytest.fixture(scope='module')
def interpolation_model(folders):
  config = ckpt_lib.load_config(folders.interpolation)
  config.interpolation.keyframe_loss_weight = 0.5
  modules = models_lib.build_models(config.model)
  params = ckpt_lib.load_params(folders.interpolation)
  return types.SimpleNamespace(config=config, modules=modules, params=params,
                               schedule=diffusion.Schedule.from_config(config.diffusion))


def test_loss_sees_only_the_keyframes(interpolation_model):
  """The condition is built from the keyframes alone: the loss's gradient w.r.t. the clip that feeds
  the condition is zero at the in-between frames and non-zero at every keyframe."""
  m = interpolation_model
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.standard_normal((2, FRAMES, SIZE // 2, SIZE // 2, 4)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 2)

  def loss_through_condition(clip):
    condition = interpolation.condition_from_clip(clip, FACTOR, 'nearest')
    return losses.denoising_loss(
        m.params['unet'], latents, condition, context, keys, keys,
        is_given=interpolation.keyframe_mask(FRAMES, FACTOR), given_weight=0.5,
        fps=jnp.full((2,), 8.0), unet=m.modules['unet'], schedule=m.schedule, config=m.config)[0]

  grad = np.abs(np.asarray(jax.jit(jax.grad(loss_through_condition))(latents))).sum(axis=(0, 2, 3, 4))
  print('|d loss / d clip| per frame through the condition:', np.array2string(grad, precision=3))
  is_keyframe = interpolation.keyframe_mask(FRAMES, FACTOR)
  assert (grad[is_keyframe] > 1e-6).all() and (grad[~is_keyframe] == 0).all()


def test_loss_runs_and_weights_keyframes(interpolation_model):
  """Through losses.LOSSES on a pixel batch (frozen VAE encoding); keyframes weighted by
  keyframe_loss_weight (0.5 here)."""
  m = interpolation_model
  rng = np.random.default_rng(1)
  batch = dict(video=jnp.asarray(rng.uniform(-1, 1, (2, FRAMES, SIZE, SIZE, 3)), jnp.float32),
               input_ids=jnp.asarray(train.build_tokenizer(m.config)(PROMPTS)),
               fps=jnp.full((2,), 16.0))
  keys = jax.random.split(jax.random.key(1), 2)
  loss, aux = jax.jit(lambda p, b: losses.LOSSES['interpolation'](
      p, b, keys, modules=m.modules, schedule=m.schedule, config=m.config))(m.params, batch)
  assert np.isfinite(loss) and set(aux) == {'keyframe_loss', 'inbetween_loss'}
  assert abs(aux['keyframe_loss'] - aux['inbetween_loss']) > 1e-4
  w = 0.5
  expected = ((w * KEYFRAMES * aux['keyframe_loss'] + (FRAMES - KEYFRAMES) * aux['inbetween_loss'])
              / (w * KEYFRAMES + FRAMES - KEYFRAMES))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sampler_shapes(interpolation_model):
  m = interpolation_model
  rng = np.random.default_rng(2)
  keyframes = jnp.asarray(rng.standard_normal((2, KEYFRAMES, SIZE // 2, SIZE // 2, 4)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((2, FRAMES, SIZE // 2, SIZE // 2, 4)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)

  def run(negative, sampler):
    return jax.jit(lambda p: interpolation.sample(
        m.modules['unet'], p, keyframes, noise, context, negative, m.schedule, factor=FACTOR,
        num_inference_steps=3, guidance_scale=3.0, fps=jnp.full((2,), 8.0), sampler=sampler))(
            m.params['unet'])

  guided, plain = run(-context, 'ddim'), run(None, 'dpmsolver++')
  assert guided.shape == plain.shape == noise.shape
  assert np.isfinite(guided).all() and np.abs(np.asarray(guided) - np.asarray(plain)).max() > 1e-3
  with pytest.raises(ValueError, match='give 5'):
    interpolation.sample(m.modules['unet'], m.params['unet'], keyframes, noise[:, :4], context, None,
                         m.schedule, factor=FACTOR, num_inference_steps=2)


# --------------------------------------------------------------------------------------------------
# The chained pipeline and the CLI.


@pytest.fixture(scope='module')
def pipe(folders):
  return pipeline_lib.MagicVideoPipeline.from_pretrained(
      folders.base, interpolation=folders.interpolation, upscaler=folders.upscaler)


CALL = dict(num_frames=KEYFRAMES, height=SIZE, width=SIZE, num_inference_steps=2,
            guidance_scale=3.0, interpolation_steps=2, interpolation_guidance_scale=2.0,
            upscale_steps=2, seed=1)


@pytest.mark.slow  # Five cascade calls, most with a program of their own to compile.
def test_pipeline_runs_base_interpolation_sr(pipe, folders, tmp_path):
  assert cascade.same_vae(pipe.config, pipe.params, pipe.interpolator.config,
                          pipe.interpolator.params)
  video = pipe(PROMPTS, **CALL)
  assert video.shape == (2, FRAMES, 2 * SIZE, 2 * SIZE, 3) and video.dtype == np.uint8
  assert video.std() > 0
  # A cascade folder (symlinks; training workdirs with model/ work too) names the same stages.
  layout = tmp_path / 'cascade'
  layout.mkdir()
  for name in cascade.STAGE_DIRS:
    os.symlink(getattr(folders, name), layout / name)
  assert cascade.resolve_folders(str(layout)) == tuple(str(layout / n) for n in cascade.STAGE_DIRS)
  loaded = pipeline_lib.MagicVideoPipeline.from_pretrained(str(layout))
  assert loaded.interpolator.factor == FACTOR and loaded.upscaler is not None
  with pytest.raises(FileNotFoundError, match='not a checkpoint folder'):
    cascade.resolve_folders(str(layout), upscaler=str(tmp_path))
  # Each stage is optional at call time.
  low_res = pipe(PROMPTS, **CALL, upscale=False, output_type='float')
  assert low_res.shape == (2, FRAMES, SIZE, SIZE, 3)
  keyframes = pipe(PROMPTS, **CALL, interpolate=False, upscale=False, output_type='latent')
  assert keyframes.shape == (2, KEYFRAMES, SIZE // 2, SIZE // 2, 4)
  with pytest.raises(ValueError, match='max_noise_level'):
    pipe(PROMPTS, **CALL, noise_level=400)
  # SR from the upsampled input (image-to-image) reaches the upscaler; checked before sampling.
  img2img = pipe(PROMPTS, **CALL, upscale_strength=0.5)
  assert img2img.shape == video.shape and np.abs(img2img.astype(int) - video).max() > 0
  with pytest.raises(ValueError, match='upscale_strength'):
    pipe(PROMPTS, **CALL, upscale_strength=1.5)


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_cascade_evaluation_reports_every_stage(pipe):
  """eval.cascade on the tiny cascade: judged keyframes, interpolated, cascaded and bilinear videos
  with the sizes of each stage, keyframe and low-res fidelity."""
  from magicvideo_jax.eval import cascade as eval_cascade  # pylint: disable=g-import-not-at-top
  scores = eval_cascade.evaluate(pipe, PROMPTS, batch_size=2, num_frames=KEYFRAMES, steps=2,
                                 interpolation_steps=2, upscale_steps=2, upscale_strength=0.5)
  assert scores['shapes']['upscaled'] == scores['shapes']['bilinear'] == [2, FRAMES, 2 * SIZE,
                                                                          2 * SIZE, 3]
  for name in ('keyframes', 'interpolated', 'cascaded', 'bilinear'):
    assert 0.0 <= scores[name]['consistency'] <= 1.0, name
  assert np.isfinite([scores['keyframe_psnr'], scores['lowres_psnr']]).all()
  report = eval_cascade.format_scores(scores, 'tiny')
  assert 'bilinear [' in report and 'lowres_psnr' in report
  # A linear ramp: bilinear upsampling then area averaging gives it back away from the borders.
  ramp = np.add.outer(np.arange(4), 2 * np.arange(4)) / 20.0
  video = np.broadcast_to(ramp[None, None, :, :, None], (1, 2, 4, 4, 3)).astype(np.float32)
  up = eval_cascade.bilinear_upsample(video, 2)
  assert up.shape == (1, 2, 8, 8, 3) and np.diff(up[0, 0, 1:7, 3, 0]).min() > 0  # Not nearest.
  np.testing.assert_allclose(upscaler_lib.downsample(up, 2)[:, :, 1:-1, 1:-1],
                             video[:, :, 1:-1, 1:-1], atol=1e-6)


def test_keyframes_pass_through_another_vae(pipe):
  """With a different VAE the keyframes are decoded by the base and re-encoded by the stage's VAE."""
  other = copy.copy(pipe.interpolator)  # Shares the compiled sampler; other weights are arguments.
  other.params = dict(other.params, vae=perturb(other.params['vae'], 9))
  assert not cascade.same_vae(pipe.config, pipe.params, other.config, other.params)
  latents = np.random.default_rng(3).standard_normal((1, KEYFRAMES, SIZE // 2, SIZE // 2, 4))
  swapped = pipeline_lib.MagicVideoPipeline(pipe.config, pipe.params, pipe.tokenizer,
                                            modules=pipe.modules, mesh=pipe.mesh,
                                            interpolator=other)
  out = cascade.run_stages(swapped, latents.astype(np.float32), PROMPTS[:1], [''], seed=0, fps=8.0,
                           interpolation_steps=2)
  assert out['keyframes'].shape == (1, KEYFRAMES, SIZE, SIZE, 3)
  assert out['frames'].shape == (1, FRAMES, SIZE, SIZE, 3) and out['fps'] == 8.0 * FACTOR


@pytest.mark.slow
def test_cli_cascade_flags(folders, tmp_path, capsys):
  out = tmp_path / 'cascade.gif'
  argv = ['--checkpoint', folders.base, '--interpolation', folders.interpolation, '--upscaler',
          folders.upscaler, '--prompt', PROMPTS[0], '--output', str(out), '--num_frames',
          str(KEYFRAMES), '--steps', '2', '--interpolation_steps', '2', '--upscale_steps', '2',
          '--noise_level', '30', '--upscale_strength', '0.5']
  assert sample.main(argv) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
  frames = video_io.read_video(str(out))
  assert frames.shape == (FRAMES, 2 * SIZE, 2 * SIZE, 3)
  # A stage folder of the wrong kind fails before loading weights, in one line.
  assert sample.main(argv[:2] + ['--interpolation', folders.base] + argv[4:]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'no `interpolation` config section' in err[0], err


# --------------------------------------------------------------------------------------------------
# configs/shapes_cascade.py through magicvideo_jax.main.


@pytest.mark.slow  # Two training programs compile from scratch (about 80 s warm, 150 s cold, loaded).
def test_shapes_cascade_stages_train(tmp_path):
  """Both stages of configs/shapes_cascade.py (grown from the bundled shapes model) train 2 steps and
  export, on small builds of moving_shapes/frames46 and moving_shapes/res64."""
  data_dir = str(tmp_path / 'tfds')
  small = dict(train_size=8, validation_size=2, test_size=2)
  datasets = dict(interpolation=('frames46_small', dict(num_frames=46, fps=24.0)),
                  upscaler=('res64_small', dict(resolution=64)))
  for name, kwargs in datasets.values():
    builder = moving_shapes.MovingShapes(
        config=moving_shapes.MovingShapesConfig(name=name, **kwargs, **small), data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  runs = {}
  for stage, extra in (('interpolation', []), ('upscaler', ['--config.data.num_frames=2'])):
    cmd = [sys.executable, '-m', 'magicvideo_jax.main', f'--config=configs/shapes_cascade.py:{stage}',
           f'--workdir={tmp_path / stage}', f'--config.data.data_dir={data_dir}',
           f'--config.data.dataset=moving_shapes/{datasets[stage][0]}', '--config.train.num_steps=2',
           '--config.data.global_batch_size=1', '--config.data.prefetch=0',
           '--config.train.log_every=1', *extra]
    # Both at once: most of a short run is single-threaded compilation.
    runs[stage] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
  for stage, proc in runs.items():
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert 'loss=' in stderr
    if stage == 'interpolation':
      assert "leaves grown, e.g. ['unet/conv_in/kernel (3, 3, 4, 32) -> (3, 3, 9, 32)'" in stderr
    config = ckpt_lib.load_config(str(tmp_path / stage / 'model'))
    assert config.get(stage) is not None  # The stage's section is exported with the model.


def test_frames46_holds_the_default_clips():
  """Every third frame of a moving_shapes/frames46 clip is the 'default' clip of the same index."""
  configs = {c.name: c for c in moving_shapes.MovingShapes.BUILDER_CONFIGS}
  long, short = configs['frames46'], configs['default']
  for index in range(3):
    a, b = (moving_shapes.make_example('train', index, c) for c in (long, short))
    assert a['caption'] == b['caption'] and a['fps'] == 3 * b['fps']
    np.testing.assert_array_equal(a['video'][::3], b['video'])
