"""CMD end to end in small (configs/tiny.py:cmd_*): the three objectives, the three training stages
chained by init_from, and `CMDPipeline` on the result (loaded through the ordinary
`MagicVideoPipeline.from_pretrained`, the `sample` CLI and `eval.shapes.generate`)."""

import os

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from magicvideo_jax import losses
from magicvideo_jax import models as models_lib
from magicvideo_jax import sample as sample_cli
from magicvideo_jax.diffusion import Schedule
from magicvideo_jax.eval import cmd as cmd_eval
from magicvideo_jax.eval import shapes as shapes_eval
from magicvideo_jax.sampling import pipeline as pipeline_lib
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.training import train
from magicvideo_jax.weights import checkpoint as ckpt_lib

STAGES = ('ae', 'content', 'motion')
OWNERS = dict(ae='cmd_autoencoder', content='unet', motion='motion_dit')


def _stage_config(stage, data_dir, init_from=None):
  config = tiny.get_config(f'cmd_{stage}')
  config.data.data_dir = data_dir
  config.data.prefetch = 0
  config.train.update(num_steps=2, log_every=1, checkpoint_every=2, warmup_steps=1,
                      learning_rate=1e-2, async_checkpointing=False)
  if init_from:
    config.train.init_from = init_from
  return config


@pytest.fixture(scope='module')
def cmd_runs(tmp_path_factory, shapes_data_dir):
  """{stage: exported model folder} of ae -> content -> motion, 2 steps each."""
  root = tmp_path_factory.mktemp('cmd')
  models, previous = {}, None
  for stage in STAGES:
    workdir = str(root / stage)
    train.train_and_evaluate(_stage_config(stage, shapes_data_dir, previous), workdir)
    previous = models[stage] = ckpt_lib.model_folder(workdir)
  return models


def _flat(folder):
  return traverse_util.flatten_dict(ckpt_lib.load_params(folder), sep='/')


def test_objectives_match_their_definitions():
  """Each loss is its definition computed by hand, and the frozen networks get no gradient."""
  config = tiny.get_config('cmd_motion')
  modules = models_lib.build_models(config.model)
  params = jax.jit(lambda k: nn.unbox(state_lib.init_params(modules, config, k)))(
      jax.random.key(0))
  # The DiT's adaLN and output layers start at zero: give it a random output layer.
  params['motion_dit']['proj_out_2']['kernel'] = 0.1 * jax.random.normal(
      jax.random.key(1), params['motion_dit']['proj_out_2']['kernel'].shape)
  schedule = Schedule.from_config(config.diffusion)
  video = jax.random.uniform(jax.random.key(2), (2, 8, 16, 16, 3), minval=-1, maxval=1)
  batch = dict(video=video, input_ids=jnp.asarray([[1, 5, 6, 2] + [0] * 12, [1, 2] + [0] * 14]),
               frame_mask=jnp.ones((2, 8), bool), fps=jnp.full((2,), 8.0))
  keys = jax.random.split(jax.random.key(3), 2)
  kw = dict(modules=modules, schedule=schedule, config=config)

  # Everything jitted: eager dispatch of these models costs minutes on 2 cores.
  objective = lambda name: jax.jit(lambda p, b, k: losses.LOSSES[name](p, b, k, **kw))
  latents = jax.jit(lambda p, v: models_lib.encode_frames(
      modules['vae'], p['vae'], v, config.model.vae.scaling_factor))(params, video)
  ae = modules['cmd_autoencoder']
  reconstruction, content, motion = jax.jit(lambda p, x: ae.apply(
      {'params': p['cmd_autoencoder']}, x))(params, latents)
  loss, _ = objective('cmd_autoencoder')(params, batch, keys)
  np.testing.assert_allclose(loss, np.mean((np.asarray(reconstruction) - np.asarray(latents)) ** 2),
                             rtol=1e-5)

  # The content stage is the diffusion loss of a one-frame clip of z_c.
  content_loss, _ = objective('cmd_content')(params, batch, keys)
  reference, _ = objective('diffusion')(
      params, dict(latents=content[:, None], input_ids=batch['input_ids'],
                   frame_mask=jnp.ones((2, 1), bool)), keys)
  np.testing.assert_allclose(content_loss, reference, rtol=1e-5)

  # The motion stage by hand: pooled text at <eos> (id 2), noise and timesteps from the keys.
  hidden = jax.jit(lambda p, ids: modules['text_encoder'].apply({'params': p['text_encoder']}, ids))(
      params, batch['input_ids'])
  text = hidden[jnp.arange(2), jnp.asarray([3, 1])]
  keys_t, keys_n = losses.split_keys(keys, 2)
  t = losses.train_timesteps(keys_t, schedule, config)
  noise = losses.example_normal(keys_n, motion.shape[1:])
  alpha = np.asarray(schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  noisy = np.sqrt(alpha) * np.asarray(motion) + np.sqrt(1 - alpha) * np.asarray(noise)
  prediction = jax.jit(lambda p, *a: modules['motion_dit'].apply({'params': p['motion_dit']}, *a))(
      params, jnp.asarray(noisy, jnp.float32), t, content, text)
  assert config.diffusion.prediction_type == 'epsilon'
  motion_loss, _ = objective('cmd_motion')(params, batch, keys)
  np.testing.assert_allclose(motion_loss, np.mean((np.asarray(prediction) - np.asarray(noise)) ** 2),
                             rtol=1e-4)

  # The frozen autoencoder (cmd_encode, shared by both diffusion stages) passes no gradient.
  for name, owner in (('cmd_motion', 'motion_dit'),):
    grads = jax.jit(jax.grad(lambda p: losses.LOSSES[name](p, batch, keys, **kw)[0]))(params)
    frozen = float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads['cmd_autoencoder'])))
    trained = float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads[owner])))
    assert frozen == 0.0 and trained > 0.0, (name, frozen, trained)


@pytest.mark.slow  # Three tiny training runs (three compiles) and the samplings.
def test_stages_train_only_their_network(cmd_runs):
  for previous, stage in zip(STAGES, STAGES[1:]):
    before, after = _flat(cmd_runs[previous]), _flat(cmd_runs[stage])
    assert before.keys() == after.keys()
    moved = {k.split('/')[0] for k in after if not np.array_equal(before[k], after[k])}
    assert moved == {OWNERS[stage]}, (stage, moved)
  first = _flat(cmd_runs['ae'])
  assert any(k.startswith('cmd_autoencoder/') for k in first)


@pytest.mark.slow
def test_pipeline_samples_cmd_checkpoint(cmd_runs, tmp_path):
  folder = cmd_runs['motion']
  pipe = pipeline_lib.MagicVideoPipeline.from_pretrained(folder)
  assert isinstance(pipe, pipeline_lib.CMDPipeline)
  videos = pipe(['a red circle moving left', 'a blue square moving up'], seed=3,
                num_inference_steps=3, negative_prompt='a green star')
  assert videos.shape == (2, 8, 16, 16, 3) and videos.dtype == np.uint8
  traces = pipe.trace_count
  again = pipe(['a red circle moving left', 'a yellow star growing'], seed=3, num_inference_steps=3,
               negative_prompt='a green star')
  assert pipe.trace_count == traces  # New prompts: no new trace.
  np.testing.assert_array_equal(videos[0], again[0])
  assert not np.array_equal(videos[1], again[1])

  # 'latent' output is CMD's decoder of (z_c, z_m); the motion DiT alone from given content frames.
  latents = pipe('a red circle moving left', seed=3, num_inference_steps=3, output_type='latent')
  assert latents.shape == (1, 8, 8, 8, 4)
  content, motion = pipe.encode_clip(latents)
  assert content.shape == (1, 8, 8, 4) and motion.shape == (1,) + pipe.motion_shape()
  given = pipe('a red circle moving left', seed=3, num_inference_steps=3, output_type='latent',
               content_latents=content)
  assert given.shape == latents.shape and np.isfinite(given).all()
  assert pipe.decode_clip(content, motion).shape == latents.shape

  with pytest.raises(ValueError, match='exactly 8 frames of 16x16'):
    pipe('a red circle', num_frames=4)
  with pytest.raises(ValueError, match='does not take known_latents'):
    pipe('a red circle', known_latents=np.zeros((1, 2, 8, 8, 4)))
  with pytest.raises(ValueError, match='not a CMD checkpoint'):
    pipeline_lib.CMDPipeline.from_pretrained(_magicvideo_folder(tmp_path))


def _magicvideo_folder(tmp_path):
  config = tiny.get_config('image')
  modules = models_lib.build_models(config.model)
  params = jax.device_get(nn.unbox(
      state_lib.init_params(modules, config, jax.random.key(0))))
  folder = str(tmp_path / 'image_model')
  ckpt_lib.save_pretrained(folder, train._export_config(config), params,
                           train.build_tokenizer(config))
  return folder


@pytest.mark.slow
def test_sample_cli_and_shapes_eval_take_cmd_checkpoint(cmd_runs, tmp_path):
  out = str(tmp_path / 'clip.gif')
  sample_cli.main(['--checkpoint', cmd_runs['motion'], '--prompt', 'a red circle moving left',
                   '--output', out, '--steps', '2', '--motion_guidance_scale', '1.5'])
  assert os.path.getsize(out) > 0
  # A MagicVideo option on a CMD checkpoint: one line, exit status 2.
  assert sample_cli.main(['--checkpoint', cmd_runs['motion'], '--prompt', 'a red circle',
                          '--output', out, '--long_video', 'causal', '--num_frames', '12']) == 2
  pipe = pipeline_lib.MagicVideoPipeline.from_pretrained(cmd_runs['motion'])
  videos = shapes_eval.generate(pipe, ['a red circle moving left'] * 2, batch_size=2, steps=2)
  assert videos.shape == (2, 8, 16, 16, 3)


@pytest.mark.slow
def test_cmd_evaluation_runs_on_a_checkpoint(cmd_runs):
  results = cmd_eval.evaluate(cmd_runs['motion'], num_clips=2, batch_size=2)
  ae = results['autoencoder_test']
  assert all(np.isfinite(ae[k]) and ae[k] > 0 for k in ('psnr', 'psnr_vae_round_trip',
                                                        'psnr_clip_mean'))
  assert 0 <= ae['judge_motion_acc'] <= 1
  assert 'dit_alone_test' in results  # The motion stage trained the DiT's output layer.
  cost = results['cmd_cost']['flops']
  assert set(cost) == {'unet', 'motion_dit', 'cmd_decoder', 'vae_decoder', 'total'}
  assert all(v > 0 for v in cost.values()) and results['cmd_cost']['seconds'] > 0
  print(cmd_eval.format_results(results))
