r"""FLOPs, parameters and compiled memory of MagicVideo and the VDM baseline (DESIGN.md section 7).

  python -m magicvideo_jax.flops --config=configs/sd15_256.py [--json] [--mesh data=1,fsdp=1]
      [--steps N] [--no_memory] [--compile_times] [--num_cpu_devices 8]
  python -m magicvideo_jax.flops --compare        # sd15_256 vs configs/vdm_64.py and vdm_256.py

Everything is counted from abstract inputs (`jax.ShapeDtypeStruct`, `jax.eval_shape` parameters):
nothing is allocated and nothing runs, so paper-size models are counted on a laptop.

Counts:
- XLA: `jax.jit(f).lower(*abstract).compile().cost_analysis()['flops']`. XLA counts a multiply-add as
  2 FLOPs (and elementwise ops, 1 a result element); fvcore (CMD, many papers) counts a multiply-add as 1,
  so fvcore numbers are about half (printed beside as "fvcore MACs").
- Analytic: a closed-form count from the config alone (convs, dense layers, attention QK^T and AV),
  written independently of the Linen modules as a cross-check. Convolutions count only the taps that
  fall inside the input, as XLA does (a SAME 3x3 conv on n pixels has 3n - 2 valid taps a row, not 3n).
  Elementwise work (norms, activations, softmax, residual adds) is left out, so the analytic count sits
  a little (typically 1-3%) under XLA's.
- Per denoiser forward: one U-Net call on one 16-frame clip (batch 1). Per generated clip: forward x
  steps x 2 (classifier-free guidance runs the conditional and unconditional batch each step), steps =
  `config.sampling.num_inference_steps` (MagicVideo 50 DDIM, VDM 256). MagicVideo's VAE decode of the
  frames and its text encoding (prompt + negative prompt) are reported separately.
- Memory: `compiled.memory_analysis()` per device, for one sampling forward (the batch-2 CFG forward)
  and one training step (`state.create_train_state`, the state and step `train_and_evaluate` builds), under
  `--mesh`. Sharded: compiled FLOPs are per device, lowered FLOPs global; both are printed.

Library: `count_flops(config, ...) -> dict`, `analytic_unet_flops`, `analytic_vdm_flops`,
`analytic_vae_decode_flops`, `analytic_text_encoder_flops`, `xla_flops`, `compare(...)`.
"""

import functools
import importlib
import json
import time
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import ml_collections
import numpy as np

from magicvideo_jax import cli
from magicvideo_jax import cmd_flops
from magicvideo_jax import diffusion
from magicvideo_jax import models as models_lib
from magicvideo_jax import sharding as sharding_lib
from magicvideo_jax.models import vdm as vdm_lib
from magicvideo_jax.training import state as state_lib

CONVENTION = ('XLA convention: one multiply-add = 2 FLOPs (elementwise ops count 1 per element); '
              'fvcore MACs = FLOPs / 2.')


def model_kind(config: ml_collections.ConfigDict) -> str:
  """'magicvideo' (the default, configs without `model.kind`) or 'vdm'."""
  kind = config.model.get('kind', 'magicvideo') or 'magicvideo'
  if kind not in ('magicvideo', 'vdm'):
    raise ValueError(f"config.model.kind={kind!r}; valid: 'magicvideo' (default), 'vdm'")
  return kind


# ------------------------------------------------------------------------------------------------
# Analytic counts (multiply-add = 2), from the config alone.
# ------------------------------------------------------------------------------------------------


def valid_taps(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int) -> int:
  """Sum over output positions of the kernel taps that land inside an input axis of `size`."""
  out = (size + pad_lo + pad_hi - kernel) // stride + 1
  return sum(1 for o in range(out) for k in range(kernel) if 0 <= o * stride - pad_lo + k < size)


# XLA's per-element FLOPs of the elementwise pieces (measured on XLA:CPU, jax 0.10): GroupNorm 6,
# LayerNorm 7, SiLU 4, exact (erf) GELU 64, quick GELU 5, add 1, softmax with its scale 5 a logit.
EW = dict(group_norm=6, layer_norm=7, silu=4, gelu=64, quick_gelu=5, add=1, softmax=5)


class Tally:
  """FLOPs by category: 'conv', 'dense', 'attention' (QK^T and AV), 'elementwise' (estimate).

  'core' = conv + dense + attention (the multiply-adds); 'total' adds the elementwise estimate
  (norms, activations, softmax, bias and residual adds) that XLA also counts.
  """

  def __init__(self):
    self.flops = {'conv': 0, 'dense': 0, 'attention': 0, 'elementwise': 0}

  def conv(self, n: int, h: int, w: int, cin: int, cout: int, kernel: int = 3, stride: int = 1,
           pad: Tuple[Tuple[int, int], Tuple[int, int]] = None) -> Tuple[int, int]:
    """A conv (with bias) over `[n, h, w, cin]`; returns the output (h, w)."""
    if pad is None:
      p = kernel // 2
      pad = ((p, p), (p, p))
    taps = valid_taps(h, kernel, stride, *pad[0]) * valid_taps(w, kernel, stride, *pad[1])
    self.flops['conv'] += 2 * n * taps * cin * cout
    ho = (h + sum(pad[0]) - kernel) // stride + 1
    wo = (w + sum(pad[1]) - kernel) // stride + 1
    self.flops['elementwise'] += n * ho * wo * cout  # bias
    return ho, wo

  def dense(self, rows: int, din: int, dout: int, bias: bool = True) -> None:
    self.flops['dense'] += 2 * rows * din * dout
    self.flops['elementwise'] += rows * dout if bias else 0

  def attention(self, batch: int, q_len: int, k_len: int, width: int, heads: int) -> None:
    """QK^T and AV over all heads (`width` = heads x head dim), plus the softmax."""
    self.flops['attention'] += 2 * 2 * batch * q_len * k_len * width
    self.flops['elementwise'] += EW['softmax'] * batch * heads * q_len * k_len

  def ew(self, elements: int, *ops: str) -> None:
    """Elementwise `ops` (keys of EW) over `elements` values."""
    self.flops['elementwise'] += elements * sum(EW[o] for o in ops)

  def result(self) -> Dict[str, int]:
    core = self.flops['conv'] + self.flops['dense'] + self.flops['attention']
    return dict(self.flops, core=core, total=core + self.flops['elementwise'])


def _heads(attention_head_dim: Any, level: int) -> int:
  return int(attention_head_dim) if isinstance(attention_head_dim, int) else int(
      attention_head_dim[level])


def analytic_unet_flops(unet: Any, *, batch: int, frames: int, height: int, width: int,
                        context_len: int, use_fps: bool = True) -> Dict[str, int]:
  """MagicVideo video U-Net (SD 1.x `UNet2DConditionModel` + video layers), `config.model.unet`."""
  t = Tally()
  ch = list(unet.block_out_channels)
  levels = len(ch)
  n = batch * frames
  temb = ch[0] * 4
  t.dense(batch, ch[0], temb)
  t.dense(batch, temb, temb)
  if unet.get('fps_embedding', False) and use_fps:
    t.dense(batch, ch[0], temb)
    t.dense(batch, temb, temb)
  temporal = unet.get('temporal_attention', 'none') in ('parallel', 'sequential')
  animatediff = unet.get('temporal_attention', 'none') == 'animatediff'
  motion_heads = unet.get('motion_num_attention_heads', 8)
  adaptor = unet.get('frame_adaptor', False)

  def resnet(h, w, cin, cout):
    pixels = n * h * w
    t.ew(pixels * cin, 'group_norm', 'silu')
    t.conv(n, h, w, cin, cout)
    t.dense(n, temb, cout)
    t.ew(pixels * cout, 'add', 'group_norm', 'silu')  # + temb, norm2, silu
    t.conv(n, h, w, cout, cout)
    if adaptor:  # S * z + B after conv1 and conv2.
      t.ew(pixels * cout, 'add', 'add', 'add', 'add')
    if cin != cout:
      t.conv(n, h, w, cin, cout, kernel=1)
    t.ew(pixels * cout, 'add')  # residual

  def transformer(h, w, c, heads):
    tokens = n * h * w
    t.ew(tokens * c, 'group_norm')
    t.conv(n, h, w, c, c, kernel=1)  # proj_in
    t.ew(tokens * c, 'layer_norm', 'add')  # norm1, residual
    for _ in range(3):  # attn1 q, k, v
      t.dense(tokens, c, c, bias=False)
    t.attention(n, h * w, h * w, c, heads)
    t.dense(tokens, c, c)  # attn1 out
    t.ew(tokens * c, 'layer_norm', 'add')  # norm2, residual
    t.dense(tokens, c, c, bias=False)  # attn2 q
    t.dense(n * context_len, unet.cross_attention_dim, 2 * c, bias=False)  # k, v (context per frame)
    t.attention(n, h * w, context_len, c, heads)
    t.dense(tokens, c, c)  # attn2 out
    if temporal:
      t.ew(tokens * c, 'layer_norm', 'add')
      for _ in range(3):
        t.dense(tokens, c, c, bias=False)
      t.attention(batch * h * w, frames, frames, c, heads)
      t.dense(tokens, c, c)
    t.ew(tokens * c, 'layer_norm', 'add')  # norm3, residual
    t.dense(tokens, c, 8 * c)  # GEGLU proj
    t.ew(tokens * 4 * c, 'gelu', 'add')  # gelu(gate) * h
    t.dense(tokens, 4 * c, c)  # net_2
    t.conv(n, h, w, c, c, kernel=1)  # proj_out
    t.ew(tokens * c, 'add')

  def motion(h, w, c, level, mid=False):
    """AnimateDiff motion module: clip GroupNorm, proj_in, blocks of 2 temporal self-attentions
    and a GEGLU feed-forward, proj_out, residual."""
    if not animatediff or (mid and not unet.get('use_motion_mid_block', True)):
      return
    tokens = n * h * w
    heads = _heads(motion_heads, level)
    t.ew(tokens * c, 'group_norm')
    t.dense(tokens, c, c)  # proj_in
    key = 'motion_transformer_layers_per_mid_block' if mid else 'motion_transformer_layers_per_block'
    for _ in range(unet.get(key, 1)):
      for _ in range(2):
        t.ew(tokens * c, 'layer_norm', 'add', 'add')  # norm, + positions, residual
        for _ in range(3):
          t.dense(tokens, c, c, bias=False)
        t.attention(batch * h * w, frames, frames, c, heads)
        t.dense(tokens, c, c)
      t.ew(tokens * c, 'layer_norm', 'add')
      t.dense(tokens, c, 8 * c)
      t.ew(tokens * 4 * c, 'gelu', 'add')
      t.dense(tokens, 4 * c, c)
    t.dense(tokens, c, c)  # proj_out
    t.ew(tokens * c, 'add')

  h, w = height, width
  t.conv(n, h, w, unet.in_channels, ch[0])
  skips = [ch[0]]
  c = ch[0]
  for i, kind in enumerate(unet.down_block_types):
    for _ in range(unet.layers_per_block):
      resnet(h, w, c, ch[i])
      c = ch[i]
      if kind == 'CrossAttnDownBlock2D':
        transformer(h, w, c, _heads(unet.attention_head_dim, i))
      motion(h, w, c, i)
      skips.append(c)
    if i < levels - 1:
      h, w = t.conv(n, h, w, c, c, stride=2)
      skips.append(c)
  resnet(h, w, c, c)
  transformer(h, w, c, _heads(unet.attention_head_dim, levels - 1))
  motion(h, w, c, levels - 1, mid=True)
  resnet(h, w, c, c)
  for i, kind in enumerate(unet.up_block_types):
    level = levels - 1 - i
    for _ in range(unet.layers_per_block + 1):
      resnet(h, w, c + skips.pop(), ch[level])
      c = ch[level]
      if kind == 'CrossAttnUpBlock2D':
        transformer(h, w, c, _heads(unet.attention_head_dim, level))
      motion(h, w, c, level)
    if i < levels - 1:
      h, w = 2 * h, 2 * w
      t.conv(n, h, w, c, c)
  t.ew(n * h * w * c, 'group_norm', 'silu')
  t.conv(n, h, w, c, unet.out_channels)
  return t.result()


def analytic_vdm_flops(vdm: Any, *, batch: int, frames: int, height: int, width: int,
                       context_len: int) -> Dict[str, int]:
  """VDM factorised space-time U-Net (`magicvideo_jax.models.vdm`), `config.model.vdm`."""
  t = Tally()
  ch = [vdm.base_channels * m for m in vdm.channel_mult]
  levels = len(ch)
  n = batch * frames
  emb = vdm.embed_dim
  t.dense(batch, vdm.base_channels, emb)
  t.dense(batch, emb, emb)
  d = vdm.context_dim  # Attention pooling: q of the mean token, k and v of every token, projection.
  t.dense(batch, d, d)
  t.dense(batch * context_len, d, 2 * d)
  t.attention(batch, 1, context_len, d, max(d // vdm.head_dim, 1))
  t.dense(batch, d, emb)
  attn_res = tuple(vdm.attention_resolutions)
  with_attention = [vdm.resolution // 2 ** i in attn_res for i in range(levels)]

  def res(h, w, cin, cout):
    pixels = n * h * w
    t.ew(pixels * cin, 'group_norm', 'silu')
    t.conv(n, h, w, cin, cout)
    t.dense(n, emb, cout)
    t.ew(pixels * cout, 'add', 'group_norm', 'silu')
    t.conv(n, h, w, cout, cout)
    if cin != cout:
      t.conv(n, h, w, cin, cout, kernel=1)
    t.ew(pixels * cout, 'add')

  def attn(h, w, c):
    tokens = n * h * w
    heads = c // vdm.head_dim
    for _ in range(2):  # spatial, temporal: norm, fused qkv, out, residual
      t.ew(tokens * c, 'group_norm', 'add')
      t.dense(tokens, c, 3 * c)
      t.dense(tokens, c, c)
    t.attention(n, h * w, h * w, c, heads)
    t.attention(batch * h * w, frames, frames, c, heads)
    t.ew(batch * h * w * heads * frames * frames, 'add')  # relative position bias

  h, w = height, width
  t.conv(n, h, w, vdm.in_channels, ch[0])
  skips = [ch[0]]
  c = ch[0]
  for i in range(levels):
    for _ in range(vdm.num_res_blocks):
      res(h, w, c, ch[i])
      c = ch[i]
      if with_attention[i]:
        attn(h, w, c)
      skips.append(c)
    if i < levels - 1:
      h, w = t.conv(n, h, w, c, c, stride=2)
      skips.append(c)
  res(h, w, c, c)
  attn(h, w, c)
  res(h, w, c, c)
  for i in reversed(range(levels)):
    for _ in range(vdm.num_res_blocks + 1):
      res(h, w, c + skips.pop(), ch[i])
      c = ch[i]
      if with_attention[i]:
        attn(h, w, c)
    if i > 0:
      h, w = 2 * h, 2 * w
      t.conv(n, h, w, c, c)
  t.ew(n * h * w * c, 'group_norm', 'silu')
  t.conv(n, h, w, c, vdm.out_channels)
  return t.result()


def analytic_vae_decode_flops(vae: Any, *, num_images: int, height: int, width: int
                              ) -> Dict[str, int]:
  """SD `AutoencoderKL.decode` (post_quant_conv + decoder) of `num_images` latents `[h, w]`."""
  t = Tally()
  n, h, w = num_images, height, width
  ch = list(vae.block_out_channels)
  lat = vae.latent_channels

  def resnet(cin, cout):
    t.ew(n * h * w * cin, 'group_norm', 'silu')
    t.conv(n, h, w, cin, cout)
    t.ew(n * h * w * cout, 'group_norm', 'silu', 'add')
    t.conv(n, h, w, cout, cout)
    if cin != cout:
      t.conv(n, h, w, cin, cout, kernel=1)

  t.conv(n, h, w, lat, lat, kernel=1)
  t.conv(n, h, w, lat, ch[-1])
  c = ch[-1]
  resnet(c, c)
  t.ew(n * h * w * c, 'group_norm', 'add')
  for _ in range(4):
    t.dense(n * h * w, c, c)
  t.attention(n, h * w, h * w, c, 1)
  resnet(c, c)
  for i, cout in enumerate(reversed(ch)):
    for _ in range(vae.layers_per_block + 1):
      resnet(c, cout)
      c = cout
    if i < len(ch) - 1:
      h, w = 2 * h, 2 * w
      t.conv(n, h, w, c, c)
  t.ew(n * h * w * c, 'group_norm', 'silu')
  t.conv(n, h, w, c, vae.out_channels)
  return t.result()


def analytic_text_encoder_flops(text: Any, *, batch: int) -> Dict[str, int]:
  """CLIP text transformer over `max_position_embeddings` tokens."""
  t = Tally()
  length, d = text.max_position_embeddings, text.hidden_size
  rows = batch * length
  act = 'quick_gelu' if text.get('hidden_act', 'quick_gelu') == 'quick_gelu' else 'gelu'
  t.ew(rows * d, 'add')  # token + position embeddings
  for _ in range(text.num_hidden_layers):
    t.ew(rows * d, 'layer_norm', 'layer_norm', 'add', 'add')
    for _ in range(4):
      t.dense(rows, d, d)
    t.attention(batch, length, length, d, text.num_attention_heads)
    t.dense(rows, d, text.intermediate_size)
    t.ew(rows * text.intermediate_size, act)
    t.dense(rows, text.intermediate_size, d)
  t.ew(rows * d, 'layer_norm')
  return t.result()


# ------------------------------------------------------------------------------------------------
# XLA counts from abstract inputs.
# ------------------------------------------------------------------------------------------------


def _cost(obj) -> Dict[str, float]:
  cost = obj.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost or {}


def _memory(compiled) -> Dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  keys = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
          'temp_size_in_bytes', 'generated_code_size_in_bytes')
  out = {k.replace('_size_in_bytes', ''): int(getattr(m, k, 0) or 0) for k in keys}
  # Live at once: arguments + outputs (minus donated/aliased buffers) + temporaries.
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def xla_flops(fn: Callable, *abstract_args, jit_kwargs: Optional[Dict[str, Any]] = None,
              memory: bool = False) -> Dict[str, Any]:
  """Lower and compile `fn` on abstract args: FLOPs (compiled = per device, lowered = global),
  compile seconds and, with `memory`, the compiled memory per device."""
  t0 = time.time()
  lowered = jax.jit(fn, **(jit_kwargs or {})).lower(*abstract_args)
  compiled = lowered.compile()
  return _compiled_report(lowered, compiled, time.time() - t0, memory)


def _compiled_report(lowered, compiled, compile_seconds: float, memory: bool) -> Dict[str, Any]:
  out = dict(flops=float(_cost(compiled).get('flops', 0.0)), compile_seconds=compile_seconds)
  try:
    out['flops_global'] = float(_cost(lowered).get('flops', 0.0))
  except Exception:  # pylint: disable=broad-except
    out['flops_global'] = None
  if memory:
    out['memory'] = _memory(compiled)
  return out


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(tree))


def _sds(shape, dtype=jnp.float32, sharding=None):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def build_denoiser(config: ml_collections.ConfigDict):
  """The denoiser Linen module: MagicVideo's video U-Net or the VDM."""
  if model_kind(config) == 'vdm':
    return vdm_lib.build_vdm(config.model)
  return models_lib.build_unet(config.model)


def denoiser_io(config: ml_collections.ConfigDict, batch: int, frames: int
                ) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
  """Shapes and dtypes of a denoiser call: sample, timesteps, context (and fps for MagicVideo)."""
  mc = config.model
  res = config.data.resolution
  length = mc.text_encoder.max_position_embeddings
  if model_kind(config) == 'vdm':
    v = mc.vdm
    return dict(sample=((batch, frames, res, res, v.in_channels), jnp.float32),
                timesteps=((batch,), jnp.int32),
                context=((batch, length, v.context_dim), jnp.float32))
  down = 2 ** (len(mc.vae.block_out_channels) - 1)
  io = dict(sample=((batch, frames, res // down, res // down, mc.unet.in_channels), jnp.float32),
            timesteps=((batch,), jnp.int32),
            context=((batch, length, mc.unet.cross_attention_dim), jnp.float32))
  if mc.unet.get('fps_embedding', False):
    io['fps'] = ((batch,), jnp.float32)
  return io


def boxed_denoiser_params(config: ml_collections.ConfigDict, module=None) -> Any:
  """`jax.eval_shape` of the denoiser's init (boxed; smallest input that creates every parameter)."""
  module = module or build_denoiser(config)
  io = denoiser_io(config, 1, 1)
  kind = model_kind(config)
  levels = len(config.model.vdm.channel_mult if kind == 'vdm' else config.model.unet.block_out_channels)
  small = 2 ** (levels - 1)
  shape = list(io['sample'][0])
  shape[2] = shape[3] = small
  args = [jnp.zeros(shape, jnp.float32), jnp.zeros((1,), jnp.int32), jnp.zeros(io['context'][0])]
  kwargs = {'fps': jnp.ones((1,), jnp.float32)} if 'fps' in io else {}
  return jax.eval_shape(lambda k: module.init(k, *args, **kwargs)['params'], jax.random.key(0))


def count_params(tree: Any) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree))))


def _denoiser_fn(module):
  def forward(params, sample, timesteps, context, fps=None):
    return module.apply({'params': params}, sample, timesteps, context, fps=fps)
  return forward


def _io_args(io, sharding=None):
  return [_sds(*io[k], sharding=sharding(len(io[k][0])) if sharding else None)
          for k in ('sample', 'timesteps', 'context', 'fps') if k in io]


# ------------------------------------------------------------------------------------------------
# Training-step and sampling memory (the train step: `state.create_train_state`, as
# `train.train_and_evaluate` builds it).
# ------------------------------------------------------------------------------------------------


def _mesh_and_rules(config, mesh_spec: Optional[Dict[str, int]]):
  mesh = sharding_lib.create_mesh(mesh_spec or config.mesh)
  rules = tuple(tuple(r) for r in config.sharding.logical_axis_rules)
  return mesh, rules


def _vdm_init_params(modules, config, key):
  """Boxed params of the VDM baseline's train state: text encoder and denoiser (no VAE)."""
  k_text, k_unet = jax.random.split(key)
  length = config.model.text_encoder.max_position_embeddings
  small = 2 ** (len(config.model.vdm.channel_mult) - 1)
  return dict(
      text_encoder=modules['text_encoder'].init(k_text, jnp.zeros((1, length), jnp.int32))['params'],
      unet=modules['unet'].init(
          k_unet, jnp.zeros((1, 1, small, small, config.model.vdm.in_channels)),
          jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, length, config.model.vdm.context_dim)))['params'])


def train_setup(config: ml_collections.ConfigDict, mesh_spec: Optional[Dict[str, int]] = None
                ) -> state_lib.TrainSetup:
  """`state.create_train_state` on the `mesh_spec` mesh (default config.mesh) and the abstract batch
  (`state.abstract_batch`). MagicVideo: the state and step `train_and_evaluate` builds. The VDM
  baseline (which `train_and_evaluate` does not train) passes its own models and init, and its batch
  carries the pixel clips as 'latents' (pixel-space diffusion: `diffusion_loss` never encodes).
  """
  mesh = sharding_lib.create_mesh(mesh_spec or config.mesh)
  batch = state_lib.abstract_batch(config, mesh)
  if model_kind(config) == 'magicvideo':
    return state_lib.create_train_state(config, mesh, batch_struct=batch)
  # diffusion_loss reads config.model.unet.fps_embedding; the VDM has no fps conditioning.
  step_config = ml_collections.ConfigDict(config.to_dict())
  step_config.model.unet = ml_collections.ConfigDict(dict(fps_embedding=False))
  modules = dict(text_encoder=models_lib.build_text_encoder(config.model),
                 unet=build_denoiser(config), vae=None)
  batch['latents'] = batch.pop('video')
  return state_lib.create_train_state(step_config, mesh, modules=modules, batch_struct=batch,
                                      init=_vdm_init_params)


def train_step_cost(config: ml_collections.ConfigDict, mesh_spec: Optional[Dict[str, int]] = None,
                    memory: bool = True) -> Dict[str, Any]:
  """Compiles the training step of `train_setup` (`TrainSetup.compile`) on its abstract state and
  batch: FLOPs, memory, compile seconds."""
  s = train_setup(config, mesh_spec)
  compiled, seconds = s.compile()
  # Lowered again for the global count (the trace is cached); seconds are those of `compile`.
  out = _compiled_report(s.lower(), compiled, seconds, memory)
  out.update(global_batch_size=config.data.global_batch_size, devices=int(s.mesh.size),
             mesh=dict(s.mesh.shape), trainable_params=s.trainable_params)
  return out


def sampling_forward_cost(config: ml_collections.ConfigDict, frames: int,
                          mesh_spec: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
  """The CFG denoiser forward of one sampling step (batch 2 = conditional + unconditional), with
  parameters sharded by the config's logical rules over the mesh."""
  mesh, rules = _mesh_and_rules(config, mesh_spec)
  module = build_denoiser(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = boxed_denoiser_params(config, module)
  p_shard = sharding_lib.logical_shardings(boxed, mesh, rules)
  params = jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), nn.unbox(boxed), p_shard)
  io = denoiser_io(config, 2, frames)
  in_shard = lambda nd: (sharding_lib.batch_sharding(mesh, nd) if 2 % mesh.size == 0
                         else sharding_lib.replicated(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = xla_flops(_denoiser_fn(module), params, *_io_args(io, in_shard), memory=True)
  out.update(batch=2, devices=int(mesh.size))
  return out


def sampler_compile_seconds(config: ml_collections.ConfigDict, frames: int) -> Dict[str, float]:
  """AOT compile time of the whole sampler (text encoding + CFG DDIM `lax.scan` loop), abstract."""
  module = build_denoiser(config)
  text = models_lib.build_text_encoder(config.model)
  schedule = diffusion.Schedule.from_config(config.diffusion)
  steps = config.sampling.num_inference_steps
  io = denoiser_io(config, 1, frames)
  length = config.model.text_encoder.max_position_embeddings
  text_params = _abstract(jax.eval_shape(
      lambda k: text.init(k, jnp.zeros((1, length), jnp.int32))['params'], jax.random.key(0)))
  params = _abstract(boxed_denoiser_params(config, module))

  def sample(params, text_params, ids, uncond_ids, noise, fps):
    context = jnp.concatenate([text.apply({'params': text_params}, uncond_ids),
                               text.apply({'params': text_params}, ids)], axis=0)
    fps2 = jnp.concatenate([fps, fps]) if 'fps' in io else None

    def model_fn(x, t):
      out = module.apply({'params': params}, jnp.concatenate([x, x]), jnp.broadcast_to(t, (2,)),
                         context, fps=fps2).astype(jnp.float32)
      uncond, cond = jnp.split(out, 2)
      return uncond + config.sampling.guidance_scale * (cond - uncond)

    return diffusion.sample_loop(model_fn, noise, schedule, steps)

  ids = _sds((1, length), jnp.int32)
  out = xla_flops(sample, params, text_params, ids, ids, _sds(*io['sample']), _sds((1,)))
  return dict(compile_seconds=out['compile_seconds'], flops=out['flops'], steps=steps)


# ------------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------------


def count_flops(config: ml_collections.ConfigDict, *, frames: Optional[int] = None,
                steps: Optional[int] = None, memory: bool = True,
                mesh: Optional[Dict[str, int]] = None, compile_times: bool = False,
                count_dtype: Optional[str] = 'float32') -> Dict[str, Any]:
  """FLOPs (XLA and analytic), parameters and (with `memory`) compiled memory of a config's model.

  Returns a dict: 'kind', 'frames', 'resolution', 'steps', 'convention', 'denoiser' (per forward at
  batch 1: 'xla', 'analytic' {conv, dense, attention, total}, 'analytic_over_xla', 'params'),
  'per_clip' (forward x steps x 2), for MagicVideo 'vae_decode' and 'text_encoder' (same fields) and
  'per_clip_total' (denoising + 2 text encodings + decode), with `memory` 'sampling_forward' and
  'train_step' (compiled per device), with `compile_times` 'sampler'.

  The FLOPs are counted with compute dtype `count_dtype` (float32: a bf16 run has the same
  multiply-adds, but XLA:CPU adds convert ops to its count); None keeps `config.model.dtype`. The
  memory compiles always use the config's dtype, as a run would.
  """
  run_config = config
  if count_dtype:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = count_dtype
  kind = model_kind(config)
  frames = frames or config.data.num_frames
  steps = steps or config.sampling.num_inference_steps
  mc = config.model
  length = mc.text_encoder.max_position_embeddings
  res = config.data.resolution
  report: Dict[str, Any] = dict(kind=kind, frames=frames, resolution=res, steps=steps,
                                cfg_factor=2, convention=CONVENTION, count_dtype=mc.dtype,
                                run_dtype=run_config.model.dtype)

  # Denoiser forward, batch 1, on a single device (global count).
  module = build_denoiser(config)
  boxed = boxed_denoiser_params(config, module)
  io = denoiser_io(config, 1, frames)
  logging.info('%s: compiling the denoiser forward %s', kind, io['sample'][0])
  fwd = xla_flops(_denoiser_fn(module), _abstract(boxed), *_io_args(io))
  size = io['sample'][0][2]
  if kind == 'vdm':
    ana = analytic_vdm_flops(mc.vdm, batch=1, frames=frames, height=size, width=size,
                             context_len=length)
  else:
    ana = analytic_unet_flops(mc.unet, batch=1, frames=frames, height=size, width=size,
                              context_len=length, use_fps='fps' in io)
  report['denoiser'] = dict(xla=fwd['flops'], analytic=ana, analytic_over_xla=ana['total'] / fwd['flops'],
                            params=count_params(boxed), compile_seconds=fwd['compile_seconds'],
                            input_shape=list(io['sample'][0]))
  report['per_clip'] = dict(xla=fwd['flops'] * steps * 2, analytic=ana['total'] * steps * 2)

  if kind == 'magicvideo':
    vae = models_lib.build_vae(mc)
    vboxed = jax.eval_shape(lambda k: vae.init(k, jnp.zeros((1, 8, 8, mc.vae.in_channels)))['params'],
                            jax.random.key(0))
    down = 2 ** (len(mc.vae.block_out_channels) - 1)
    z = _sds((frames, res // down, res // down, mc.vae.latent_channels))
    dec = xla_flops(lambda p, z: vae.apply({'params': p}, z, method=vae.decode), _abstract(vboxed), z)
    vana = analytic_vae_decode_flops(mc.vae, num_images=frames, height=res // down, width=res // down)
    report['vae_decode'] = dict(xla=dec['flops'], analytic=vana,
                                analytic_over_xla=vana['total'] / dec['flops'],
                                params=count_params(vboxed), compile_seconds=dec['compile_seconds'])
    text = models_lib.build_text_encoder(mc)
    tboxed = jax.eval_shape(lambda k: text.init(k, jnp.zeros((1, length), jnp.int32))['params'],
                            jax.random.key(0))
    enc = xla_flops(lambda p, ids: text.apply({'params': p}, ids), _abstract(tboxed),
                    _sds((1, length), jnp.int32))
    tana = analytic_text_encoder_flops(mc.text_encoder, batch=1)
    report['text_encoder'] = dict(xla=enc['flops'], analytic=tana,
                                  analytic_over_xla=tana['total'] / enc['flops'],
                                  params=count_params(tboxed), compile_seconds=enc['compile_seconds'])
    report['per_clip_total'] = dict(
        xla=report['per_clip']['xla'] + 2 * enc['flops'] + dec['flops'],
        analytic=report['per_clip']['analytic'] + 2 * tana['total'] + vana['total'])
  else:
    report['per_clip_total'] = dict(report['per_clip'])

  if memory:
    logging.info('%s: compiling the sampling forward and the train step', kind)
    report['sampling_forward'] = sampling_forward_cost(run_config, frames, mesh)
    report['train_step'] = train_step_cost(run_config, mesh)
  if compile_times:
    logging.info('%s: compiling the sampler', kind)
    report['sampler'] = sampler_compile_seconds(run_config, frames)
  return report


def _fmt_flops(x: Optional[float]) -> str:
  if x is None:
    return '-'
  for unit, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(x) >= scale:
      return f'{x / scale:.3f} {unit}'
  return f'{x:.0f} '


def _fmt_bytes(x: Optional[float]) -> str:
  if x is None:
    return '-'
  for unit, scale in (('TiB', 2 ** 40), ('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if abs(x) >= scale:
      return f'{x / scale:.2f} {unit}'
  return f'{x:.0f} B'


def format_report(name: str, r: Dict[str, Any]) -> str:
  """Human-readable lines for one `count_flops` report."""
  lines = [f'== {name} ({r["kind"]}): {r["frames"]} frames at {r["resolution"]}x{r["resolution"]}, '
           f'{r["steps"]} steps x 2 (CFG); FLOPs counted in {r["count_dtype"]}, memory in '
           f'{r["run_dtype"]}', CONVENTION]
  row = '  {:<30} {:>14} {:>14} {:>12} {:>9} {:>14}'
  lines.append(row.format('', 'XLA FLOPs', 'analytic', 'ana/XLA', 'fvcore MACs', 'params'))
  for key, label in (('denoiser', 'denoiser forward (batch 1)'), ('vae_decode', 'VAE decode (all frames)'),
                     ('text_encoder', 'text encoding (1 prompt)')):
    if key in r:
      e = r[key]
      lines.append(row.format(label, _fmt_flops(e['xla']), _fmt_flops(e['analytic']['total']),
                              f'{e["analytic_over_xla"]:.4f}', _fmt_flops(e['xla'] / 2),
                              f'{e["params"]:,}'))
  a = r['denoiser']['analytic']
  lines.append(f'  analytic split of the forward: conv {_fmt_flops(a["conv"])}, dense '
               f'{_fmt_flops(a["dense"])}, attention QK^T+AV {_fmt_flops(a["attention"])}, '
               f'elementwise (estimate) {_fmt_flops(a["elementwise"])}; multiply-adds only '
               f'{_fmt_flops(a["core"])} = {a["core"] / r["denoiser"]["xla"]:.4f} of XLA')
  pc, tot = r['per_clip'], r['per_clip_total']
  lines.append(row.format('per clip: denoising', _fmt_flops(pc['xla']), _fmt_flops(pc['analytic']),
                          '', _fmt_flops(pc['xla'] / 2), ''))
  if r['kind'] == 'magicvideo':
    lines.append(row.format('per clip: + 2 text enc + decode', _fmt_flops(tot['xla']),
                            _fmt_flops(tot['analytic']), '', _fmt_flops(tot['xla'] / 2), ''))
  for key, label in (('sampling_forward', 'sampling forward (CFG batch 2)'), ('train_step', 'train step')):
    if key in r:
      e = r[key]
      m = e.get('memory', {})
      extra = (f', global batch {e["global_batch_size"]}, trainable {e["trainable_params"]:,}'
               if key == 'train_step' else '')
      lines.append(f'  {label} on {e["devices"]} device(s){extra}: compile {e["compile_seconds"]:.1f} s;'
                   f' FLOPs per device {_fmt_flops(e["flops"])}, global {_fmt_flops(e.get("flops_global"))}')
      if m:
        lines.append(f'    memory per device: arguments {_fmt_bytes(m["argument"])}, outputs '
                     f'{_fmt_bytes(m["output"])}, aliased {_fmt_bytes(m["alias"])}, temp '
                     f'{_fmt_bytes(m["temp"])}, generated code {_fmt_bytes(m["generated_code"])}; '
                     f'total {_fmt_bytes(m["total"])}')
  if 'sampler' in r:
    s = r['sampler']
    lines.append(f'  sampler (text enc + {s["steps"]}-step CFG DDIM scan) AOT compile: '
                 f'{s["compile_seconds"]:.1f} s')
  return '\n'.join(lines)


def ratio_table(reports: Sequence[Tuple[str, Dict[str, Any]]]) -> str:
  """One table: each report's forward / per-clip FLOPs and its ratio to the first (MagicVideo)."""
  base_name, base = reports[0]
  row = '{:<28} {:>13} {:>10} {:>13} {:>10} {:>14} {:>10}'
  lines = [f'Ratios to {base_name} (XLA FLOPs; ratio = model / {base_name})',
           row.format('model', 'forward', 'ratio', 'clip (denoise)', 'ratio', 'clip (all)', 'ratio')]
  for name, r in reports:
    f, c, t = r['denoiser']['xla'], r['per_clip']['xla'], r['per_clip_total']['xla']
    lines.append(row.format(
        name, _fmt_flops(f), f'{f / base["denoiser"]["xla"]:.1f}x', _fmt_flops(c),
        f'{c / base["per_clip"]["xla"]:.1f}x', _fmt_flops(t),
        f'{t / base["per_clip_total"]["xla"]:.1f}x'))
  return '\n'.join(lines)


COMPARE = (('sd15_256', 'configs/sd15_256.py', ''), ('vdm_64', 'configs/vdm_64.py', ''),
           ('vdm_256', 'configs/vdm_256.py', 'same'),
           ('vdm_256:absolute', 'configs/vdm_256.py', 'absolute'))


def compare(memory: bool = False, mesh: Optional[Dict[str, int]] = None, **kwargs
            ) -> List[Tuple[str, Dict[str, Any]]]:
  """`count_flops` of MagicVideo (sd15_256) and the VDM configs, in `COMPARE` order."""
  reports = []
  for name, path, variant in COMPARE:
    module = importlib.import_module('magicvideo_jax.' + path[:-3].replace('/', '.'))
    reports.append((name, count_flops(module.get_config(variant), memory=memory, mesh=mesh,
                                      **kwargs)))
  return reports


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------

def define_flags() -> types.SimpleNamespace:
  """The command-line flags; defined only when run as a program, so importing defines no flags."""
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file(
          'config', None, 'Config file (e.g. configs/sd15_256.py) or a shipped config by name (sd15_256).', lock_config=False),
      json=flags.DEFINE_bool('json', False, 'Print one JSON document instead of the tables.'),
      mesh=flags.DEFINE_string('mesh', None, 'Mesh for the memory counts, e.g. "data=1,fsdp=8" '
                               '(default: config.mesh).'),
      steps=flags.DEFINE_integer('steps', None,
                                 'Sampling steps (default config.sampling.num_inference_steps).'),
      frames=flags.DEFINE_integer('frames', None, 'Frames per clip (default config.data.num_frames).'),
      no_memory=flags.DEFINE_bool('no_memory', False,
                                  'Skip the sampling-forward and train-step compiles.'),
      compile_times=flags.DEFINE_bool(
          'compile_times', False, 'Also AOT-compile the whole sampler and report its compile time.'),
      compare=flags.DEFINE_bool('compare', False,
                                'MagicVideo sd15_256 vs configs/vdm_64.py and vdm_256.py.'),
      num_cpu_devices=flags.DEFINE_integer(
          'num_cpu_devices', None, 'Fake CPU devices (for --mesh on a CPU-only machine).'),
      convention=flags.DEFINE_enum(
          'convention', 'xla', ('xla', 'cmd'),
          'xla: ours (a multiply-add = 2 FLOPs, attention and CFG included); cmd: CMD\'s App. D '
          '(fvcore multiply-adds of linear and conv layers, one evaluation per step, no attention, '
          'no VAE decoder; magicvideo_jax/cmd_flops.py).'),
  )


def parse_mesh(spec: Optional[str]) -> Optional[Dict[str, int]]:
  if not spec:
    return None
  try:
    return {k.strip(): int(v) for k, v in (item.split('=') for item in spec.split(','))}
  except ValueError as e:
    raise app.UsageError(f'--mesh={spec!r}: expected "data=N,fsdp=M"') from e


def main(argv: Sequence[str], f: types.SimpleNamespace) -> None:
  del argv
  if f.convention.value == 'cmd':
    if f.config.value is None:
      raise app.UsageError('--convention=cmd needs --config=configs/cmd.py[:VARIANT] (or another)')
    report = cmd_flops.cmd_report(f.config.value, steps=f.steps.value)
    name = flags.FLAGS['config'].config_filename
    print(json.dumps(report, indent=1) if f.json.value else cmd_flops.format_report(name, report))
    return
  if f.num_cpu_devices.value:
    jax.config.update('jax_num_cpu_devices', f.num_cpu_devices.value)
  mesh = parse_mesh(f.mesh.value)
  kwargs = dict(memory=not f.no_memory.value, mesh=mesh, steps=f.steps.value, frames=f.frames.value,
                compile_times=f.compile_times.value)
  if f.compare.value:
    reports = compare(**kwargs)
  else:
    if f.config.value is None:
      raise app.UsageError('give --config=configs/X.py or --compare')
    reports = [(flags.FLAGS['config'].config_filename, count_flops(f.config.value, **kwargs))]
  if f.json.value:
    print(json.dumps(reports_to_json(reports), indent=1, default=str))
    return
  for name, r in reports:
    print(format_report(name, r))
    print()
  if len(reports) > 1:
    print(ratio_table(reports))


def reports_to_json(reports: Sequence[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
  """One report as is; several keyed by name, plus 'ratios_to_first'."""
  if len(reports) == 1:
    return dict(reports[0][1])
  base = reports[0][1]
  doc: Dict[str, Any] = {name: r for name, r in reports}
  doc['ratios_to_first'] = {name: dict(
      forward=r['denoiser']['xla'] / base['denoiser']['xla'],
      per_clip=r['per_clip']['xla'] / base['per_clip']['xla'],
      per_clip_total=r['per_clip_total']['xla'] / base['per_clip_total']['xla'])
      for name, r in reports}
  return doc


def run() -> None:
  """The `magicvideo-flops` console script."""
  f = define_flags()
  cli.prepare_console_script(__name__)
  app.run(functools.partial(main, f=f))


if __name__ == '__main__':
  run()
