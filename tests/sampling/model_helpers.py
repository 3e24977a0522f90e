"""What the sampling tests share: random weights for a config's models without compiling an init, and
their comparison."""

import flax.linen as nn
import jax
import numpy as np

from magicvideo_jax import models as models_lib
from magicvideo_jax.training import state as state_lib


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def perturb(params, seed):
  """Every leaf moved by noise (zero-initialised output layers and identity adaptors included)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                      nn.unbox(params))


def init(config, seed):
  """The config's modules and random numpy weights for every leaf (kernels ~ N(0, 1 / fan_in), norm
  scales ~ 1, the rest small), from `jax.eval_shape` of the init: no init program to compile."""
  modules = models_lib.build_models(config.model)
  abstract = nn.unbox(jax.eval_shape(lambda k: state_lib.init_params(modules, config, k),
                                     jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      return rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape).astype(np.float32)
    if name == 'scale':
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

  return modules, jax.tree_util.tree_map_with_path(draw, abstract)
