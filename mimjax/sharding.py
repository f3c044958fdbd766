"""Device mesh, logical-axis rules and placement of batches and state.

One code path for every scale: a single CPU is a 1x1x1 mesh over the axes
('data', 'fsdp', 'tensor'). Parameters and activations carry logical axis
names (see models/vit.py); `rules` maps them to mesh axes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mimjax import errors

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


# Model size -> the largest 'fsdp' axis of the default mesh. ViT-B and smaller
# train data-parallel (their state is small); L and H shard it, over at most
# this many devices of one slice or host (docs/scaling.md).
DEFAULT_FSDP = {'L': 16, 'H': 32}


def topology(devices=None) -> tuple[int, int]:
  """(number of devices, number of granules): the slices of a multi-slice
  TPU job, the processes (hosts) elsewhere. Devices within a granule share a
  fast network (ICI, NVLink); granules talk over the data-center network."""
  devices = jax.devices() if devices is None else devices
  return len(devices), len({_granule(d) for d in devices})


def _granule(device) -> int:
  return device.slice_index if device.platform == 'tpu' else device.process_index


def mesh_shapes(sizes: Sequence[int] | None, dcn: Sequence[int] | None,
                num_devices: int, num_granules: int = 1,
                model_size: str = 'B') -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The whole mesh, and how its axes split over granules (DCN).

  sizes None: the model size's default, DEFAULT_FSDP within a granule and
  data parallel over the rest. One -1 in sizes or dcn means "the rest". dcn
  None: data parallel over the granules when the data axis allows it, else
  one flat mesh, as with (1, 1, 1).
  """
  if sizes is None:
    per_granule = num_devices // num_granules
    sizes = (-1, math.gcd(per_granule, DEFAULT_FSDP.get(model_size, 1)), 1)
  shape = _resolve(sizes, num_devices, 'mesh')
  if dcn is None:
    return shape, ((num_granules, 1, 1) if shape[0] % num_granules == 0 else
                   (1, 1, 1))
  if tuple(dcn) == (1, 1, 1):  # one flat mesh, whatever the network
    return shape, (1, 1, 1)
  dcn = _resolve(dcn, num_granules, 'mesh_dcn', 'slices or processes')
  for axis, size, split in zip(AXES, shape, dcn):
    if size % split:
      raise errors.Invalid(f'mesh_dcn {dcn} does not divide mesh {shape}: '
                           f'{axis} {size} over {split} slices or processes')
  return shape, dcn


def _resolve(sizes, count: int, key: str, what: str = 'devices'):
  """Resolves one -1 ('the rest') and checks the product is `count`."""
  sizes = list(sizes)
  if len(sizes) != len(AXES):
    raise errors.Invalid(f'{key} needs {len(AXES)} sizes for {AXES}, got '
                         f'{sizes}')
  if sizes.count(-1) > 1:
    raise errors.Invalid(f'{key} {sizes} has more than one -1')
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if count % known:
      raise errors.Invalid(f'{key} {sizes} does not divide {count} {what}')
    sizes[sizes.index(-1)] = count // known
  if math.prod(sizes) != count or min(sizes) < 1:
    raise errors.Invalid(f'{key} {dict(zip(AXES, sizes))} has '
                         f'{math.prod(sizes)} {what}, but {count} are present')
  return tuple(sizes)


def make_mesh(sizes: Sequence[int] | None = (-1, 1, 1), devices=None,
              dcn: Sequence[int] | None = None, model_size: str = 'B') -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over all (or the given) devices.

  Axes split over granules (slices, hosts) keep each granule's devices in
  one contiguous block, so the traffic across the slow network is only along
  those axes. See `mesh_shapes` for None and -1.
  """
  devices = jax.devices() if devices is None else devices
  shape, dcn = mesh_shapes(sizes, dcn, *topology(devices), model_size)
  logging.info('mesh %s on %d devices; split over slices or processes: %s',
               dict(zip(AXES, shape)), len(devices), dict(zip(AXES, dcn)))
  return Mesh(_device_grid(shape, dcn, devices), AXES)


def config_mesh(config, devices=None) -> Mesh:
  """The mesh a config asks for (config.mesh, config.mesh_dcn)."""
  return make_mesh(config.mesh, devices, config.mesh_dcn, config.model.size)


def _device_grid(shape, dcn, devices) -> np.ndarray:
  """Devices laid out as `shape`, one contiguous block per granule along
  `dcn`, so only those axes cross the slow network."""
  if math.prod(dcn) > 1:
    inner = tuple(s // k for s, k in zip(shape, dcn))
    return mesh_utils.create_hybrid_device_mesh(
        inner, dcn, devices, process_is_granule=devices[0].platform != 'tpu')
  try:  # topology-aware order on TPU
    return mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    return np.asarray(devices, dtype=object).reshape(shape)


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


def shaped(tree, shardings):
  """ShapeDtypeStructs of `tree`'s arrays, placed by `shardings`: an
  abstract state (to compile or restore against)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)
