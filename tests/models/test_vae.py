"""Parity of `AutoencoderKL` with `diffusers.AutoencoderKL`, and parameter count at SD 1.5 size.

Relative error throughout: max|ours - reference| / max|reference|.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from magicvideo_jax import config as common  # pylint: disable=g-import-not-at-top
from magicvideo_jax.weights import torch_layout
from magicvideo_jax.models import vae

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            layers_per_block=2, norm_num_groups=8, scaling_factor=0.18215)


def _diffusers_config(config):
  levels = len(config['block_out_channels'])
  return dict(
      in_channels=config['in_channels'], out_channels=config['out_channels'],
      latent_channels=config['latent_channels'],
      block_out_channels=tuple(config['block_out_channels']),
      layers_per_block=config['layers_per_block'], norm_num_groups=config['norm_num_groups'],
      scaling_factor=config['scaling_factor'],
      down_block_types=('DownEncoderBlock2D',) * levels,
      up_block_types=('UpDecoderBlock2D',) * levels)


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """(reference, ours, params): a random tiny diffusers VAE and ours loaded from its safetensors."""
  torch.manual_seed(0)
  reference = diffusers.AutoencoderKL(**_diffusers_config(TINY)).eval()
  with torch.no_grad():  # Random norm affines, so a scale/bias mix-up cannot go unnoticed.
    for name, p in reference.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  folder = str(tmp_path_factory.mktemp('vae'))
  reference.save_pretrained(folder)
  model = vae.AutoencoderKL(**TINY)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = torch_layout.state_dict_to_params(torch_layout.load_safetensors_folder(folder), template['params'])
  return reference, model, {'params': params}


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.numpy(), (0, 2, 3, 1))


def test_encode_matches_diffusers(models, images):
  reference, model, params = models
  with torch.no_grad():
    posterior = reference.encode(_nchw(images)).latent_dist
  mean, logvar = model.apply(params, jnp.asarray(images), method='encode')
  assert mean.shape == logvar.shape == (2, 16, 16, 4)
  for name, got, expected in (('mean', mean, posterior.mean), ('logvar', logvar, posterior.logvar)):
    got, expected = np.asarray(got), _nhwc(expected)
    err = _rel_err(got, expected)
    print(f'VAE encode {name}: max rel err {err:.2e}, max abs err {np.max(np.abs(got - expected)):.2e}')
    assert err <= 1e-4


def test_decode_matches_diffusers(models):
  reference, model, params = models
  z = np.random.default_rng(1).standard_normal((2, 16, 16, 4)).astype(np.float32)
  with torch.no_grad():
    expected = _nhwc(reference.decode(_nchw(z)).sample)
  got = np.asarray(model.apply(params, jnp.asarray(z), method='decode'))
  assert got.shape == (2, 32, 32, 3)
  err = _rel_err(got, expected)
  print(f'VAE decode: max rel err {err:.2e}, max abs err {np.max(np.abs(got - expected)):.2e}')
  assert err <= 1e-4


def test_call_decodes_posterior_mean_or_sample(models, images):
  _, model, params = models
  x = jnp.asarray(images)
  mean, logvar = model.apply(params, x, method='encode')
  np.testing.assert_allclose(model.apply(params, x), model.apply(params, mean, method='decode'),
                             rtol=1e-5, atol=1e-5)
  key = jax.random.key(3)
  sampled = vae.diagonal_gaussian_sample(mean, logvar, key)
  np.testing.assert_allclose(model.apply(params, x, key),
                             model.apply(params, sampled, method='decode'), rtol=1e-5, atol=1e-5)


def test_diagonal_gaussian_sample_statistics():
  mean = jnp.full((4096, 4), 2.0)
  logvar = jnp.full((4096, 4), np.log(0.25))
  z = vae.diagonal_gaussian_sample(mean, logvar, jax.random.key(0))
  assert abs(float(z.mean()) - 2.0) < 0.02
  assert abs(float(z.std()) - 0.5) < 0.02


def test_logvar_is_clipped():
  model = vae.AutoencoderKL(**TINY)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  # Push quant_conv's logvar half to a huge bias; the clip must hold it at 20.
  bias = params['params']['quant_conv']['bias']
  params['params']['quant_conv']['bias'] = nn.meta.replace_boxed(
      bias, nn.unbox(bias).at[4:].set(1e3))
  _, logvar = model.apply(params, jnp.zeros((1, 16, 16, 3)), method='encode')
  np.testing.assert_array_equal(logvar, 20.0)


def test_parameter_count_sd15():
  config = common.vae_sd15()
  model = vae.AutoencoderKL(**config)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  flat = {'/'.join(k.key for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(shapes['params'])[0]}
  ours_count = sum(leaf.size for leaf in flat.values())
  with torch.device('meta'):  # Shapes only: nothing allocated, no init cost.
    reference = diffusers.AutoencoderKL(**_diffusers_config(config.to_dict()))
  ref_count = sum(p.numel() for p in reference.parameters())
  # Every torch parameter has a counterpart in our tree.
  for key, _ in reference.named_parameters():
    module, _ = torch_layout.torch_key_to_path(key)
    assert any(p.startswith('/'.join(module) + '/') for p in flat), key
  print(f'VAE SD 1.5: ours {ours_count:,} params, diffusers {ref_count:,}')
  assert ours_count == ref_count
