"""Attention kernels and the per-call selector behind `layers.dot_product_attention`.

Implementations (`model.attention_impl`):
- None / 'xla': `jax.nn.dot_product_attention(implementation='xla')`, the whole `[B, N, Tq, Tk]`
  fp32 logits matrix at once (and, under autodiff, its softmax kept for the backward).
- 'cudnn': cuDNN flash attention where it can run (GPU, fp16/bf16, head dim a multiple of 8 and
  <= 128, <= 256 on Hopper, even lengths with a mask); elsewhere the call falls back (and says so).
- 'chunked': `chunked_attention`, queries in chunks under `lax.map`, each chunk rematerialised in the
  backward, so at most one chunk's logits `[B, N, chunk, Tk]` is live; exact (same softmax per row).
- 'auto': per call, cuDNN flash on GPU where it can run, Pallas flash on TPU (no mask, lengths
  multiples of 128) when importable, the chunked path for long sequences, XLA otherwise.

`choose_attention` is the pure decision (backend, dtype, shapes -> implementation, reason); each
distinct (implementation asked, shapes, dtype, mask) is logged once, when the call is traced.
"""

import math
from typing import Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'chunked')
DEFAULT_CHUNK = 256  # Query rows per chunk: a quarter of a 32x32 latent's 1024 tokens.
# 'auto' chunks when a head's logits matrix has at least this many entries (1024 x 512 and up):
# below that the whole matrix is small and one fused softmax is faster.
CHUNK_MIN_ENTRIES = 1024 * 512
PALLAS_BLOCK = 128  # The Pallas TPU flash kernel's default block along both sequence axes.

_logged = set()


def _cudnn_blocker(dtype, head_dim: int, q_len: int, kv_len: int, has_mask: bool,
                   compute_capability: Optional[str]) -> Optional[str]:
  """Why cuDNN flash attention cannot run this call (None: it can), after jax's own checks."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
    return f'dtype {jnp.dtype(dtype).name} (cuDNN flash needs float16/bfloat16)'
  major = int(str(compute_capability or '0').split('.')[0])
  limit = 256 if major >= 9 else 128
  if head_dim % 8 or head_dim > limit:
    return f'head dim {head_dim} (cuDNN flash: a multiple of 8, <= {limit} here)'
  if has_mask and (q_len % 2 or kv_len % 2):
    return f'lengths {q_len}x{kv_len} with a mask (cuDNN: even lengths with a bias)'
  return None


def choose_attention(requested: Optional[str], *, backend: str, dtype, head_dim: int, q_len: int,
                     kv_len: int, has_mask: bool = False, compute_capability: Optional[str] = None,
                     pallas_tpu: bool = False) -> Tuple[str, str]:
  """The implementation for one attention call: ('xla' | 'cudnn' | 'chunked' | 'pallas_tpu', reason).

  Pure (no device queries), so the choices can be tested without a GPU or TPU. `backend` is
  `jax.default_backend()` ('cpu', 'gpu', 'tpu'), `compute_capability` the GPU's ('9.0' on H100).
  """
  if requested not in (None,) + IMPLEMENTATIONS:
    raise ValueError(f'attention_impl={requested!r}; valid: None, {IMPLEMENTATIONS}')
  long = q_len * kv_len >= CHUNK_MIN_ENTRIES
  fallback = ('chunked', 'long sequence') if long else ('xla', 'short sequence')
  if requested in (None, 'xla'):
    return 'xla', 'requested'
  if requested == 'chunked':
    return 'chunked', 'requested'
  if backend == 'gpu':
    blocker = _cudnn_blocker(dtype, head_dim, q_len, kv_len, has_mask, compute_capability)
    if blocker is None:
      return 'cudnn', 'requested' if requested == 'cudnn' else 'GPU, cuDNN flash can run'
    return fallback[0], f'no cuDNN: {blocker}; {fallback[1]}'
  if requested == 'cudnn':
    return fallback[0], f'no cuDNN on backend {backend!r}; {fallback[1]}'
  if backend == 'tpu' and pallas_tpu and not has_mask and not (q_len % PALLAS_BLOCK or
                                                               kv_len % PALLAS_BLOCK):
    return 'pallas_tpu', 'TPU, Pallas flash can run'
  return fallback


def _large_negative(dtype):
  return jnp.asarray(0.7 * jnp.finfo(dtype).min, dtype)  # As jax.nn's XLA path.


def _mask_4d(mask: jax.Array) -> jax.Array:
  mask = jnp.asarray(mask, bool)
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                      mask: Optional[jax.Array] = None, is_causal: bool = False,
                      chunk_size: Optional[int] = None) -> jax.Array:
  """Softmax attention over query chunks: `[B, Tq, N, D]`, `[B, Tk, N, D]` x2 -> `[B, Tq, N, D]`.

  The logits and softmax are fp32 as in `jax.nn.dot_product_attention`'s XLA path; each chunk runs
  under `jax.checkpoint`, so the backward recomputes a chunk's probabilities instead of keeping all
  of them. `mask` (True = attend) broadcasts to `[B, N, Tq, Tk]`; `Tq` need not divide `chunk_size`
  (default `DEFAULT_CHUNK`, read at call time).
  """
  b, tq, n, d = query.shape
  tk = key.shape[1]
  chunk = max(1, min(chunk_size or DEFAULT_CHUNK, tq))
  num = -(-tq // chunk)
  pad = num * chunk - tq
  scale = 1.0 / math.sqrt(d)
  precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(
                   jnp.dtype(query.dtype))
  q = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else query
  q = jnp.moveaxis(q.reshape(b, num, chunk, n, d), 1, 0)  # [C, B, chunk, N, D]
  m = None if mask is None else _mask_4d(mask)
  row_mask = m is not None and m.shape[2] != 1
  if row_mask:  # Per-row mask: chunk it with the queries (padded rows attend everywhere).
    m = jnp.broadcast_to(m, m.shape[:2] + (tq, tk))
    m = jnp.pad(m, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True) if pad else m
    m = jnp.moveaxis(m.reshape(m.shape[:2] + (num, chunk, tk)), 2, 0)
  starts = jnp.arange(num, dtype=jnp.int32) * chunk

  def one_chunk(xs):
    qc, mc, start = xs
    logits = jnp.einsum('btnd,bsnd->bnts', qc, key, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    if m is not None:
      logits = jnp.where(mc if row_mask else m, logits, _large_negative(jnp.float32))
    if is_causal:
      rows = start + jnp.arange(chunk, dtype=jnp.int32)
      causal = rows[:, None] >= jnp.arange(tk, dtype=jnp.int32)[None, :]
      logits = jnp.where(causal, logits, _large_negative(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum('bnts,bsnd->btnd', probs, value)

  body = jax.checkpoint(one_chunk, prevent_cse=False)  # In a loop: CSE cannot merge chunks.
  out = jax.lax.map(body, (q, m if row_mask else starts, starts))
  out = jnp.moveaxis(out, 0, 1).reshape(b, num * chunk, n, d)
  return out[:, :tq] if pad else out


def _pallas_tpu_available() -> bool:
  try:
    # pylint: disable-next=g-import-not-at-top,unused-import
    from jax.experimental.pallas.ops.tpu import flash_attention
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _device_info() -> Tuple[str, Optional[str]]:
  backend = jax.default_backend()
  if backend != 'gpu':
    return backend, None
  return backend, getattr(jax.devices()[0], 'compute_capability', None)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
              mask: Optional[jax.Array] = None, is_causal: bool = False,
              implementation: Optional[str] = None, chunk_size: Optional[int] = None) -> jax.Array:
  """`[B, Tq, N, D]` attention through the implementation `choose_attention` picks for this call."""
  backend, cc = _device_info()
  head_dim, q_len, kv_len = query.shape[-1], query.shape[1], key.shape[1]
  impl, reason = choose_attention(
      implementation, backend=backend, dtype=query.dtype, head_dim=head_dim, q_len=q_len,
      kv_len=kv_len, has_mask=mask is not None, compute_capability=cc,
      pallas_tpu=backend == 'tpu' and _pallas_tpu_available())
  tag = (implementation, query.shape, key.shape, jnp.dtype(query.dtype).name,
         None if mask is None else tuple(np.shape(mask)), is_causal)
  if tag not in _logged:
    _logged.add(tag)
    logging.info('attention q%s k%s %s mask=%s causal=%s: asked %s -> %s (%s)', tuple(query.shape),
                 tuple(key.shape), tag[3], tag[4], is_causal, implementation, impl, reason)
  if impl == 'chunked':
    return chunked_attention(query, key, value, mask=mask, is_causal=is_causal,
                             chunk_size=chunk_size)
  if impl == 'pallas_tpu':
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
    t = lambda x: jnp.swapaxes(x, 1, 2)  # Its layout is [B, N, T, D].
    out = fa.flash_attention(t(query), t(key), t(value), causal=is_causal,
                             sm_scale=1.0 / math.sqrt(head_dim))
    return t(out)
  if impl == 'cudnn' and mask is not None:
    # cuDNN takes masks as an additive bias of the compute dtype.
    bias = jnp.where(mask, 0.0, jnp.finfo(query.dtype).min).astype(query.dtype)
    return jax.nn.dot_product_attention(query, key, value, bias=bias, is_causal=is_causal,
                                        implementation='cudnn')
  return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal,
                                      implementation=impl if impl == 'cudnn' else
                                      (None if implementation is None else 'xla'))
