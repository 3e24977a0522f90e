"""Attention: the chunked path equals XLA's (values and gradients), the selector's choices without a
GPU, the one-time log, and a tiny U-Net with the chunked path / causal flag equals the XLA path."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from magicvideo_jax import models as models_lib
from magicvideo_jax.models import attention
from magicvideo_jax.models import layers

B, TQ, TK, N, D = 2, 50, 37, 3, 16
TOL = 1e-5


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope='module')
def qkv():
  ks = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(ks[0], (B, TQ, N, D)), jax.random.normal(ks[1], (B, TK, N, D)),
          jax.random.normal(ks[2], (B, TK, N, D)))


def _masks():
  rng = np.random.default_rng(1)
  full = rng.random((B, N, TQ, TK)) < 0.7
  full[..., 0] = True  # No fully masked row.
  keys = np.ones((B, 1, 1, TK), bool)
  keys[1, ..., 20:] = False  # Key padding of the second example.
  return {'none': None, 'per_row': jnp.asarray(full), 'key_padding': jnp.asarray(keys),
          'rows_3d': jnp.asarray(full[0, :1])}  # [1, Tq, Tk]: broadcast over batch and heads.


@pytest.mark.parametrize('mask_name', ['none', 'per_row', 'key_padding', 'rows_3d'])
@pytest.mark.parametrize('causal', [False, True])
def test_chunked_equals_xla(qkv, mask_name, causal):
  q, k, v = qkv
  mask = _masks()[mask_name]  # Causal with Tq != Tk: query i sees keys <= i, as jax.nn's tril.
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation='xla')
  for chunk in (1, 7, 16, TQ, 64):  # 7 and 16 do not divide 50; 64 > Tq.
    out = attention.chunked_attention(q, k, v, mask=mask, is_causal=causal, chunk_size=chunk)
    err = rel_err(out, ref)
    print(f'mask={mask_name} causal={causal} chunk={chunk}: max rel err {err:.2e}')
    assert out.shape == ref.shape
    assert err <= TOL


def test_chunked_gradients_equal_xla(qkv):
  q, k, v = qkv
  mask = _masks()['per_row']
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  ref = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)),
                 argnums=(0, 1, 2))(q, k, v)
  out = jax.jit(jax.grad(loss(lambda q, k, v: attention.chunked_attention(
      q, k, v, mask=mask, chunk_size=16)), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip('qkv', out, ref):
    err = rel_err(a, b)
    print(f'd{name}: max rel err {err:.2e}')
    assert err <= TOL


def test_chunked_bf16_close_to_xla(qkv):
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv)
  ref = jax.nn.dot_product_attention(q, k, v, implementation='xla')
  out = attention.chunked_attention(q, k, v, chunk_size=16)
  assert out.dtype == jnp.bfloat16
  err = rel_err(out.astype(jnp.float32), ref.astype(jnp.float32))
  print(f'bf16: max rel err {err:.2e}')
  assert err <= 1e-2  # Two bf16 roundings of the output differ at most by one bf16 ulp.


BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
LONG, SHORT = (1024, 1024), (256, 77)


@pytest.mark.parametrize('requested,backend,dtype,head_dim,lengths,kw,expected', [
    ('auto', 'gpu', BF16, 40, LONG, {}, 'cudnn'),
    ('auto', 'gpu', F16, 128, SHORT, {}, 'cudnn'),
    ('auto', 'gpu', F32, 40, LONG, {}, 'chunked'),  # cuDNN flash: half precision only.
    ('auto', 'gpu', F32, 40, SHORT, {}, 'xla'),
    ('auto', 'gpu', BF16, 160, LONG, dict(compute_capability='8.0'), 'chunked'),  # > 128 on A100.
    ('auto', 'gpu', BF16, 160, LONG, dict(compute_capability='9.0'), 'cudnn'),  # <= 256 on H100.
    ('auto', 'gpu', BF16, 512, LONG, dict(compute_capability='9.0'), 'chunked'),  # The VAE's head.
    ('cudnn', 'gpu', BF16, 512, LONG, dict(compute_capability='9.0'), 'chunked'),
    ('cudnn', 'gpu', BF16, 512, (64, 64), {}, 'xla'),
    ('auto', 'gpu', BF16, 44, LONG, {}, 'chunked'),  # Not a multiple of 8.
    ('auto', 'gpu', BF16, 40, (16, 77), dict(has_mask=True), 'xla'),  # Odd length with a bias.
    ('auto', 'gpu', BF16, 40, (16, 16), dict(has_mask=True), 'cudnn'),
    ('cudnn', 'cpu', BF16, 40, LONG, {}, 'chunked'),
    ('auto', 'cpu', BF16, 40, LONG, {}, 'chunked'),
    ('auto', 'cpu', F32, 40, SHORT, {}, 'xla'),
    ('auto', 'tpu', BF16, 40, LONG, dict(pallas_tpu=True), 'pallas_tpu'),
    ('auto', 'tpu', BF16, 40, LONG, dict(pallas_tpu=False), 'chunked'),
    ('auto', 'tpu', BF16, 40, LONG, dict(pallas_tpu=True, has_mask=True), 'chunked'),
    ('auto', 'tpu', BF16, 40, (1024, 77), dict(pallas_tpu=True), 'xla'),  # 77 not a block multiple.
    ('xla', 'gpu', BF16, 40, LONG, {}, 'xla'),
    (None, 'gpu', BF16, 40, LONG, {}, 'xla'),
    ('chunked', 'cpu', F32, 40, SHORT, {}, 'chunked'),
])
def test_choose_attention(requested, backend, dtype, head_dim, lengths, kw, expected):
  impl, reason = attention.choose_attention(requested, backend=backend, dtype=dtype,
                                            head_dim=head_dim, q_len=lengths[0],
                                            kv_len=lengths[1], **kw)
  print(f'{requested} {backend} {jnp.dtype(dtype).name} d={head_dim} {lengths} {kw}: {impl} '
        f'({reason})')
  assert impl == expected
  if requested == 'cudnn' and impl != 'cudnn':
    assert 'no cuDNN' in reason  # The fallback says why.


def test_choose_attention_rejects_unknown():
  with pytest.raises(ValueError, match='attention_impl'):
    attention.choose_attention('flash', backend='gpu', dtype=BF16, head_dim=64, q_len=8, kv_len=8)


def test_logs_once_per_shape(qkv, caplog):
  q, k, v = qkv
  attention._logged.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO, logger='absl'):
    for _ in range(3):
      layers.dot_product_attention(q, k, v, implementation='auto')
    layers.dot_product_attention(q[:, :10], k, v, implementation='auto')
  lines = [r.getMessage() for r in caplog.records if 'attention q' in r.getMessage()]
  print('\n'.join(lines))
  assert len(lines) == 2
  assert '-> xla' in lines[0]


def test_cudnn_request_on_cpu_falls_back(qkv):
  """'cudnn' on a backend without it (and so for the VAE's 512-wide head) runs and equals XLA."""
  q, k, v = qkv
  out = layers.dot_product_attention(q, k, v, implementation='cudnn')
  ref = jax.nn.dot_product_attention(q, k, v)
  assert rel_err(out, ref) <= TOL


def _tiny_unet_out(impl, frame_mask=None, temporal_mask='causal'):
  config = tiny.get_config()
  config.model.attention_impl = impl
  config.model.unet.temporal_mask = temporal_mask
  unet = models_lib.build_unet(config.model)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 8, 4)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
  t, fps = jnp.array([10, 500]), jnp.array([4.0, 8.0])
  params = unet.init(jax.random.key(0), x, t, ctx, fps=fps)['params']
  # Zero-init outputs (temporal attention, fps) would hide the temporal path: perturb every leaf.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k_, p.shape)
                                     for p, k_ in zip(leaves, keys)])
  return jax.jit(lambda p: unet.apply({'params': p}, x, t, ctx, fps=fps,
                                      frame_mask=frame_mask))(params)


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_unet_chunked_equals_xla(monkeypatch):
  """configs/tiny.py U-Net (64 tokens a frame), chunks of 24 queries (3 chunks, the last padded)."""
  monkeypatch.setattr(attention, 'DEFAULT_CHUNK', 24)
  ref = _tiny_unet_out('xla')
  out = _tiny_unet_out('chunked')
  err = rel_err(out, ref)
  print(f'tiny U-Net chunked vs xla: max rel err {err:.2e}')
  assert err <= TOL


def test_unet_causal_flag_equals_mask():
  """Without image frames the temporal attention passes is_causal; with an all-video frame mask it
  builds the tril mask: the same outputs. 'none' differs, so the causal structure is exercised."""
  flag = _tiny_unet_out('xla')
  masked = _tiny_unet_out('xla', frame_mask=jnp.ones((2, 8), bool))
  bidirectional = _tiny_unet_out('xla', temporal_mask='none')
  err = rel_err(flag, masked)
  print(f'is_causal vs tril mask: max rel err {err:.2e}; vs no mask '
        f'{rel_err(flag, bidirectional):.2e}')
  assert err <= TOL
  assert rel_err(flag, bidirectional) > 1e-3
