"""CMD-convention FLOPs (magicvideo_jax/cmd_flops.py): CMD App. D's published figures, and the analytic
per-layer counts proven on the real Linen modules at tiny sizes.

The module check traces each module (`jax.make_jaxpr`, nothing runs) and sums the multiply-adds of its
dot_general and conv ops: those with a parameter operand are the linear / conv layers and must equal the
analytic 'total' exactly; the others (QK^T, AV) must equal 'attention_not_counted'. XLA's cost analysis
of the compiled module is checked against both.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import cmd as cmd_config
from configs import sd15_256
from configs import tiny
from magicvideo_jax import cmd_flops
from magicvideo_jax import config as common
from magicvideo_jax import models as models_lib
from magicvideo_jax.models import cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ops that move or cast values without computing: a parameter stays a parameter through them.
LAYOUT_OPS = {'convert_element_type', 'reshape', 'transpose', 'broadcast_in_dim', 'copy', 'squeeze',
              'expand_dims'}


def within(ours, published, tol):
  print(f'ours {ours / 1e12:.3f} TFLOPs, published {published / 1e12:.3f}, ratio {ours / published:.4f}')
  return abs(ours / published - 1) <= tol


# ------------------------------------------------------------------------------------------------
# CMD App. D.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def sd21():
  return cmd_config.get_config('sd21_512x1024')


def test_app_d_sampling_figures(sd21):
  """50 steps: 46.8 TFLOPs, 100 steps: 92.1 (within 5%)."""
  assert within(cmd_flops.cmd_report(sd21)['per_clip'], 46.8e12, 0.05)
  assert within(cmd_flops.cmd_report(sd21, steps=100)['per_clip'], 92.1e12, 0.05)


def test_app_d_training_forwards(sd21):
  """Training forwards: autoencoder 0.77, content 0.34, motion 0.14 TFLOPs (within 10%)."""
  train = cmd_flops.cmd_report(sd21)['train_forward']
  assert within(train['autoencoder'], 0.77e12, 0.10)
  assert within(train['content'], 0.34e12, 0.10)
  assert within(train['motion'], 0.14e12, 0.10)


def test_breakdown_adds_up(sd21):
  r = cmd_flops.cmd_report(sd21, steps=7)
  b = r['breakdown']
  assert r['per_clip'] == b['content'] + b['motion'] + b['ae_decoder']
  assert b['content'] == 7 * r['networks']['content']['total']
  assert r['per_step'] == r['networks']['content']['total'] + r['networks']['motion']['total']


def test_cli_json():
  """The CLI's JSON: CMD at 50 and 100 steps, and MagicVideo sd15_256 in the same convention."""
  def run(*args):
    out = subprocess.run([sys.executable, '-m', 'magicvideo_jax.cmd_flops', '--json', *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)

  r50 = run('--config=configs/cmd.py:sd21_512x1024')
  assert '1 multiply-add = 1 FLOP' in r50['convention']
  assert within(r50['per_clip'], 46.8e12, 0.05)
  assert within(run('--config=configs/cmd.py', '--steps=100')['per_clip'], 92.1e12, 0.05)
  mv = run('--config=configs/sd15_256.py')
  assert mv['model'] == 'magicvideo' and mv['steps'] == 50
  assert mv['per_clip'] == cmd_flops.cmd_report(sd15_256.get_config())['per_clip']


def test_magicvideo_counts_the_video_layers():
  """The video U-Net counts more than the image U-Net at the same shape (temporal q, k, v, out; fps)."""
  config = sd15_256.get_config()
  video = cmd_flops.cmd_report(config)['per_clip']
  config.model.unet = common.image_only(config.model.unet)
  assert cmd_flops.cmd_report(config)['per_clip'] < video


def test_full_taps_exceed_valid_taps():
  t_full, t_valid = cmd_flops.MacTally('full'), cmd_flops.MacTally('valid')
  for t in (t_full, t_valid):
    t.conv(1, 4, 6, 2, 3)
  assert t_full.result()['conv'] == 4 * 6 * 9 * 2 * 3
  assert t_valid.result()['conv'] == (3 * 4 - 2) * (3 * 6 - 2) * 2 * 3


# ------------------------------------------------------------------------------------------------
# The analytic counts on the real modules.
# ------------------------------------------------------------------------------------------------


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for sub in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(sub, 'eqns'):
        yield sub
      elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
        yield sub.jaxpr


def traced_macs(fn, params, *args):
  """{'layers', 'attention'}: multiply-adds of dot_general / conv ops in `fn(params, *args)`'s jaxpr.

  'layers': ops with an operand derived from `params` by layout ops only (a kernel); 'attention': dots
  of two activations.
  """
  closed = jax.make_jaxpr(fn)(params, *args)
  n_params = len(jax.tree_util.tree_leaves(params))
  counts = {'layers': 0, 'attention': 0}

  def walk(jaxpr, param_vars):
    param_vars = set(param_vars)
    is_param = lambda v: not hasattr(v, 'val') and v in param_vars  # Literals have .val
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      ins = [v for v in eqn.invars if not hasattr(v, 'val')]  # skip literals
      if name == 'dot_general':
        (lhs_c, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        macs = math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_c)
        counts['layers' if any(map(is_param, eqn.invars)) else 'attention'] += macs
      elif name == 'conv_general_dilated':
        rhs = eqn.invars[1].aval.shape
        out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
        counts['layers'] += math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // out_features
      elif name in LAYOUT_OPS and ins and all(map(is_param, ins)):
        param_vars.update(eqn.outvars)
      for sub in _sub_jaxprs(eqn):
        inner = [iv for ov, iv in zip(eqn.invars, sub.invars) if is_param(ov)] if len(
            sub.invars) == len(eqn.invars) else []
        walk(sub, inner)

  walk(closed.jaxpr, closed.jaxpr.invars[:n_params])
  return counts


def xla_flops(fn, params, *args):
  cost = jax.jit(fn).lower(params, *args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']


def check_module(name, fn, params, args, analytic, xla_check=True):
  traced = traced_macs(fn, params, *args)
  print(f'{name}: traced {traced}, analytic {analytic}')
  assert traced['layers'] == analytic['total'], name
  assert traced['attention'] == analytic['attention_not_counted'], name
  if xla_check:  # XLA counts a multiply-add as 2, plus its elementwise ops on top.
    xla = xla_flops(fn, params, *args)
    dots = 2 * (analytic['total'] + analytic['attention_not_counted'])
    print(f'{name}: XLA {xla:.0f} FLOPs, 2 x multiply-adds {dots}')
    assert dots <= xla <= 2 * dots, name


AE = dict(width=32, depth=2, heads=4, patch_size=2, motion_channels=3)
CLIP = dict(batch=2, frames=4, height=8, width=12, channels=4)  # H' = 4 != W' = 6


def _abstract_init(module, *args, **kwargs):
  return jax.eval_shape(lambda a, k: module.init(jax.random.key(0), *a, **k), args, kwargs)


@pytest.mark.parametrize('content_frame', ['learned', 'mean'])
def test_autoencoder_counts_match_the_module(content_frame):
  ae_cfg = dict(AE, content_frame=content_frame)
  ae = cmd.CMDAutoencoder(**ae_cfg)
  b, f, h, w, c = (CLIP[k] for k in ('batch', 'frames', 'height', 'width', 'channels'))
  x = jax.ShapeDtypeStruct((b, f, h, w, c), jnp.float32)
  params = _abstract_init(ae, x)
  check_module('encoder', lambda p, x: ae.apply(p, x, method=ae.encode), params, (x,),
               cmd_flops.cmd_encoder_macs(ae_cfg, **CLIP))
  zc = jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)
  zm = jax.ShapeDtypeStruct((b, f, w // 2 + h // 2, AE['motion_channels']), jnp.float32)
  check_module('decoder', lambda p, zc, zm: ae.apply(p, zc, zm, method=ae.decode), params, (zc, zm),
               cmd_flops.cmd_decoder_macs(ae_cfg, **CLIP))


def test_motion_dit_counts_match_the_module():
  cfg = dict(hidden_size=32, depth=2, heads=4, patch_size=2, content_patch_size=4)
  dit = cmd.build_motion_dit(cfg)
  b, f, length, d = 2, 4, 10, 3  # 2 x 5 motion tokens; content 8 x 12 with kp 4: 2 x 3 tokens
  args = (jax.ShapeDtypeStruct((b, f, length, d), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.float32),
          jax.ShapeDtypeStruct((b, 8, 12, 4), jnp.float32), jax.ShapeDtypeStruct((b, 16), jnp.float32))
  params = _abstract_init(dit, *args)
  analytic = cmd_flops.motion_dit_macs(cfg, batch=b, frames=f, motion_len=length, motion_channels=d,
                                       content_height=8, content_width=12, content_channels=4,
                                       text_dim=16)
  check_module('motion DiT', lambda p, *a: dit.apply(p, *a), params, args, analytic)


def test_dit_size_is_resolved():
  """`size` 'XL' counts DiT-XL (d 1152, depth 28) as `build_motion_dit` builds it."""
  fields = cmd_flops.dit_fields(dict(size='XL', patch_size=2, content_patch_size=8))
  module = cmd.build_motion_dit(dict(size='XL', patch_size=2, content_patch_size=8))
  assert (fields['hidden_size'], fields['depth']) == (module.hidden_size, module.depth) == (1152, 28)


@pytest.mark.parametrize('variant,linear', [('image', False), ('image', True), ('video', False)])
def test_unet_counts_match_the_module(variant, linear):
  """The tiny U-Net (image, or video with temporal attention and fps), non-square latents.

  No XLA check: XLA counts only conv taps inside the input, fvcore (and the jaxpr) every tap.
  """
  config = tiny.get_config(variant)
  config.model.unet.use_linear_projection = linear
  unet = models_lib.build_unet(config.model)
  frames = 1 if variant == 'image' else 4
  b, h, w, length = 2, 8, 12, config.model.text_encoder.max_position_embeddings
  args = (jax.ShapeDtypeStruct((b, frames, h, w, 4), jnp.float32),
          jax.ShapeDtypeStruct((b,), jnp.float32),
          jax.ShapeDtypeStruct((b, length, config.model.unet.cross_attention_dim), jnp.float32))
  fps = jax.ShapeDtypeStruct((b,), jnp.float32)
  fn = lambda p, x, t, ctx: unet.apply(p, x, t, ctx, fps=None if variant == 'image' else jnp.ones((b,)))
  params = _abstract_init(unet, *args, fps=fps if variant == 'video' else None)
  analytic = cmd_flops.unet_macs(config.model.unet, batch=b, frames=frames, height=h, width=w,
                                 context_len=length)
  check_module(f'U-Net {variant}', fn, params, args, analytic, xla_check=False)


@pytest.mark.slow  # A subprocess importing the training stack.
def test_flops_cli_cmd_convention():
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-m', 'magicvideo_jax.flops',
                         '--config=configs/cmd.py:sd21_512x1024', '--convention=cmd', '--json'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  per_clip = json.loads(proc.stdout)['per_clip']
  assert abs(per_clip / 46.8e12 - 1) < 0.05, per_clip
