"""Device mesh, logical-axis rules and placement of batches and state.

One code path for every scale: a single CPU is a 1x1x1 mesh over the axes
('data', 'fsdp', 'tensor'). Parameters and activations carry logical axis
names (see models/vit.py); `rules` maps them to mesh axes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical name -> mesh axes. 'embed' over fsdp is FSDP (ZeRO-3 style) when the
# fsdp axis is larger than 1; heads and mlp over tensor is Megatron-style.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('kv', None),
    ('length', None),
    ('layers', None),
    ('classes', None),
    ('channels', None),
)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 ('the rest') and checks the product is the device count."""
  sizes = list(sizes)
  if len(sizes) != len(AXES):
    raise ValueError(f'mesh needs {len(AXES)} sizes for {AXES}, got {sizes}')
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {sizes} has more than one -1')
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f'mesh {sizes} does not divide {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices or min(sizes) < 1:
    raise ValueError(f'mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} '
                     f'devices, but {num_devices} are present')
  return tuple(sizes)


def make_mesh(sizes: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(sizes, len(devices))
  try:
    array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    array = np.asarray(devices).reshape(shape)
  return Mesh(array, AXES)


@contextlib.contextmanager
def active(mesh: Mesh, rules):
  """The mesh and logical-axis rules that jit, init and the models' sharding
  constraints see (`with mesh:` alone no longer makes constraints bind)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def rules_from(config_rules) -> tuple[tuple[str, Any], ...]:
  """Rules from a config list of [name, axes] pairs (None: the defaults)."""
  if not config_rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config_rules)


def tree_shardings(abstract_boxed, mesh: Mesh, rules):
  """NamedShardings for a tree whose leaves may be logically partitioned."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}
