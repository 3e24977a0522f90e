"""temporal_attention='animatediff': our U-Net with AnimateDiff's motion modules against diffusers'
`UNetMotionModel.from_unet2d(unet, MotionAdapter)` at random weights (float32), the identity at init,
and the checks on clip length and config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from conftest import TINY_MOTION_ADAPTER, TINY_SD
from magicvideo_jax import config as common
from magicvideo_jax import flops
from magicvideo_jax.models import unet as unet_lib
from magicvideo_jax.weights import motion_adapter as ma_lib
from magicvideo_jax.weights import torch_layout

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

TINY_ADAPTER = TINY_MOTION_ADAPTER
FRAMES, LATENT = 4, 8
REL_TOLERANCE = 1e-5


def _perturbed(model, scale=0.05):
  """Every tensor randomised (norm affines, zero-init projections, position tables too)."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


def _our_unet_config(**video):
  unet = common.image_only(common.unet_sd15()).to_dict()
  unet.update({k: v for k, v in TINY_SD['unet'].items() if k != 'sample_size'})
  unet = ma_lib.unet_config_with_adapter(unet, TINY_ADAPTER)
  unet.update(num_frames=FRAMES, **video)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()}


def _inputs(rng, batch=2):
  sample = rng.standard_normal((batch, FRAMES, LATENT, LATENT, 4)).astype(np.float32)
  context = rng.standard_normal((batch, 5, 32)).astype(np.float32)
  timesteps = np.array([17, 503][:batch], np.int64)
  return sample, timesteps, context


@pytest.fixture(scope='module')
def diffusers_pair():
  torch.manual_seed(0)
  torch.set_num_threads(1)
  image_unet = _perturbed(diffusers.UNet2DConditionModel(**TINY_SD['unet']))
  adapter = _perturbed(diffusers.MotionAdapter(**TINY_ADAPTER))
  return image_unet, adapter


def _our_params(image_unet, adapter, model, sample, timesteps, context):
  template = jax.eval_shape(model.init, jax.random.key(0), sample, timesteps, context)['params']
  image = torch_layout.state_dict_to_params(
      {k: v.numpy() for k, v in image_unet.state_dict().items()}, template,
      allow_missing_video=True)
  motion = ma_lib.state_to_params({k: v.numpy() for k, v in adapter.state_dict().items()},
                                  template)
  return jax.tree.map(np.asarray, _merge(image, motion))


def _merge(a, b):
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and k in out else v
  return out


def test_matches_diffusers_unet_motion_model(diffusers_pair):
  image_unet, adapter = diffusers_pair
  rng = np.random.default_rng(0)
  sample, timesteps, context = _inputs(rng)
  model = unet_lib.UNet(**_our_unet_config(frame_adaptor=False, fps_embedding=False))
  params = _our_params(image_unet, adapter, model, sample, timesteps, context)
  ours = np.asarray(model.apply({'params': params}, sample, timesteps, context))

  reference = diffusers.UNetMotionModel.from_unet2d(image_unet, adapter).eval()
  with torch.no_grad():
    expected = reference(
        torch.from_numpy(sample.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(timesteps),
        torch.from_numpy(np.repeat(context, FRAMES, axis=0))  # The caller repeats it per frame.
    ).sample.numpy().transpose(0, 2, 3, 4, 1)
  rel = float(np.abs(ours - expected).max() / np.abs(expected).max())
  # The motion modules matter: the image U-Net alone is far off.
  with torch.no_grad():
    image_only = image_unet(
        torch.from_numpy(sample.reshape(-1, LATENT, LATENT, 4).transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(np.repeat(timesteps, FRAMES)),
        torch.from_numpy(np.repeat(context, FRAMES, axis=0))).sample.numpy()
  image_only = image_only.transpose(0, 2, 3, 1).reshape(expected.shape)
  change = float(np.abs(image_only - expected).max() / np.abs(expected).max())
  print(f'animatediff U-Net vs diffusers UNetMotionModel: max rel err {rel:.2e} '
        f'(motion modules change the output by {change:.2f} rel)')
  assert change > 1e-2
  assert rel <= REL_TOLERANCE, f'max relative error {rel:.2e} > {REL_TOLERANCE}'


def test_fresh_motion_modules_are_identity():
  """Zero-init output projections: the video U-Net is the image U-Net frame by frame, with and
  without the (identity-init) frame adaptors and fps embedding."""
  rng = np.random.default_rng(1)
  sample, timesteps, context = _inputs(rng, batch=1)
  image_model = unet_lib.UNet(**dict(_our_unet_config(), temporal_attention='none',
                                     frame_adaptor=False, fps_embedding=False))
  image_params = image_model.init(jax.random.key(0), sample, timesteps, context)['params']
  image_params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                              jax.device_get(image_params))
  expected = image_model.apply({'params': image_params}, sample, timesteps, context)
  for extras in (dict(frame_adaptor=False, fps_embedding=False),
                 dict(frame_adaptor=True, fps_embedding=True)):
    model = unet_lib.UNet(**_our_unet_config(**extras))
    params = unet_lib.init_video_params(model, image_params, jax.random.key(3), sample, timesteps,
                                        context, fps=jnp.ones((1,)))
    paths = list(torch_layout.iter_paths(params))
    assert any('mid_block/motion_modules_0/' in p for p in paths)
    assert any('up_blocks_1/motion_modules_1/' in p for p in paths)
    got = model.apply({'params': params}, sample, timesteps, context, fps=jnp.ones((1,)))
    err = float(jnp.abs(got - expected).max())
    assert err <= 1e-5, f'{extras}: max abs err {err:.2e} from the image U-Net'


def test_clip_longer_than_the_position_table_is_refused():
  model = unet_lib.UNet(**_our_unet_config(frame_adaptor=False, fps_embedding=False))
  frames = TINY_ADAPTER['motion_max_seq_length'] + 1
  sample = jnp.zeros((1, frames, LATENT, LATENT, 4))
  with pytest.raises(ValueError, match='motion_max_seq_length=6'):
    jax.eval_shape(model.init, jax.random.key(0), sample, 0, jnp.zeros((1, 5, 32)))


def test_mismatched_adapter_is_a_conversion_error():
  unet = dict(_our_unet_config())
  with pytest.raises(torch_layout.ConversionError, match=r'block_out_channels \(320, 640'):
    ma_lib.unet_config_with_adapter(unet, dict(block_out_channels=[320, 640]))
  with pytest.raises(torch_layout.ConversionError, match='motion_layers_per_block=2'):
    ma_lib.unet_config_with_adapter(unet, dict(TINY_ADAPTER, motion_layers_per_block=2))


def test_analytic_flops_match_xla():
  """The analytic FLOPs counter knows the motion modules (XLA's count of the compiled forward)."""
  config = tiny.get_config()
  config.model.unet.update(temporal_attention='animatediff', temporal_mask='none',
                           temporal_position='none', motion_num_attention_heads=2)
  entry = flops.count_flops(config, memory=False)['denoiser']
  ratio = entry['analytic']['total'] / entry['xla']
  assert abs(ratio - 1) <= 0.05, f'analytic / XLA FLOPs {ratio:.4f}'


def test_image_frames_bypass_the_motion_modules():
  """Joint image-video batches: frames with frame_mask False go through the image model, and the
  video frames do not see them (neither in the attention nor in the clip GroupNorm)."""
  rng = np.random.default_rng(4)
  sample, timesteps, context = _inputs(rng, batch=1)
  model = unet_lib.UNet(**_our_unet_config(frame_adaptor=False, fps_embedding=False))
  params = jax.device_get(model.init(jax.random.key(0), sample, timesteps, context)['params'])
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape), params)
  mask = np.array([[True, True, False, False]])
  got = model.apply({'params': params}, sample, timesteps, context, frame_mask=mask)
  image_model = unet_lib.UNet(**dict(_our_unet_config(), temporal_attention='none',
                                     frame_adaptor=False, fps_embedding=False))
  image_params = {k: v for k, v in params.items()}
  for name in list(image_params):
    if isinstance(image_params[name], dict):
      image_params[name] = {k: v for k, v in image_params[name].items()
                            if not k.startswith('motion_modules')}
  image = image_model.apply({'params': image_params}, sample, timesteps, context)
  err = float(jnp.abs(got[:, 2:] - image[:, 2:]).max())
  assert err <= 1e-5, f'image frames: max abs err {err:.2e} from the image U-Net'
  other = sample.copy()
  other[:, 2:] = rng.standard_normal(other[:, 2:].shape)
  moved = model.apply({'params': params}, other, timesteps, context, frame_mask=mask)
  err = float(jnp.abs(moved[:, :2] - got[:, :2]).max())
  assert err <= 1e-5, f'video frames changed by {err:.2e} with the image frames'
  assert float(jnp.abs(got[:, :2] - image[:, :2]).max()) > 1e-3  # The motion modules act.
