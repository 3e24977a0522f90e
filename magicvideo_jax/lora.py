r"""LoRA: low-rank adapters on Dense and Conv kernels, as parameters beside the model's.

An adapter on a kernel `W` is a pair `lora_A`, `lora_B` and adds `scale * A @ B` to it, with
`scale = alpha / rank` (PEFT's `lora_alpha / r`):

  Dense kernel [in, out]:         lora_A [in, r],         lora_B [r, out]
  Conv kernel  [kh, kw, in, out]: lora_A [kh, kw, in, r], lora_B [r, out]

PEFT computes `W x + scale * B(A(x))` (for a conv, `A` a conv of the base's size and `B` a 1x1 conv);
both branches are linear, so adding the product to the kernel is the same function. The adapters
live in `params['lora']`, a tree with the model's nesting whose leaves sit where the kernels' module
is: `params['lora']['unet']['down_blocks_0']...['to_q'] = {'lora_A', 'lora_B'}`. `fold(params)`
returns the model parameters with the adapters added; the train step and the sampling pipeline
call it, so nothing else in the models knows about LoRA. A fresh adapter has `lora_B = 0` (PEFT's
init): `fold` is then the identity.

Configured by `config.lora` (`rank`, `alpha`, `targets`, `dropout`); `weights/lora_io.py` reads and
writes the diffusers / PEFT safetensors layout.
"""

import math
import re
from typing import Any, Dict, Optional, Sequence, Tuple

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Params = Dict[str, Any]

KEY = 'lora'
A, B = 'lora_A', 'lora_B'


def enabled(config: ml_collections.ConfigDict) -> bool:
  lora = config.get('lora')
  return lora is not None and int(lora.rank) > 0


def alpha(config: ml_collections.ConfigDict) -> float:
  """config.lora.alpha, 0 meaning alpha = rank."""
  return float(config.lora.alpha or int(config.lora.rank))


def scale(config: ml_collections.ConfigDict) -> float:
  """alpha / rank; 1 for a config without adapters (nothing is folded then)."""
  return alpha(config) / int(config.lora.rank) if enabled(config) else 1.0


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line errors for a `config.lora` that cannot work."""
  lora = config.lora
  if int(lora.rank) < 0:
    raise ValueError(f'config.lora.rank={lora.rank} must be >= 0 (0: no LoRA)')
  if float(lora.alpha) < 0:
    raise ValueError(f'config.lora.alpha={lora.alpha} must be >= 0 (0: alpha = rank)')
  if float(lora.dropout):
    raise ValueError(
        f'config.lora.dropout={lora.dropout}: not supported; the adapters are added to the kernels '
        '(one weight per layer, the same function as PEFT without dropout), so set it to 0.0')
  if not tuple(lora.targets):
    raise ValueError('config.lora.targets is empty: give regexes over kernel paths, e.g. '
                     r'"^unet/.*/attn[12]/to_(q|k|v|out_0)/kernel$"')


def target_paths(params: Params, targets: Sequence[str]) -> Tuple[str, ...]:
  """Flat paths of the kernels that the regexes `targets` select (re.search over 'a/b/kernel').

  Raises:
    ValueError: a regex selects no kernel, or selects a leaf that is not a Dense or Conv kernel.
  """
  flat = traverse_util.flatten_dict(nn.unbox(params), sep='/')
  chosen = []
  for pattern in targets:
    regex = re.compile(pattern)
    hits = [p for p in flat if regex.search(p) and not p.startswith(KEY + '/')]
    if not hits:
      raise ValueError(f'config.lora.targets: {pattern!r} matches no parameter')
    for path in hits:
      ndim = len(flat[path].shape)
      if not path.endswith('/kernel') or ndim not in (2, 4):
        raise ValueError(f'config.lora.targets: {pattern!r} matches {path} {tuple(flat[path].shape)}, '
                         'which is not a Dense or Conv kernel')
      if path not in chosen:
        chosen.append(path)
  return tuple(chosen)


def _module(path: str) -> str:
  return path[:-len('/kernel')]


def init(params: Params, config: ml_collections.ConfigDict, key: jax.Array) -> Params:
  """Fresh adapters for `config.lora.targets`: lora_A ~ PEFT's kaiming-uniform (bound
  1 / sqrt(fan_in)), lora_B = 0. Works on arrays and on `jax.eval_shape` structs."""
  rank = int(config.lora.rank)
  flat = traverse_util.flatten_dict(nn.unbox(params), sep='/')
  out = {}
  for i, path in enumerate(target_paths(params, config.lora.targets)):
    kernel = flat[path]
    *receptive, fan_out = kernel.shape
    fan_in = math.prod(receptive)
    bound = 1.0 / math.sqrt(fan_in)
    out[f'{_module(path)}/{A}'] = jax.random.uniform(
        jax.random.fold_in(key, i), (*receptive, rank), jnp.float32, -bound, bound)
    out[f'{_module(path)}/{B}'] = jnp.zeros((rank, fan_out), jnp.float32)
  return traverse_util.unflatten_dict(out, sep='/')


def delta(lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
  """A @ B over the rank axis, in the kernel's layout."""
  return jnp.einsum('...r,ro->...o', lora_a, lora_b)


def adapters(lora_params: Params) -> Dict[str, Tuple[Any, Any]]:
  """Module path -> (lora_A, lora_B) of a `params['lora']` tree."""
  flat = traverse_util.flatten_dict(lora_params, sep='/')
  modules = sorted({p.rsplit('/', 1)[0] for p in flat})
  return {m: (flat[f'{m}/{A}'], flat[f'{m}/{B}']) for m in modules}


def fold(params: Params, scale_: float = 1.0, lora_params: Optional[Params] = None) -> Params:
  """The model parameters (without 'lora') with `scale_ * A @ B` added to each adapted kernel.

  The adapters are `lora_params`, else `params['lora']`; without either, `params` is returned
  as it is.
  """
  if lora_params is None:
    lora_params = params.get(KEY)
  base = {k: v for k, v in params.items() if k != KEY}
  if not lora_params:
    return base if KEY in params else params
  flat = traverse_util.flatten_dict(base, sep='/')
  for module, (lora_a, lora_b) in adapters(lora_params).items():
    path = f'{module}/kernel'
    if path not in flat:
      raise ValueError(f'LoRA adapter for {path}, which the model does not have')
    kernel = flat[path]
    update = delta(lora_a, lora_b)
    if update.shape != kernel.shape:
      raise ValueError(f'LoRA adapter for {path} makes {update.shape}, the kernel is {kernel.shape}')
    flat[path] = (kernel + scale_ * update.astype(jnp.float32)).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat, sep='/')


def count(lora_params: Params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(lora_params))
