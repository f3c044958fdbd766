"""Mesh layout: per-model-size defaults and the split over slices or hosts."""

import types

import numpy as np
import pytest

from mimjax import sharding


@pytest.mark.parametrize('size,devices,granules,mesh', [
    ('B', 8, 1, (8, 1, 1)),
    ('B', 1024, 1, (1024, 1, 1)),
    ('L', 1, 1, (1, 1, 1)),
    ('L', 8, 1, (1, 8, 1)),
    ('L', 64, 1, (4, 16, 1)),
    ('H', 64, 1, (2, 32, 1)),
    ('H', 1024, 1, (32, 32, 1)),
    ('L', 32, 4, (4, 8, 1)),   # 4 hosts of 8 GPUs: FSDP stays inside a host
    ('H', 12, 1, (3, 4, 1)),
])
def test_default_mesh_per_model_size(size, devices, granules, mesh):
  shape, dcn = sharding.mesh_shapes(None, None, devices, granules, size)
  assert shape == mesh
  assert dcn == ((granules, 1, 1) if granules > 1 else (1, 1, 1))


def test_dcn_defaults_and_errors():
  # Data parallel over 2 slices when the data axis allows it, else flat.
  assert sharding.mesh_shapes((4, 8, 1), None, 32, 2)[1] == (2, 1, 1)
  assert sharding.mesh_shapes((1, 32, 1), None, 32, 2)[1] == (1, 1, 1)
  assert sharding.mesh_shapes((4, 8, 1), (1, 2, 1), 32, 2)[1] == (1, 2, 1)
  assert sharding.mesh_shapes((4, 8, 1), (-1, 1, 1), 32, 4)[1] == (4, 1, 1)
  with pytest.raises(ValueError, match=r'mesh_dcn \(2, 1, 1\) does not divide '
                     r'mesh \(1, 32, 1\): data 1 over 2'):
    sharding.mesh_shapes((1, 32, 1), (2, 1, 1), 32, 2)
  with pytest.raises(ValueError, match='has 4 slices or processes, but 2 are'):
    sharding.mesh_shapes((8, 1, 1), (4, 1, 1), 8, 2)


def _fake_devices(processes: int, per_process: int):
  # Listed round-robin, so that a plain reshape would interleave the hosts.
  return [types.SimpleNamespace(id=i * processes + p, process_index=p,
                                platform='cpu', device_kind='cpu')
          for i in range(per_process) for p in range(processes)]


def test_each_host_is_one_block_of_the_split_axis():
  devices = _fake_devices(processes=2, per_process=4)
  grid = sharding._device_grid((4, 2, 1), (2, 1, 1), devices)  # pylint: disable=protected-access
  hosts = np.vectorize(lambda d: d.process_index)(grid)
  assert (hosts[:2] == 0).all() and (hosts[2:] == 1).all(), hosts
  assert sorted(d.id for d in grid.flat) == list(range(8))
  grid = sharding._device_grid((2, 4, 1), (1, 2, 1), devices)  # pylint: disable=protected-access
  hosts = np.vectorize(lambda d: d.process_index)(grid)
  assert (hosts[:, :2] == 0).all() and (hosts[:, 2:] == 1).all(), hosts
