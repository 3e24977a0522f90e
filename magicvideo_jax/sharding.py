"""Device mesh and shardings: logical axis names -> mesh axes, from the config.

The mesh has axes ('data', 'fsdp'). Parameters are sharded by their logical names through
`config.sharding.logical_axis_rules` (FSDP over output features by default); a dimension that does not
divide by its mesh axes is replicated instead, so one rule set serves every model size and mesh.
Batches are sharded over ('data', 'fsdp') on their leading axis.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')


def create_mesh(mesh_shape: Any = None, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh ('data', 'fsdp') from a config dict {'data': n, 'fsdp': m}; one -1 is filled in.

  Raises a ValueError naming the config key when the shape does not match the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh_shape = dict(mesh_shape or {'data': -1, 'fsdp': 1})
  unknown = set(mesh_shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {sorted(unknown)}; valid axes: {MESH_AXES}')
  sizes = [int(mesh_shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError('config.mesh: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh={mesh_shape}: {len(devices)} devices do not divide by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
        f'config.mesh={mesh_shape} needs {int(np.prod(sizes))} devices, {len(devices)} are available; '
        'set config.mesh.data=-1 to use them all')
  device_array = np.asarray(devices).reshape(sizes)
  try:  # Topology-aware order on TPU/GPU; CPU devices keep their order.
    device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # pylint: disable=broad-except
    pass
  return Mesh(device_array, MESH_AXES)


def _fit_spec(spec: P, shape: Tuple[int, ...], mesh: Mesh) -> P:
  """Replicates dimensions whose size does not divide by the product of their mesh axes."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([mesh.shape[a] for a in names]))
    fitted.append(axes if dim % size == 0 else None)
  return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[Tuple[str, Any]]) -> Any:
  """NamedShardings for a (boxed) abstract tree, e.g. `jax.eval_shape(init)`; unboxed structure."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.unbox(abstract_tree)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit_spec(spec, tuple(x.shape), mesh)),
      mesh_specs, shapes, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Per-process numpy batch (leading axis = this process's slice) -> global jax.Arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x),
      local_batch)


def to_host(tree: Any) -> Any:
  """Numpy copies of global arrays on every host: `device_get` on one process, an all-gather of the
  shards on several (where `np.asarray` of a batch-sharded array raises)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)
