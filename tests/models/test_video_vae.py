"""VideoVAE: SD VAE params load into it, identity at init, temporal mixing, loss, flicker and PSNR.

Tiny config (block_out_channels (16, 32), 8 norm groups, 16x16 frames, latents 8x8x4), float32.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from magicvideo_jax.weights import torch_layout
from magicvideo_jax.eval import flicker as flicker_lib
from magicvideo_jax.models import vae
from magicvideo_jax.models import video_vae
from magicvideo_jax import config as config_lib
from magicvideo_jax import losses

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215)
BATCH, FRAMES, SIZE = 2, 4, 16
LATENT = SIZE // 2


def _flat(tree):
  return traverse_util.flatten_dict(nn.unbox(tree), sep='/')


def _errors(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  abs_err = float(np.max(np.abs(ours - ref)))
  return abs_err, abs_err / float(np.max(np.abs(ref)))


def _random_params(template, seed):
  """Random params of `template`'s shapes (no init compile): fan-in scaled kernels, random affines."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in _flat(template).items():
    shape = tuple(leaf.shape)
    noise = rng.standard_normal(shape).astype(np.float32)
    if path.endswith('kernel'):
      flat[path] = noise / np.sqrt(np.prod(shape[:-1]))
    elif path.endswith('scale'):
      flat[path] = 1.0 + 0.1 * noise
    else:
      flat[path] = 0.1 * noise
  return traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in flat.items()}, sep='/')


@pytest.fixture(scope='module')
def setup():
  """Both models; random image params loaded into the video tree via the torch-name path."""
  image_model = vae.AutoencoderKL(**TINY)
  video_model = video_vae.VideoAutoencoderKL(num_frames=8, **TINY)
  x = jnp.zeros((1, SIZE, SIZE, 3))
  image_params = _random_params(jax.eval_shape(image_model.init, jax.random.key(0), x)['params'], 1)
  # An 'rbg' key halves the compile time of the init on CPU.
  video_init = nn.unbox(jax.jit(video_model.init)(jax.random.key(2, impl='rbg'), x)['params'])
  state_dict = torch_layout.params_to_state_dict(image_params)
  loaded = torch_layout.state_dict_to_params(state_dict, video_init, keep_init=video_init)
  loaded = jax.tree.map(jnp.asarray, loaded)
  decode_video = jax.jit(lambda p, z: video_model.apply({'params': p}, z, method='decode_video'))
  return dict(image_model=image_model, video_model=video_model, image_params=image_params,
              video_init=video_init, loaded=loaded, decode_video=decode_video)


@pytest.fixture(scope='module')
def latents():
  return jax.random.normal(jax.random.key(3), (BATCH, FRAMES, LATENT, LATENT, 4))


def _perturbed_temporal(params, scale=0.3):
  """Every temporal leaf moved by scale * N(0, 1) (zero-init outputs become non-zero)."""
  flat = _flat(params)
  rng = np.random.default_rng(4)
  for path, value in flat.items():
    if 'temporal' in path:
      flat[path] = value + scale * rng.standard_normal(value.shape).astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


def test_sd_vae_params_load_with_only_temporal_at_init(setup):
  image_flat, init_flat, loaded_flat = (_flat(setup[k]) for k in ('image_params', 'video_init',
                                                                    'loaded'))
  video_only = sorted(p for p in init_flat if torch_layout.is_video_only(p))
  print(f'{len(video_only)} video-only of {len(init_flat)} leaves')
  assert video_only and all('temporal' in p and p.startswith('decoder/') for p in video_only)
  assert any(p.startswith('decoder/mid_block/temporal_attn/') for p in video_only)
  assert any(p.startswith('decoder/up_blocks_0/temporal_attn_0/') for p in video_only)
  assert any('temporal_conv' in p for p in video_only)
  assert set(init_flat) - set(video_only) == set(image_flat)  # Same names as AutoencoderKL.
  for path, value in loaded_flat.items():
    expected = init_flat[path] if torch_layout.is_video_only(path) else image_flat[path]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=path)


def test_identity_at_init(setup, latents):
  image_model, video_model, loaded = setup['image_model'], setup['video_model'], setup['loaded']
  image_vars = {'params': setup['image_params']}
  frames = latents.reshape((BATCH * FRAMES, LATENT, LATENT, 4))
  ref = jax.jit(lambda v, z: image_model.apply(v, z, method='decode'))(image_vars, frames)
  ref = np.asarray(ref).reshape((BATCH, FRAMES, SIZE, SIZE, 3))
  ours = setup['decode_video'](loaded, latents)
  assert ours.shape == (BATCH, FRAMES, SIZE, SIZE, 3)
  abs_err, rel_err = _errors(ours, ref)
  print(f'decode_video vs image decoder at init: max abs {abs_err:.2e}, rel {rel_err:.2e}')
  assert abs_err <= 1e-5
  # decode(): frames as one-frame clips.
  single = jax.jit(lambda p, z: video_model.apply({'params': p}, z, method='decode'))(loaded, frames)
  abs_err, rel_err = _errors(single, ref.reshape(frames.shape[:1] + ref.shape[2:]))
  print(f'decode (F=1) vs image decoder: max abs {abs_err:.2e}, rel {rel_err:.2e}')
  assert abs_err <= 1e-5
  # encode() is AutoencoderKL's.
  x = jax.random.uniform(jax.random.key(5), (2, SIZE, SIZE, 3), minval=-1, maxval=1)
  enc = lambda m, v: jax.jit(lambda v, x: m.apply(v, x, method='encode'))(v, x)
  for ours, ref in zip(enc(video_model, {'params': loaded}), enc(image_model, image_vars)):
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_temporal_layers_mix_frames(setup, latents):
  decode_video, loaded = setup['decode_video'], setup['loaded']
  perturbed = _perturbed_temporal(loaded)
  k = 1
  shifted = latents.at[:, k].add(1.0)
  base_init, shifted_init = decode_video(loaded, latents), decode_video(loaded, shifted)
  base, shifted_out = decode_video(perturbed, latents), decode_video(perturbed, shifted)
  change = float(jnp.max(jnp.abs(base - base_init)))
  print(f'perturbed temporal params change decode_video by {change:.3f}')
  assert change > 1e-2
  others = [f for f in range(FRAMES) if f != k]
  at_init = float(jnp.max(jnp.abs(shifted_init[:, others] - base_init[:, others])))
  assert at_init == 0.0  # Frames are independent at init...
  for f in others:  # ... and depend on their neighbours (and on far frames) once trained.
    diff = float(jnp.max(jnp.abs(shifted_out[:, f] - base[:, f])))
    print(f'frame {f}: change {diff:.3e} after perturbing frame {k}')
    assert diff > 1e-4


def test_too_long_clip_is_rejected(setup):
  model = setup['video_model']
  z = jax.ShapeDtypeStruct((1, 9, LATENT, LATENT, 4), jnp.float32)
  with pytest.raises(ValueError, match='num_frames'):
    jax.eval_shape(lambda p, z: model.apply({'params': p}, z, method='decode_video'),
                   setup['loaded'], z)


def test_loss_under_jit_and_grad(setup):
  model = setup['video_model']
  config = config_lib.fill_defaults(ml_collections.ConfigDict(dict(train=dict(temporal_loss_weight=0.5))))
  video = jax.random.uniform(jax.random.key(6), (1, FRAMES, SIZE, SIZE, 3), minval=-1, maxval=1)
  params = {'vae': _perturbed_temporal(setup['loaded'], scale=0.05)}

  def loss_fn(params, batch, key):
    return losses.video_vae_loss(params, batch, key, modules={'vae': model}, schedule=None,
                                    config=config)

  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, {'video': video}, jax.random.key(7))
  print(f'loss {float(loss):.4f}, aux {jax.tree.map(float, aux)}')
  assert set(aux) == {'l1', 'l2', 'temporal'}
  np.testing.assert_allclose(loss, aux['l1'] + aux['l2'] + 0.5 * aux['temporal'], rtol=1e-6)
  assert float(aux['temporal']) > 0
  flat = _flat(grads['vae'])
  assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
  assert all(not np.any(np.asarray(g)) for p, g in flat.items() if p.startswith('encoder/'))
  assert not np.any(np.asarray(flat['quant_conv/kernel']))
  for path in ('decoder/mid_block/temporal_attn/to_out_0/kernel',
               'decoder/up_blocks_1/temporal_conv_0/conv2/kernel', 'decoder/conv_out/kernel'):
    assert np.any(np.asarray(flat[path])), path


def test_flicker():
  rng = np.random.default_rng(0)
  target = rng.uniform(-0.5, 0.5, size=(2, 6, 8, 8, 3))
  constant = target + 0.1 * rng.standard_normal((2, 1, 8, 8, 3)).clip(-3, 3)  # Same error each frame.
  assert flicker_lib.flicker(constant, target) < 1e-12
  noise = 0.1 * rng.standard_normal((2, 1, 8, 8, 3)).clip(-3, 3)
  sign = np.where(np.arange(6) % 2, 1.0, -1.0)[None, :, None, None, None]
  alternating = target + sign * noise
  # e flips between -noise and +noise: |e[t+1] - e[t]| = 2 |noise|, halved on the [0, 1] scale.
  expected = float(np.mean(np.abs(noise)))
  np.testing.assert_allclose(flicker_lib.flicker(alternating, target), expected, rtol=1e-10)
  np.testing.assert_allclose(flicker_lib.flicker((alternating + 1) / 2, (target + 1) / 2,
                                                 value_range=(0.0, 1.0)), expected, rtol=1e-10)


def test_psnr_matches_numpy():
  rng = np.random.default_rng(1)
  target = rng.uniform(-1, 1, size=(3, 4, 8, 8, 3))
  recon = np.clip(target + 0.05 * rng.standard_normal(target.shape), -1, 1)
  per_frame, mean = flicker_lib.psnr(recon, target)
  assert per_frame.shape == (3, 4)
  mse = ((recon - target) / 2) ** 2
  expected = np.array([[10 * np.log10(1 / mse[b, f].mean()) for f in range(4)] for b in range(3)])
  np.testing.assert_allclose(per_frame, expected, rtol=1e-10)
  np.testing.assert_allclose(mean, expected.mean(), rtol=1e-10)


def test_compare_decoders_equal_at_init(setup):
  clips = np.random.default_rng(2).uniform(-1, 1, size=(1, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
  results = flicker_lib.compare_decoders(setup['image_model'], setup['image_params'],
                                         setup['video_model'], setup['loaded'], clips)
  print(flicker_lib.format_comparison(results))
  assert results['image']['psnr_per_frame'].shape == (FRAMES,)
  for name in ('flicker', 'psnr'):
    np.testing.assert_allclose(results['video'][name], results['image'][name], rtol=1e-4)
  assert results['image']['flicker'] > 0


@pytest.mark.parametrize('temporal_conv,temporal_attention', [(True, False), (False, True),
                                                              (False, False)])
def test_variant_trees(temporal_conv, temporal_attention):
  """The switches remove their layers; with both off the tree is AutoencoderKL's (shapes only)."""
  x = jnp.zeros((1, SIZE, SIZE, 3))
  model = video_vae.VideoAutoencoderKL(temporal_conv=temporal_conv,
                                       temporal_attention=temporal_attention, **TINY)
  paths = set(_flat(jax.eval_shape(model.init, jax.random.key(0), x)['params']))
  image = set(_flat(jax.eval_shape(vae.AutoencoderKL(**TINY).init, jax.random.key(0), x)['params']))
  assert any('temporal_conv' in p for p in paths) == temporal_conv
  assert any('temporal_attn' in p for p in paths) == temporal_attention
  assert {p for p in paths if 'temporal' not in p} == image


def test_build_from_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config('vae')
  model = video_vae.build_video_vae(config.model)
  assert model.num_frames == config.model.unet.num_frames
  assert tuple(model.block_out_channels) == (16, 32)
  config.model.video_vae = ml_collections.ConfigDict(dict(num_frames=4, temporal_conv=False))
  model = video_vae.build_video_vae(config_lib.fill_defaults(config).model)
  assert (model.num_frames, model.temporal_conv, model.temporal_attention) == (4, False, True)
