"""Device mesh, logical axis rules, and the shardings of params, optimizer state and batches.

Sharding is declared, not coded: every weight and activation carries logical axis names
(models/clip.py, losses.py), a config holds a table of (logical name, mesh axes) rules, and
this module turns the two into `NamedSharding`s. A dimension whose size the mesh axes do not
divide is replicated instead (tiny test models, the scalar logit scale), so one rule table
serves a laptop and a pod slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical axis, mesh axes). Weights: embed is FSDP-sharded, MLP/heads/vocab tensor-parallel.
# Activations: batch over data x fsdp, MLP/heads over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("student_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("proj", None),
    ("student_proj", None),
    ("positions", None),
    ("norm", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("length", None),
    ("kv", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices; one -1 entry takes the devices left over.

  Axes are Auto (GSPMD propagation): jax 0.10's `jax.make_mesh` defaults to Explicit axes,
  under which a sharded contraction raises instead of inserting collectives.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} has {len(shape)} entries for axes {axis_names}.")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {shape} does not divide the {len(devices)} devices.")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices; "
                     f"there are {len(devices)}. Use -1 for the data axis to fill the rest.")
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))


def logical_to_sharding(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                        mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> NamedSharding:
  """NamedSharding for one array; dims the mapped mesh axes don't divide stay replicated."""
  if logical_axes is None:
    return NamedSharding(mesh, PartitionSpec())
  rule_table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, logical_axes, strict=True):
    mesh_axes = rule_table.get(name) if name is not None else None
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or dim % size:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return NamedSharding(mesh, PartitionSpec(*spec))


def param_shardings(boxed_abstract_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> Any:
  """Shardings for a params tree as returned (boxed, abstract) by `jax.eval_shape(init)`."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      return logical_to_sharding(leaf.names, value.shape, mesh, rules)
    return logical_to_sharding(None, np.shape(leaf), mesh, rules)
  return jax.tree_util.tree_map(one, boxed_abstract_params,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def shard_host_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice of the global batch into global arrays (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in batch.items()}


def put_tree(tree: Any, shardings: Any) -> Any:
  """Places host (numpy) arrays with the given shardings; works on every host of a pod."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree_util.tree_map(put, tree, shardings)
