"""Precomputed latents (data/encode_latents.py): the stored posterior is the VAE's, the input pipeline
samples the same frames from latents as from pixels, the training loss is the same either way, a run
trains on them end to end, and latents of another VAE are refused."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from magicvideo_jax.data import input_pipeline
from magicvideo_jax.tools import encode_latents
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax import diffusion
from magicvideo_jax import models as models_lib
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax.training import state as state_lib
from magicvideo_jax.training import train
from magicvideo_jax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _vae_folder(path, seed):
  """A pretrained folder with the tiny config's VAE, random weights from `seed`."""
  config = tiny.get_config('vae')
  modules = models_lib.build_models(config.model)
  x = jnp.zeros((1, config.data.resolution, config.data.resolution, 3))
  params = {'vae': nn.unbox(modules['vae'].init(jax.random.key(seed), x)['params'])}
  ckpt_lib.save_pretrained(str(path), config, params)
  return str(path), modules['vae'], params['vae']


@pytest.fixture(scope='module')
def encoded(shapes_data_dir, tmp_path_factory):
  """moving_shapes/tiny (train, validation) encoded in float32 by a random tiny VAE."""
  folder, vae, vae_params = _vae_folder(tmp_path_factory.mktemp('vae'), seed=0)
  config = encode_latents.EncodedLatentsConfig(
      name='tiny_vae', source='moving_shapes/tiny', source_data_dir=shapes_data_dir,
      checkpoint=folder, resolution=16, splits=('train', 'validation'), dtype='float32',
      batch_frames=24)  # Not a multiple of the 8-frame clips: batches straddle clips.
  builder = encode_latents.EncodedLatents(config=config, data_dir=shapes_data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return dict(folder=folder, vae=vae, vae_params=vae_params, data_dir=shapes_data_dir,
              dataset='encoded_latents/tiny_vae')


def test_encode_clips_packs_any_lengths_in_order():
  rng = np.random.default_rng(0)
  clips = [(f'clip{i}', rng.uniform(0, 1, (int(n), 2, 2, 3)).astype(np.float32))
           for i, n in enumerate(rng.integers(1, 12, 20))]
  calls = []

  def encoder(frames):  # Stand-in for the VAE: any per-frame function.
    calls.append(frames.shape[0])
    return frames * 2, frames + 1

  out = list(encode_latents.encode_clips(iter(clips), encoder, batch_frames=7))
  assert [k for k, _, _ in out] == [k for k, _ in clips]
  for (_, frames), (_, mean, std) in zip(clips, out):
    np.testing.assert_array_equal(mean, frames * 2)
    np.testing.assert_array_equal(std, frames + 1)
  assert all(n == 7 for n in calls[:-1]) and sum(calls) == sum(f.shape[0] for _, f in clips)


def test_stored_posterior_is_the_vae_posterior(encoded):
  source = input_pipeline.load_source(encoded['dataset'], data_dir=encoded['data_dir'],
                                      split='validation')
  pixels = input_pipeline.load_source('moving_shapes/tiny', data_dir=encoded['data_dir'],
                                      split='validation')
  assert len(source) == len(pixels)
  vae = encoded['vae']
  worst = 0.0
  for i in (0, 5, len(source) - 1):
    frames = input_pipeline.crop_frames(np.asarray(pixels[i]['video']), 16, None)
    mean, logvar = vae.apply({'params': encoded['vae_params']},
                             jnp.asarray(input_pipeline.to_float(frames)), method=vae.encode)
    ex = source[i]
    assert int(ex['index']) == i and ex['caption'] == pixels[i]['caption']
    scale = np.abs(mean).max()
    worst = max(worst, np.abs(ex['latent_mean'] - mean).max() / scale,
                np.abs(ex['latent_std'] - np.exp(0.5 * logvar)).max() / np.exp(0.5 * logvar).max())
  print(f'stored vs direct posterior: max rel err {worst:.2e}')
  assert worst < 1e-5


def _config(encoded, precomputed):
  config = tiny.get_config('video')
  config.data.update(data_dir=encoded['data_dir'], prefetch=0, caption_dropout=0.1,
                     frame_stride_range=(1, 2))
  if precomputed:
    config.data.update(dataset=encoded['dataset'], precomputed_latents=True)
  return config


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_latents_batch_equals_encoded_pixel_batch_and_same_loss(encoded):
  """Same seed: the same clips, frames, captions and fps; the diffusion loss agrees."""
  pix_config, lat_config = _config(encoded, False), _config(encoded, True)
  for c in (pix_config, lat_config):
    c.model.vae.scaling_factor = 0.5
  tokenizer = train.build_tokenizer(pix_config)
  pix = train.make_iterator(pix_config, tokenizer).make_batch(1, 3)
  lat = train.make_iterator(lat_config, tokenizer).make_batch(1, 3)
  assert 'video' not in lat and lat['latent_mean'].shape[:2] == pix['video'].shape[:2]
  for key in ('caption', 'fps', 'index', 'input_ids', 'frame_mask'):
    np.testing.assert_array_equal(lat[key], pix[key])

  modules = models_lib.build_models(pix_config.model)
  params = jax.jit(lambda k: nn.unbox(state_lib.init_params(modules, pix_config, k)))(
      jax.random.key(1))
  params['vae'] = encoded['vae_params']
  schedule = diffusion.Schedule.from_config(pix_config.diffusion)
  keys = jax.random.split(jax.random.key(7), pix['video'].shape[0])
  values = []
  for config, batch in ((pix_config, pix), (lat_config, lat)):
    loss, _ = losses.diffusion_loss(params, jax.tree.map(jnp.asarray, train.device_batch(batch)),
                                    keys, modules=modules, schedule=schedule, config=config)
    values.append(float(loss))
  rel = abs(values[0] - values[1]) / abs(values[0])
  print(f'loss from pixels {values[0]:.6f}, from stored latents {values[1]:.6f} (rel {rel:.1e})')
  assert rel < 1e-4


@pytest.mark.slow  # Fast tier: about 10 s on 2 cores.
@pytest.mark.parametrize('stage', ['ae', 'content', 'motion'])
def test_cmd_objectives_from_latents_equal_from_pixels(encoded, stage):
  """CMD's three objectives read the stored posterior means as they read the VAE's on pixels."""
  configs = []
  for precomputed in (False, True):
    config = tiny.get_config(f'cmd_{stage}')
    config.data.update(data_dir=encoded['data_dir'], prefetch=0, caption_dropout=0.1)
    if precomputed:
      config.data.update(dataset=encoded['dataset'], precomputed_latents=True)
    configs.append(config)
  train.latents_dataset_metadata(configs[1])  # CMD objectives take precomputed latents.
  tokenizer = train.build_tokenizer(configs[0])
  pix, lat = (train.make_iterator(c, tokenizer).make_batch(1, 2) for c in configs)
  modules = models_lib.build_models(configs[0].model)
  params = jax.jit(lambda k: nn.unbox(state_lib.init_params(modules, configs[0], k)))(
      jax.random.key(1))
  params['vae'] = encoded['vae_params']
  schedule = diffusion.Schedule.from_config(configs[0].diffusion)
  keys = jax.random.split(jax.random.key(7), pix['video'].shape[0])
  objective = losses.LOSSES[configs[0].train.objective]
  values = [float(objective(params, jax.tree.map(jnp.asarray, train.device_batch(batch)), keys,
                            modules=modules, schedule=schedule, config=config)[0])
            for config, batch in zip(configs, (pix, lat))]
  rel = abs(values[0] - values[1]) / abs(values[0])
  print(f'{stage}: loss from pixels {values[0]:.6f}, from stored latents {values[1]:.6f} '
        f'(rel {rel:.1e})')
  assert rel < 1e-4, (values, rel)


def test_objectives_on_pixels_refuse_precomputed_latents(encoded):
  config = _config(encoded, True)
  config.train.objective = 'video_vae'
  with pytest.raises(ValueError, match='trains on pixels'):
    train.latents_dataset_metadata(config)


def test_abstract_batch_of_latents_is_the_first_batch(encoded):
  """state.abstract_batch with precomputed latents: 'latent_mean', 'latent_std' as the stream has them."""
  config = _config(encoded, True)
  mesh = sharding_lib.create_mesh(config.mesh)
  iterator = train.make_iterator(config, train.build_tokenizer(config))
  real = train._batch_struct(config, iterator, mesh)  # pylint: disable=protected-access
  abstract = state_lib.abstract_batch(config, mesh)
  assert 'latent_mean' in real and 'video' not in real
  assert abstract.keys() == real.keys()
  for key, struct in real.items():
    assert abstract[key] == struct, (key, abstract[key], struct)


def test_flag_must_match_the_dataset(encoded):
  config = _config(encoded, True)
  config.data.precomputed_latents = False
  with pytest.raises(ValueError, match='precomputed_latents'):
    input_pipeline.create_iterator(config.data)
  config = _config(encoded, False)
  config.data.precomputed_latents = True
  with pytest.raises(ValueError, match='precomputed_latents'):
    input_pipeline.create_iterator(config.data)


def test_latents_of_another_vae_are_refused(encoded, tmp_path):
  config = _config(encoded, True)
  _, vae, other_params = _vae_folder(tmp_path / 'other', seed=1)
  metadata = train.latents_dataset_metadata(config)
  train.check_latents_vae(config, metadata, vae, encoded['vae_params'])  # The right VAE passes.
  with pytest.raises(ValueError, match='different VAE'):
    train.check_latents_vae(config, metadata, vae, other_params)
  config.data.resolution = 32
  with pytest.raises(ValueError, match='encoded at 16px'):
    train.latents_dataset_metadata(config)


@pytest.mark.slow
def test_trains_on_latents_end_to_end(encoded, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  cmd = [sys.executable, '-m', 'magicvideo_jax.main', '--config=configs/tiny.py',
         f'--workdir={tmp_path}', f'--config.data.data_dir={encoded["data_dir"]}',
         f'--config.data.dataset={encoded["dataset"]}', '--config.data.precomputed_latents=True',
         '--config.data.prefetch=0', '--config.train.num_steps=3', '--config.train.log_every=1',
         '--config.train.export=False', f'--config.train.init_from={encoded["folder"]}',
         '--config.train.init_from_include=("^vae/",)']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'loss=' in proc.stderr
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '3'))
