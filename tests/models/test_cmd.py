"""CMD networks: parity with PyTorch references at random weights (diffusers' adaLN-Zero block, a
hand-written divided space-time block and autoencoder, a motion DiT assembled from diffusers blocks),
and the properties the design relies on (zero output at init, content weights, z_m's range)."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import (TimestepEmbedding, Timesteps, get_1d_sincos_pos_embed_from_grid,
                                         get_2d_sincos_pos_embed)
from flax import traverse_util

from magicvideo_jax.models import cmd

torch.set_num_threads(1)  # Tiny models: threads only contend on the shared cores.

# Clip [B, L, H, W, C] with H' = 4 != W' = 6 (patch 2), so the motion planes are not square.
BATCH, FRAMES, HEIGHT, WIDTH, CHANNELS = 2, 4, 8, 12, 4
AE = dict(width=32, depth=2, heads=4, patch_size=2, motion_channels=3)
ROWS, COLS = HEIGHT // AE['patch_size'], WIDTH // AE['patch_size']
# Motion DiT on z_m [B, L, W' + H', D] = [2, 4, 10, 3]: a 2 x 5 token grid; content 8x12, kp 4: 2 x 3.
DIT = dict(hidden_size=32, depth=2, heads=4, patch_size=2, content_patch_size=4)
TEXT = 16
TOL = 1e-5


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def check(name, ours, ref):
  err = rel_err(ours, ref)
  print(f'{name}: max rel err {err:.2e}')
  assert err <= TOL, f'{name}: max rel err {err:.2e} > {TOL}'


def t2n(t):
  return t.detach().numpy()


def randomise(module, seed):
  """Every torch parameter drawn at random (norm affines and biases too)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.3 * torch.randn_like(p))
  return module.eval()


def assert_same_tree(params, template):
  """The mapped parameters fill the Linen module's tree exactly (paths and shapes)."""
  shapes = lambda tree: {k: tuple(v.shape) for k, v in
                         traverse_util.flatten_dict(nn.unbox(tree), sep='/').items()}
  assert shapes(params) == shapes(template)


# ------------------------------------------------------------------------------------------------
# Torch -> Linen parameter mapping, one function per torch layer type.
# ------------------------------------------------------------------------------------------------


def linear(m):
  return {'kernel': t2n(m.weight).T, 'bias': t2n(m.bias)}


def conv1x1(m):
  return {'kernel': t2n(m.weight)[:, :, 0, 0].T, 'bias': t2n(m.bias)}


def patch_conv(m):
  """Conv2d [out, in, p, q] (kernel = stride) -> the Linear on (p q c)-flattened patches."""
  w = t2n(m.weight)
  return {'kernel': w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]), 'bias': t2n(m.bias)}


def transposed_conv(m):
  """ConvTranspose2d [in, out, p, q] -> `TransposedPatchConv` [in, p, q, out]."""
  return {'kernel': t2n(m.weight).transpose(0, 2, 3, 1), 'bias': t2n(m.bias)}


def layer_norm(m):
  return {'scale': t2n(m.weight), 'bias': t2n(m.bias)}


def attention(m):
  """Our `RefAttention` and diffusers' `Attention` name their projections alike."""
  out = m.to_out[0] if isinstance(m.to_out, torch.nn.ModuleList) else m.to_out
  return {'to_q': linear(m.to_q), 'to_k': linear(m.to_k), 'to_v': linear(m.to_v),
          'to_out_0': linear(out)}


# ------------------------------------------------------------------------------------------------
# Hand-written torch reference of the autoencoder, from the CMD description.
# ------------------------------------------------------------------------------------------------


class RefAttention(torch.nn.Module):
  """Multi-head self-attention, biased q, k, v and output, explicit softmax; [N, T, C] -> same."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(dim, dim) for _ in range(4))

  def forward(self, x):
    n, t, c = x.shape
    split = lambda y: y.reshape(n, t, self.heads, c // self.heads).transpose(1, 2)
    q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
    weights = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1)
    return self.to_out((weights @ v).transpose(1, 2).reshape(n, t, c))


class RefSpaceTimeBlock(torch.nn.Module):
  """Time attention, space attention, GEGLU feed-forward, each pre-LN residual; [B, L, h, w, C]."""

  def __init__(self, dim, heads):
    super().__init__()
    self.norm_time, self.norm_space, self.norm_ff = (torch.nn.LayerNorm(dim) for _ in range(3))
    self.attn_time, self.attn_space = RefAttention(dim, heads), RefAttention(dim, heads)
    self.ff_in, self.ff_out = torch.nn.Linear(dim, 8 * dim), torch.nn.Linear(4 * dim, dim)

  def forward(self, x):
    b, l, h, w, c = x.shape
    t = self.norm_time(x).permute(0, 2, 3, 1, 4).reshape(b * h * w, l, c)
    x = x + self.attn_time(t).reshape(b, h, w, l, c).permute(0, 3, 1, 2, 4)
    s = self.norm_space(x).reshape(b * l, h * w, c)
    x = x + self.attn_space(s).reshape(b, l, h, w, c)
    a, gate = self.ff_in(self.norm_ff(x)).chunk(2, dim=-1)
    return x + self.ff_out(a * torch.nn.functional.gelu(gate))

  def to_linen(self):
    return {'norm_time': layer_norm(self.norm_time), 'attn_time': attention(self.attn_time),
            'norm_space': layer_norm(self.norm_space), 'attn_space': attention(self.attn_space),
            'norm_ff': layer_norm(self.norm_ff),
            'ff': {'net_0': {'proj': linear(self.ff_in)}, 'net_2': linear(self.ff_out)}}


class RefStack(torch.nn.Module):
  """Optional learned (t, h, w) positions, then the blocks."""

  def __init__(self, dim, depth, heads, positions, frames, rows, cols):
    super().__init__()
    self.positions = positions
    if positions == 'learned':
      self.pos_frames = torch.nn.Parameter(torch.zeros(frames, dim))
      self.pos_rows = torch.nn.Parameter(torch.zeros(rows, dim))
      self.pos_cols = torch.nn.Parameter(torch.zeros(cols, dim))
    self.blocks = torch.nn.ModuleList(RefSpaceTimeBlock(dim, heads) for _ in range(depth))

  def forward(self, x):
    if self.positions == 'learned':
      x = x + self.pos_frames[:, None, None] + self.pos_rows[:, None] + self.pos_cols
    for block in self.blocks:
      x = block(x)
    return x

  def to_linen(self):
    out = {f'blocks_{i}': block.to_linen() for i, block in enumerate(self.blocks)}
    if self.positions == 'learned':
      out['positions'] = {'frames': t2n(self.pos_frames), 'rows': t2n(self.pos_rows),
                          'cols': t2n(self.pos_cols)}
    return out


def per_frame(conv, x):
  """A 2D conv applied to each frame of channels-last [B, L, h, w, C]."""
  b, l = x.shape[:2]
  y = conv(x.reshape((b * l,) + x.shape[2:]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  return y.reshape((b, l) + y.shape[1:])


class RefAutoencoder(torch.nn.Module):
  """CMD's autoencoder in torch, channels-last at its interfaces: convs for the patch embeddings,
  transposed convs for the heads, 1x1 convs for the motion projections."""

  def __init__(self, width, depth, heads, patch_size, motion_channels, positions, content_frame):
    super().__init__()
    p, d = patch_size, motion_channels
    self.content_frame = content_frame
    stack = lambda: RefStack(width, depth, heads, positions, FRAMES, ROWS, COLS)
    self.patch_embed = torch.nn.Conv2d(CHANNELS, width, p, stride=p)
    self.encoder_stack = stack()
    if content_frame == 'learned':
      self.content_head = torch.nn.ConvTranspose2d(width, CHANNELS, p, stride=p)
    self.motion_width = torch.nn.Conv2d(width, d, 1)
    self.motion_height = torch.nn.Conv2d(width, d, 1)
    self.content_embed = torch.nn.Conv2d(CHANNELS, width, p, stride=p)
    self.motion_width_embed = torch.nn.Conv2d(d, width, 1)
    self.motion_height_embed = torch.nn.Conv2d(d, width, 1)
    self.decoder_stack = stack()
    self.unpatch = torch.nn.ConvTranspose2d(width, CHANNELS, p, stride=p)

  @staticmethod
  def plane(conv, x):
    """1x1 conv of [B, L, n, C] (a [L, n] image)."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

  def encode(self, x):
    h = self.encoder_stack(per_frame(self.patch_embed, x))
    if self.content_frame == 'learned':
      content = (torch.softmax(per_frame(self.content_head, h), dim=1) * x).sum(1)
    else:
      content = x.mean(1)
    width_plane = self.plane(self.motion_width, h.mean(2))
    height_plane = self.plane(self.motion_height, h.mean(3))
    return content, torch.tanh(torch.cat([width_plane, height_plane], dim=2))

  def decode(self, content, motion):
    h = self.content_embed(content.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, H', W', C']
    cols = h.shape[2]
    h = (h[:, None] + self.plane(self.motion_width_embed, motion[:, :, :cols])[:, :, None]
         + self.plane(self.motion_height_embed, motion[:, :, cols:])[:, :, :, None])
    return per_frame(self.unpatch, self.decoder_stack(h))

  def to_linen(self):
    encoder = dict(self.encoder_stack.to_linen(), patch_embed=patch_conv(self.patch_embed),
                   motion_width=conv1x1(self.motion_width), motion_height=conv1x1(self.motion_height))
    if self.content_frame == 'learned':
      encoder['content_head'] = transposed_conv(self.content_head)
    decoder = dict(self.decoder_stack.to_linen(), content_embed=patch_conv(self.content_embed),
                   motion_width_embed=conv1x1(self.motion_width_embed),
                   motion_height_embed=conv1x1(self.motion_height_embed),
                   unpatch=transposed_conv(self.unpatch))
    return {'encoder': encoder, 'decoder': decoder}


# ------------------------------------------------------------------------------------------------
# Motion DiT reference: diffusers' adaLN-Zero blocks + hand-written patch, positions, final layer.
# ------------------------------------------------------------------------------------------------


class GivenConditioning(torch.nn.Module):
  """Stands in for a block's `norm1.emb`: hands the conditioning c (passed as class_labels) through."""

  def forward(self, timestep, class_labels, hidden_dtype=None):
    del timestep, hidden_dtype
    return class_labels


def diffusers_dit_block(dim, heads):
  block = BasicTransformerBlock(
      dim, heads, dim // heads, activation_fn='gelu-approximate', num_embeds_ada_norm=1000,
      attention_bias=True, norm_type='ada_norm_zero', norm_elementwise_affine=False, norm_eps=1e-6)
  block.norm1.emb = GivenConditioning()
  return block


def dit_block_to_linen(block):
  return {'norm1': {'linear': linear(block.norm1.linear)}, 'attn1': attention(block.attn1),
          'ff': {'net_0': {'proj': linear(block.ff.net[0].proj)}, 'net_2': linear(block.ff.net[2])}}


def ref_positions(dim, rows, cols, grid):
  """diffusers' 1D sin-cos embedding of the column (first half) and row (second half) of each token."""
  if grid == 'square':
    rows = cols = int(round((rows * cols) ** 0.5))
  row = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
  col = torch.arange(cols, dtype=torch.float64).repeat(rows)
  return torch.cat([get_1d_sincos_pos_embed_from_grid(dim // 2, col),
                    get_1d_sincos_pos_embed_from_grid(dim // 2, row)], dim=1).float()


class RefMotionDiT(torch.nn.Module):

  def __init__(self, hidden_size, depth, heads, patch_size, content_patch_size, motion_channels,
               content_channels, text_dim, grid):
    super().__init__()
    d, p = hidden_size, patch_size
    self.p, self.grid = p, grid
    self.motion_embed = torch.nn.Conv2d(motion_channels, d, p, stride=p)
    self.content_embed = torch.nn.Conv2d(content_channels, d, content_patch_size,
                                         stride=content_patch_size)
    self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    self.time_embedding = TimestepEmbedding(256, d)
    self.text_proj = torch.nn.Linear(text_dim, d)
    self.blocks = torch.nn.ModuleList(diffusers_dit_block(d, heads) for _ in range(depth))
    self.norm_out = torch.nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.proj_out_1 = torch.nn.Linear(d, 2 * d)
    self.proj_out_2 = torch.nn.Linear(d, p * p * motion_channels)

  def tokens(self, conv, x):
    h = conv(x.permute(0, 3, 1, 2))  # [B, d, rows, cols]
    pos = ref_positions(h.shape[1], h.shape[2], h.shape[3], self.grid)
    return h.flatten(2).transpose(1, 2) + pos

  def forward(self, motion, timesteps, content, text):
    b, frames, length, channels = motion.shape
    x = self.tokens(self.motion_embed, motion)
    n = x.shape[1]
    x = torch.cat([x, self.tokens(self.content_embed, content)], dim=1)
    c = self.time_embedding(self.time_proj(timesteps)) + self.text_proj(text)
    for block in self.blocks:
      x = block(x, timestep=None, class_labels=c)
    shift, scale = self.proj_out_1(torch.nn.functional.silu(c)).chunk(2, dim=1)
    x = self.proj_out_2(self.norm_out(x[:, :n]) * (1 + scale[:, None]) + shift[:, None])
    x = x.reshape(b, frames // self.p, length // self.p, self.p, self.p, channels)
    return torch.einsum('nhwpqc->nhpwqc', x).reshape(b, frames, length, channels)

  def to_linen(self):
    out = {f'transformer_blocks_{i}': dit_block_to_linen(block) for i, block in enumerate(self.blocks)}
    out.update(motion_embed=patch_conv(self.motion_embed), content_embed=patch_conv(self.content_embed),
               time_embedding={'linear_1': linear(self.time_embedding.linear_1),
                               'linear_2': linear(self.time_embedding.linear_2)},
               text_proj=linear(self.text_proj), proj_out_1=linear(self.proj_out_1),
               proj_out_2=linear(self.proj_out_2))
    return out


# ------------------------------------------------------------------------------------------------
# Fixtures.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  motion_len = COLS + ROWS
  return types.SimpleNamespace(
      x=rng.standard_normal((BATCH, FRAMES, HEIGHT, WIDTH, CHANNELS)).astype(np.float32),
      motion=rng.standard_normal((BATCH, FRAMES, motion_len, AE['motion_channels'])).astype(np.float32),
      t=np.array([10, 730], np.int32),
      content=rng.standard_normal((BATCH, HEIGHT, WIDTH, CHANNELS)).astype(np.float32),
      text=rng.standard_normal((BATCH, TEXT)).astype(np.float32))


def dit_args(data):
  return data.motion, data.t, data.content, data.text


def torch_dit_args(data):
  return (torch.from_numpy(data.motion), torch.from_numpy(data.t), torch.from_numpy(data.content),
          torch.from_numpy(data.text))


@pytest.fixture(scope='module')
def dit_init(data):
  """A MotionDiT, its init params, and the params with every entry perturbed (zero-init ones too)."""
  model = cmd.MotionDiT(**DIT)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *dit_args(data))['params'])
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  perturbed = jax.tree_util.tree_unflatten(
      tree, [v + 0.2 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
  return types.SimpleNamespace(model=model, params=params, perturbed=perturbed,
                               apply=jax.jit(model.apply))


# ------------------------------------------------------------------------------------------------
# Parity.
# ------------------------------------------------------------------------------------------------


def test_sincos_positions_match_diffusers():
  """Square grid: diffusers' 2D table; non-square: diffusers' 1D embedding of column and row."""
  square = get_2d_sincos_pos_embed(32, 4, base_size=4, output_type='pt').numpy()
  check('sin-cos 4x4 vs diffusers 2D', cmd.sincos_positions(32, 4, 4), square)
  check('sin-cos 2x5 vs diffusers 1D', cmd.sincos_positions(32, 2, 5),
        ref_positions(32, 2, 5, 'true').numpy())
  # 'square' lays the 4x4 table over a 2 x 8 grid in raster order; it differs from the true grid.
  np.testing.assert_array_equal(cmd.grid_positions(32, 2, 8, 'square'), cmd.sincos_positions(32, 4, 4))
  assert not np.allclose(cmd.grid_positions(32, 2, 8, 'true'), cmd.sincos_positions(32, 4, 4))
  with pytest.raises(ValueError, match='square number'):
    cmd.grid_positions(32, 2, 5, 'square')


def test_dit_block_matches_diffusers():
  """(a) DiTBlock vs diffusers' BasicTransformerBlock (ada_norm_zero), all weights random."""
  dim, heads, tokens = 32, 4, 10
  block = randomise(diffusers_dit_block(dim, heads), seed=1)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((BATCH, tokens, dim)).astype(np.float32)
  cond = rng.standard_normal((BATCH, dim)).astype(np.float32)
  model = cmd.DiTBlock(heads)
  params = dit_block_to_linen(block)
  assert_same_tree(params, jax.eval_shape(model.init, jax.random.key(0), x, cond)['params'])
  ours = jax.jit(model.apply)({'params': params}, x, cond)
  with torch.no_grad():
    ref = block(torch.from_numpy(x), timestep=None, class_labels=torch.from_numpy(cond))
  check('DiT block vs diffusers BasicTransformerBlock', ours, t2n(ref))


def test_space_time_block_matches_torch():
  """(b) SpaceTimeBlock vs the hand-written torch block on [B, L, H', W', C'] with H' != W'."""
  dim = AE['width']
  block = randomise(RefSpaceTimeBlock(dim, AE['heads']), seed=3)
  x = np.random.default_rng(4).standard_normal((BATCH, FRAMES, ROWS, COLS, dim)).astype(np.float32)
  model = cmd.SpaceTimeBlock(AE['heads'])
  params = block.to_linen()
  assert_same_tree(params, jax.eval_shape(model.init, jax.random.key(0), x)['params'])
  ours = jax.jit(model.apply)({'params': params}, x)
  with torch.no_grad():
    ref = block(torch.from_numpy(x))
  check('space-time block vs torch', ours, t2n(ref))


@pytest.mark.parametrize('positions,content_frame', [('learned', 'learned'), ('none', 'mean')])
def test_autoencoder_matches_torch(data, positions, content_frame):
  """(b) The whole autoencoder (encode, decode, reconstruction) vs the torch reference."""
  fields = dict(AE, positions=positions, content_frame=content_frame)
  ref = randomise(RefAutoencoder(**fields), seed=5)
  model = cmd.CMDAutoencoder(**fields)
  params = ref.to_linen()
  assert_same_tree(params, jax.eval_shape(model.init, jax.random.key(0), data.x)['params'])
  recon, content, motion = jax.jit(model.apply)({'params': params}, data.x)
  with torch.no_grad():
    ref_content, ref_motion = ref.encode(torch.from_numpy(data.x))
    ref_recon = ref.decode(ref_content, ref_motion)
  tag = f'autoencoder ({positions}, {content_frame}) vs torch'
  if content_frame == 'learned':  # 'mean' is checked exactly in test_mean_content_is_frame_mean.
    check(f'{tag}: z_c', content, t2n(ref_content))
  check(f'{tag}: z_m', motion, t2n(ref_motion))
  check(f'{tag}: reconstruction', recon, t2n(ref_recon))
  # decode alone, on a z_m not produced by the encoder.
  decoded = jax.jit(lambda p, c, m: model.apply({'params': p}, c, m, method='decode'))(
      params, data.content, np.tanh(data.motion))
  with torch.no_grad():
    ref_decoded = ref.decode(torch.from_numpy(data.content), torch.tanh(torch.from_numpy(data.motion)))
  check(f'{tag}: decode', decoded, t2n(ref_decoded))


@pytest.mark.parametrize('grid', ['true', 'square'])
def test_motion_dit_matches_torch(data, grid):
  """(c) The whole MotionDiT vs diffusers blocks + hand-written patch, positions and final layer."""
  motion, content = data.motion, data.content
  if grid == 'square':  # 16 motion tokens (2 x 8) and 6 content tokens would not be square.
    motion = np.concatenate([motion, motion[:, :, :6]], axis=2)  # [B, 4, 16, D]: 2 x 8 tokens.
    content = content[:, :, :8]  # 2 x 2 content tokens.
  ref = randomise(RefMotionDiT(**DIT, motion_channels=motion.shape[-1], content_channels=CHANNELS,
                               text_dim=TEXT, grid=grid), seed=6)
  model = cmd.MotionDiT(**DIT, position_grid=grid)
  args = (motion, data.t, content, data.text)
  params = ref.to_linen()
  assert_same_tree(params, jax.eval_shape(model.init, jax.random.key(0), *args)['params'])
  ours = jax.jit(model.apply)({'params': params}, *args)
  with torch.no_grad():
    expected = ref(*(torch.from_numpy(a) for a in args))
  assert ours.shape == motion.shape
  check(f'motion DiT ({grid} grid) vs torch', ours, t2n(expected))


# ------------------------------------------------------------------------------------------------
# Properties.
# ------------------------------------------------------------------------------------------------


def test_dit_is_zero_at_init(data, dit_init):
  out = np.asarray(dit_init.apply({'params': dit_init.params}, *dit_args(data)))
  assert out.shape == data.motion.shape
  assert np.all(out == 0.0)


def test_dit_depends_on_content_and_text(data, dit_init):
  """With the zero-init layers perturbed, changing z_c or the pooled text changes the prediction."""
  run = lambda motion, content, text: np.asarray(
      dit_init.apply({'params': dit_init.perturbed}, motion, data.t, content, text))
  base = run(data.motion, data.content, data.text)
  rng = np.random.default_rng(7)
  other_content = rng.standard_normal(data.content.shape).astype(np.float32)
  other_text = rng.standard_normal(data.text.shape).astype(np.float32)
  assert np.abs(base).max() > 0
  assert np.abs(run(data.motion, other_content, data.text) - base).max() > 1e-2 * np.abs(base).max()
  assert np.abs(run(data.motion, data.content, other_text) - base).max() > 1e-2 * np.abs(base).max()


@pytest.fixture(scope='module')
def autoencoder(data):
  model = cmd.CMDAutoencoder(**AE, positions='learned')
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), data.x)['params'])
  return model, params


def test_content_weights_sum_to_one(data, autoencoder):
  model, params = autoencoder
  (content, _), state = model.apply({'params': params}, data.x, method='encode',
                                    mutable=['intermediates'])
  weights = np.asarray(state['intermediates']['encoder']['content_weights'][0])
  assert weights.shape == data.x.shape
  assert weights.min() > 0
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(content, (weights * data.x).sum(axis=1), atol=1e-6)


def test_mean_content_is_frame_mean(data):
  model = cmd.CMDAutoencoder(**AE, content_frame='mean')
  params = jax.jit(model.init)(jax.random.key(0), data.x)['params']
  content, _ = model.apply({'params': params}, data.x, method='encode')
  np.testing.assert_allclose(content, data.x.mean(axis=1), rtol=0, atol=1e-6)
  assert 'content_head' not in params['encoder']


def test_motion_latent_range_and_shape(data, autoencoder):
  """z_m is [B, L, W' + H', D] in (-1, 1) for H' = 4 != W' = 6; the decoder restores x's shape.

  (float32 tanh rounds to +-1 beyond |x| ~ 9, so the open interval holds for ordinary inputs only.)
  """
  model, params = autoencoder
  x = data.x
  recon, content, motion = model.apply({'params': params}, x)
  assert motion.shape == (BATCH, FRAMES, COLS + ROWS, AE['motion_channels'])
  magnitude = np.abs(np.asarray(motion))
  assert magnitude.max() < 1.0 and magnitude.max() > 0.5
  assert content.shape == (BATCH, HEIGHT, WIDTH, CHANNELS)
  assert recon.shape == x.shape
  with pytest.raises(ValueError, match="W' \\+ H'"):
    model.apply({'params': params}, content, motion[:, :, :-1], method='decode')


def test_builders():
  dit = cmd.build_motion_dit(dict(size='S', content_patch_size=8, position_grid='square'))
  assert (dit.hidden_size, dit.depth, dit.heads, dit.content_patch_size) == (384, 12, 6, 8)
  assert cmd.build_motion_dit({'size': 'XL', 'depth': 2}).depth == 2
  assert {k: tuple(v.values()) for k, v in cmd.DIT_SIZES.items()} == {
      'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}
  with pytest.raises(ValueError, match='size'):
    cmd.build_motion_dit({'size': 'M'})
  ae = cmd.build_cmd_autoencoder(dict(positions='learned', depth=12, dtype='bfloat16'))
  assert (ae.width, ae.depth, ae.heads, ae.motion_channels, ae.dtype) == (384, 12, 8, 8, jnp.bfloat16)
  with pytest.raises(ValueError, match='positions'):
    bad = cmd.build_cmd_autoencoder(dict(AE, positions='rope'))
    bad.init(jax.random.key(0), np.zeros((1, 2, 4, 4, 4), np.float32))


def count(tree):
  return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nn.unbox(tree)))


def test_full_size_block_parameter_counts():
  """At the released sizes a DiT block has 18 d^2 + 15 d parameters (attention 4 d^2 + 4 d, MLP ratio 4
  8 d^2 + 5 d, adaLN 6 d^2 + 6 d, norms without affine) and a space-time block 20 d^2 + 23 d (two
  attentions, GEGLU 12 d^2 + 9 d, three affine norms)."""
  d = cmd.DIT_SIZES['XL']['hidden_size']
  dit = cmd.build_motion_dit({'size': 'XL'})
  shapes = jax.eval_shape(dit.init, jax.random.key(0), jnp.zeros((1, 16, 32, 8)), jnp.zeros((1,)),
                          jnp.zeros((1, 32, 32, 4)), jnp.zeros((1, 768)))['params']
  assert len([k for k in shapes if k.startswith('transformer_blocks_')]) == 28
  assert count(shapes['transformer_blocks_0']) == 18 * d * d + 15 * d
  w = 384
  block = jax.eval_shape(cmd.SpaceTimeBlock(8).init, jax.random.key(0),
                         jnp.zeros((1, 16, 16, 16, w)))['params']
  assert count(block) == 20 * w * w + 23 * w
