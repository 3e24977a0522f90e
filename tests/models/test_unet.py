"""U-Net: parity of the image part with diffusers, identity of the video extensions at init, their
wiring, directed (causal) temporal attention, still-image frames, and SD 1.5 parameter counts."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from flax import traverse_util

from magicvideo_jax.weights import torch_layout
from magicvideo_jax.models import unet as unet_lib
from magicvideo_jax.models.unet import UNet

TINY = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), layers_per_block=1, attention_head_dim=4,
    cross_attention_dim=32, norm_num_groups=8)
IMAGE = dict(frame_adaptor=False, temporal_attention='none', fps_embedding=False)
BATCH, FRAMES, SIZE, CONTEXT_LEN = 2, 4, 16, 7
NUM_FRAMES = 6  # Adaptor rows; > FRAMES so that slicing is exercised.


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def flat(tree):
  return traverse_util.flatten_dict(nn.unbox(tree), sep='/')


def torch_unet(seed=0, **extra):
  """A tiny diffusers U-Net with random weights (norm scales and biases perturbed too)."""
  torch.manual_seed(seed)
  model = UNet2DConditionModel(sample_size=SIZE, **dict(TINY, **extra)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def run_torch(model, x, t, ctx):
  """x `[B, h, w, C]` channels-last -> `[B, h, w, C]`."""
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                torch.from_numpy(ctx)).sample
  return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  return types.SimpleNamespace(
      x=rng.standard_normal((BATCH, FRAMES, SIZE, SIZE, 4)).astype(np.float32),
      t=np.array([10, 730], np.int32),
      ctx=rng.standard_normal((BATCH, CONTEXT_LEN, 32)).astype(np.float32),
      fps=np.array([4.0, 12.0], np.float32))


@pytest.fixture(scope='module')
def image(data):
  """Image U-Net with the torch weights; `per_frame(x)` applies it to every frame separately."""
  ref, state = torch_unet()
  model = UNet(**TINY, **IMAGE)
  template = jax.eval_shape(model.init, jax.random.key(0), data.x[:, :1], data.t, data.ctx)['params']
  params = torch_layout.state_dict_to_params(state, template)
  apply = jax.jit(model.apply)

  def per_frame(x, t=data.t, ctx=data.ctx):
    b, f = x.shape[:2]
    out = apply({'params': params}, x.reshape((b * f, 1) + x.shape[2:]), np.repeat(t, f),
                np.repeat(ctx, f, axis=0))
    return np.asarray(out).reshape(x.shape[:2] + out.shape[2:])

  return types.SimpleNamespace(ref=ref, model=model, params=params, apply=apply,
                               per_frame=per_frame)


@pytest.fixture(scope='module')
def video(data, image):
  """Video U-Net (all extensions on): init params with the image params copied in, and perturbed."""
  model = UNet(**TINY, num_frames=NUM_FRAMES, temporal_attention='parallel', temporal_mask='causal',
               temporal_position='rope')
  # Initialises only the video-only parameters (a full `model.init` takes 3-5x longer to compile).
  grow = jax.jit(lambda p, key: unet_lib.init_video_params(model, p, key, data.x, data.t, data.ctx))
  boxed = grow(image.params, jax.random.key(1))
  params = flat(boxed)
  full = flat(jax.eval_shape(model.init, jax.random.key(1), data.x, data.t, data.ctx)['params'])
  assert {p: v.shape for p, v in params.items()} == {p: v.shape for p, v in full.items()}
  image_flat = flat(image.params)
  video_only = sorted(p for p in params if torch_layout.is_video_only(p))
  assert set(params) - set(video_only) == set(image_flat), 'image part must mirror the image U-Net'
  assert all(np.array_equal(params[p], image_flat[p]) for p in image_flat)
  rng = np.random.default_rng(1)
  perturbed = dict(params)
  for p in video_only:
    perturbed[p] = params[p] + 0.3 * rng.standard_normal(params[p].shape).astype(np.float32)
  unflat = lambda d: traverse_util.unflatten_dict(d, sep='/')
  return types.SimpleNamespace(
      boxed=boxed, video_only=video_only, params=unflat(params), perturbed=unflat(perturbed),
      flat=params, flat_perturbed=perturbed, unflat=unflat)


def video_apply(**fields):
  model = UNet(**TINY, num_frames=NUM_FRAMES, **fields)
  return jax.jit(model.apply)


_APPLY = {}


def cached_apply(mode, mask, position):
  key = (mode, mask, position)
  if key not in _APPLY:
    _APPLY[key] = video_apply(temporal_attention=mode, temporal_mask=mask, temporal_position=position)
  return _APPLY[key]


# --------------------------------------------------------------------------------------------------
# Image part vs diffusers.
# --------------------------------------------------------------------------------------------------


def test_image_unet_matches_diffusers(data, image):
  ours = image.per_frame(data.x)  # The 8 frames as 8 one-frame clips (the compile is shared).
  x = data.x.reshape((-1, SIZE, SIZE, 4))
  ref = run_torch(image.ref, x, np.repeat(data.t, FRAMES).astype(np.int64),
                  np.repeat(data.ctx, FRAMES, axis=0)).reshape(ours.shape)
  err = rel_err(ours, ref)
  print(f'image U-Net vs diffusers: max rel err {err:.2e}, max abs err '
        f'{np.abs(ours - ref).max():.2e}')
  assert err <= 1e-4


def test_image_unet_linear_projection_matches_diffusers(data):
  variant = dict(use_linear_projection=True, attention_head_dim=2, layers_per_block=2)
  ref, state = torch_unet(seed=3, **variant)
  model = UNet(**dict(TINY, **variant), **IMAGE)
  x = data.x[:, :1]
  template = jax.eval_shape(model.init, jax.random.key(0), x, data.t, data.ctx)['params']
  params = torch_layout.state_dict_to_params(state, template)
  assert flat(params)['down_blocks_0/attentions_0/proj_in/kernel'].ndim == 2  # Dense, not conv.
  ours = np.asarray(jax.jit(model.apply)({'params': params}, x, data.t, data.ctx))
  ref_out = run_torch(ref, x[:, 0], data.t.astype(np.int64), data.ctx)
  err = rel_err(ours[:, 0], ref_out)
  print(f'image U-Net (linear projection, 2 heads, 2 layers) vs diffusers: max rel err {err:.2e}')
  assert err <= 1e-4


def test_remat_changes_nothing(data, image):
  model = UNet(**TINY, **IMAGE, remat=True)
  x = data.x.reshape((-1, 1, SIZE, SIZE, 4))
  ctx = np.repeat(data.ctx, FRAMES, axis=0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, 5.0, ctx)['params']
  assert set(flat(shapes)) == set(flat(image.params))
  out = jax.jit(model.apply)({'params': image.params}, x, 5.0, ctx)  # Scalar float timestep.
  ref = image.apply({'params': image.params}, x, np.full((len(x),), 5, np.int32), ctx)
  assert rel_err(out, ref) <= 1e-6


# --------------------------------------------------------------------------------------------------
# Video extensions.
# --------------------------------------------------------------------------------------------------


def test_video_parameter_names_and_axes(video):
  names = video.video_only
  assert any('conv1_adaptor/scale' in p for p in names)
  assert any('conv2_adaptor/bias' in p for p in names)
  assert any('transformer_blocks_0/temporal_attn/to_out_0/kernel' in p for p in names)
  assert any('transformer_blocks_0/temporal_norm/scale' in p for p in names)
  assert 'fps_embedding/linear_2/kernel' in names
  adaptor = traverse_util.flatten_dict(video.boxed, sep='/')[
      'down_blocks_0/resnets_0/conv1_adaptor/scale']
  assert adaptor.names == ('frames', 'norm')
  assert adaptor.value.shape == (NUM_FRAMES, 32)


_NO_FPS = {}


def apply_without_fps(mode):
  """The video U-Net called without fps (a separate trace)."""
  if mode not in _NO_FPS:
    model = UNet(**TINY, num_frames=NUM_FRAMES, temporal_attention=mode)
    _NO_FPS[mode] = jax.jit(lambda p, x, t, c: model.apply(p, x, t, c))
  return _NO_FPS[mode]


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
def test_video_unet_at_init_is_the_image_unet_per_frame(data, image, video, mode):
  if mode == 'parallel':  # With fps (zero-initialised path), causal mask and RoPE.
    out = cached_apply(mode, 'causal', 'rope')({'params': video.params}, data.x, data.t, data.ctx,
                                                data.fps)
  else:  # Without fps.
    out = apply_without_fps(mode)({'params': video.params}, data.x, data.t, data.ctx)
  ref = image.per_frame(data.x)
  err = rel_err(out, ref)
  print(f'video U-Net ({mode}) at init vs image U-Net per frame: max rel err {err:.2e}')
  assert err <= 1e-5


@pytest.mark.parametrize('group', ['adaptor', 'temporal', 'fps_', 'all'])
def test_video_extensions_are_wired_in(data, image, video, group):
  params = dict(video.flat)
  for p in video.video_only:
    if group == 'all' or group in p:
      params[p] = video.flat_perturbed[p]
  out = cached_apply('parallel', 'causal', 'rope')(
      {'params': video.unflat(params)}, data.x, data.t, data.ctx, data.fps)
  err = rel_err(out, image.per_frame(data.x))
  print(f'perturbed {group}: rel change {err:.2e}')
  assert err > 1e-3


def test_fps_none_adds_nothing(data, image, video):
  params = dict(video.flat)
  for p in video.video_only:
    if p.startswith('fps_'):
      params[p] = video.flat_perturbed[p]
  none = apply_without_fps('sequential')({'params': video.unflat(params)}, data.x, data.t, data.ctx)
  assert rel_err(none, image.per_frame(data.x)) <= 1e-5
  # (test_video_extensions_are_wired_in[fps_] shows that the same fps parameters act when fps is given.)


# --------------------------------------------------------------------------------------------------
# Directed temporal attention through the whole network (convs and GroupNorm are per frame).
# --------------------------------------------------------------------------------------------------


def frame_changes(apply, params, data, k, fps=True):
  """Max abs change of each output frame when input frame k of clip 0 is perturbed."""
  x = np.stack([data.x[0], data.x[0]])
  x[1, k] += np.random.default_rng(2).standard_normal(x[1, k].shape).astype(np.float32)
  args = (x, data.t[[0, 0]], data.ctx[[0, 0]]) + ((data.fps[[0, 0]],) if fps else ())
  out = np.asarray(apply({'params': params}, *args))
  return np.abs(out[1] - out[0]).reshape(FRAMES, -1).max(axis=1)


@pytest.mark.parametrize('mode,mask,position', [
    ('parallel', 'causal', 'rope'),
    ('sequential', 'causal', 'none'),
    ('parallel', 'causal_post_softmax', 'none'),
    ('parallel', 'none', 'none'),
])
def test_directed_temporal_attention(data, video, mode, mask, position):
  k = 2
  if mode == 'sequential':  # Shares the compile of the identity test (no fps).
    change = frame_changes(apply_without_fps(mode), video.perturbed, data, k, fps=False)
  else:
    change = frame_changes(cached_apply(mode, mask, position), video.perturbed, data, k)
  print(f'{mode}/{mask}/{position}: per-frame change when frame {k} moves: {change}')
  assert np.all(change[k:] > 1e-3), 'frame k and later frames must see frame k'
  if mask == 'causal':
    assert np.all(change[:k] <= 1e-6), 'earlier frames must not see frame k'
  else:
    # 'none' is bidirectional. 'causal_post_softmax' (softmax over all frames, then the triangular
    # mask) excludes later frames' values but its softmax normaliser still sees their keys.
    assert np.all(change[:k] > 1e-6)


def test_post_softmax_attention_is_the_literal_formula():
  rng = np.random.default_rng(4)
  b, f, c, heads = 3, 5, 8, 2
  x = rng.standard_normal((b, f, c)).astype(np.float32)
  layer = unet_lib.Attention(heads, c // heads, zero_out=False)
  params = jax.jit(layer.init)(jax.random.key(0), x)['params']
  _, post = unet_lib.temporal_masks(f, 'causal_post_softmax', None)
  out = jax.jit(lambda p, x: layer.apply({'params': p}, x, post_mask=post))(params, x)
  p = {k: np.asarray(v['kernel']) for k, v in nn.unbox(params).items()}
  q, key, v = (np.einsum('bfc,cd->bfd', x, p[n]).reshape(b, f, heads, -1)
               for n in ('to_q', 'to_k', 'to_v'))
  logits = np.einsum('bqnd,bknd->bnqk', q, key) / np.sqrt(c // heads)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True) * np.tril(np.ones((f, f)))
  ref = np.einsum('bnqk,bknd->bqnd', w, v).reshape(b, f, c)
  ref = ref @ p['to_out_0'] + np.asarray(nn.unbox(params)['to_out_0']['bias'])
  assert rel_err(out, ref) <= 1e-5


def test_rope_depends_on_relative_position():
  rng = np.random.default_rng(5)
  q = rng.standard_normal((1, 1, 1, 48)).astype(np.float32)
  k = rng.standard_normal((1, 1, 1, 48)).astype(np.float32)
  dot = lambda pq, pk: float(np.sum(unet_lib.apply_rope(q, jnp.array([pq])) *
                                    unet_lib.apply_rope(k, jnp.array([pk]))))
  assert abs(dot(3, 1) - dot(7, 5)) <= 1e-4
  assert abs(dot(3, 1) - dot(3, 2)) > 1e-3
  rotated = np.asarray(unet_lib.apply_rope(q, jnp.array([4])))
  np.testing.assert_array_equal(rotated[..., 32:], q[..., 32:])  # Only the first 32 dims rotate.


# --------------------------------------------------------------------------------------------------
# Still images appended to clips (joint image-video training).
# --------------------------------------------------------------------------------------------------


def test_image_frames_pass_through_as_images(data, image, video):
  apply = video_apply(temporal_position='rope')
  x = np.stack([data.x[0]] * 4)
  x[2, 0] += 1.0  # Clip 2: a video frame moves.
  x[3, 2] += 1.0  # Clip 3: the image frame moves.
  mask = np.array([[True] * FRAMES] + [[True, True, False, True]] * 3)
  t, ctx, fps = data.t[[0] * 4], data.ctx[[0] * 4], data.fps[[0] * 4]
  out = np.asarray(apply({'params': video.perturbed}, x, t, ctx, fps, mask))
  # An all-True mask is the same as no mask.
  no_mask = cached_apply('parallel', 'causal', 'rope')(
      {'params': video.perturbed}, x[:2], t[:2], ctx[:2], fps[:2])
  assert rel_err(out[0], no_mask[0]) <= 1e-5
  # The image frame (index 2) ignores the video frames ...
  assert np.abs(out[2, 2] - out[1, 2]).max() <= 1e-6
  assert np.abs(out[2, 3] - out[1, 3]).max() > 1e-3  # (while the later video frame sees frame 0)
  # ... the video frames ignore the image frame ...
  assert np.abs(out[3, [0, 1, 3]] - out[1, [0, 1, 3]]).max() <= 1e-6
  assert np.abs(out[3, 2] - out[1, 2]).max() > 1e-3
  # ... and the image frame's output is the image U-Net's (no adaptor, no fps, no temporal layer).
  ref = image.per_frame(x[:2], t[:2], ctx[:2])[1, 2]
  err = rel_err(out[1, 2], ref)
  print(f'image frame (perturbed video params) vs image U-Net: max rel err {err:.2e}')
  assert err <= 1e-5


def test_too_many_frames_is_a_clear_error(data):
  model = UNet(**TINY, num_frames=2)
  with pytest.raises(ValueError, match='num_frames'):
    jax.eval_shape(model.init, jax.random.key(0), data.x, data.t, data.ctx)


# --------------------------------------------------------------------------------------------------
# SD 1.5 sizes (shapes only, nothing allocated).
# --------------------------------------------------------------------------------------------------


def count(tree):
  return sum(int(np.prod(v.shape)) for v in flat(tree).values())


def test_sd15_parameter_counts():
  from magicvideo_jax import config as common  # pylint: disable=g-import-not-at-top
  cfg = common.unet_sd15().to_dict()
  x = jax.ShapeDtypeStruct((1, 2, 8, 8, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  ctx = jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)
  fps = jax.ShapeDtypeStruct((1,), jnp.float32)
  image_shapes = jax.eval_shape(UNet(**common.image_only(common.unet_sd15()).to_dict()).init,
                                jax.random.key(0), x, t, ctx)['params']
  video_shapes = jax.eval_shape(UNet(**cfg).init, jax.random.key(0), x, t, ctx, fps)['params']
  with torch.device('meta'):
    ref = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
  torch_count = sum(p.numel() for p in ref.parameters())
  n_image, n_video = count(image_shapes), count(video_shapes)
  added = {g: sum(int(np.prod(v.shape)) for p, v in flat(video_shapes).items()
                  if torch_layout.is_video_only(p) and g in p) for g in ('adaptor', 'temporal', 'fps_')}
  print(f'SD 1.5 image U-Net: ours {n_image:,}, diffusers {torch_count:,}; video U-Net {n_video:,} '
        f'(+{n_video - n_image:,} video parameters: {added})')
  assert n_image == torch_count == 859_520_964
  assert set(flat(image_shapes)) <= set(flat(video_shapes))
  assert n_video - n_image == sum(added.values())


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
@pytest.mark.parametrize('policy', ['none', 'dots_saveable', 'dots_with_no_batch_dims_saveable'])
def test_remat_policies_same_gradients(data, policy):
  """Every remat policy computes the same loss gradient as 'full' (model.remat=True alone)."""
  x = data.x
  ctx = data.ctx
  base = UNet(**TINY, num_frames=NUM_FRAMES, remat=True)
  params = base.init(jax.random.key(0), x, data.t, ctx)['params']

  def grads(model):
    loss = lambda p: jnp.sum(jnp.square(model.apply({'params': p}, x, data.t, ctx)))
    return jax.jit(jax.grad(loss))(params)

  ref = flat(grads(base))
  out = flat(grads(UNet(**TINY, num_frames=NUM_FRAMES, remat=True, remat_policy=policy)))
  err = max(rel_err(out[k], ref[k]) for k in ref if np.abs(np.asarray(ref[k])).max() > 0)
  print(f'remat_policy={policy} vs full: max rel err of the gradients {err:.2e}')
  assert err <= 1e-5


def test_remat_policy_validated(data):
  model = UNet(**TINY, remat_policy='everything')
  with pytest.raises(ValueError, match='remat_policy'):
    jax.eval_shape(model.init, jax.random.key(0), data.x, data.t, data.ctx)
