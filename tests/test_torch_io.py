"""Tests for mimjax.torch_io: reading torch / safetensors / npz checkpoints."""

import argparse
import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from mimjax import torch_io
from mimjax.torch_io import load_state_dict, save_npz_state_dict


# ---------------------------------------------------------------------------
# without torch


def _ref_state_dict():
  rng = np.random.default_rng(0)
  return {
      'blocks.0.attn.qkv.weight': rng.standard_normal((6, 4)).astype(np.float32),
      'blocks.0.norm1.bias': rng.standard_normal(4).astype(np.float16),
      'pos_embed': rng.standard_normal((1, 5, 4)),
      'step': np.array(7, dtype=np.int64),
      'mask': np.array([True, False, True]),
  }


def _assert_same(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    assert got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_npz_roundtrip(tmp_path):
  sd = _ref_state_dict()
  p = tmp_path / 'w.npz'
  save_npz_state_dict(p, sd)
  _assert_same(load_state_dict(p), sd)
  _assert_same(load_state_dict(str(p)), sd)


def test_safetensors_with_bf16(tmp_path):
  st = pytest.importorskip('safetensors.numpy')
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  sd = _ref_state_dict()
  want_bf16 = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
  p = tmp_path / 'w.safetensors'
  st.save_file({**sd, 'bf': want_bf16.astype(ml_dtypes.bfloat16)}, str(p))
  got = load_state_dict(p)
  bf = got.pop('bf')
  assert bf.dtype == np.float32
  np.testing.assert_array_equal(bf, want_bf16)
  _assert_same(got, sd)


def test_safetensors_package(tmp_path):
  st = pytest.importorskip('safetensors.numpy')
  sd = _ref_state_dict()
  p = tmp_path / 'model.safetensors'
  st.save_file(sd, str(p))
  _assert_same(load_state_dict(p), sd)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    load_state_dict(tmp_path / 'nope.pth')


@pytest.mark.parametrize('content', [
    b'',
    b'this is not a checkpoint at all, just text\n',
    os.urandom(4096),
    b'PK\x03\x04' + b'\x00' * 100,  # zip header, garbage after
    b'\x80\x02garbage-pickle',
])
def test_garbage_raises_value_error(tmp_path, content):
  p = tmp_path / 'bad.pth'
  p.write_bytes(content)
  with pytest.raises(ValueError) as e:
    load_state_dict(p)
  msg = str(e.value)
  assert str(p) in msg and '\n' not in msg


def test_zip_without_tensors_raises(tmp_path):
  p = tmp_path / 'notensors.pth'
  with zipfile.ZipFile(p, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle.dumps({'epoch': 3}, protocol=2))
  with pytest.raises(ValueError, match='no tensors'):
    load_state_dict(p)


def _malicious_pickle(marker):
  # Hand-written protocol-0 opcodes: os.system('touch marker'), plus
  # builtins.eval / posix.system variants, all inside a dict.
  cmd = f'touch {marker}'
  return (b'(dp0\n'
          b"S'a'\n" + b'cos\nsystem\n(S' + repr(cmd).encode() + b'\ntR'
          b's' b"S'b'\n" + b'cposix\nsystem\n(S' + repr(cmd).encode() + b'\ntR'
          b's' b"S'c'\n" + b"cbuiltins\neval\n(S'__import__(\"os\").system(" +
          repr(cmd).replace("'", '"').encode() + b")'\ntR"
          b's.')


class _Exploit:
  """What an attacker pickles: unpickling it runs os.system(cmd)."""

  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def _zip(path, pickled, data=None):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pickled)
    if data is not None:
      zf.writestr('archive/data/0', data)
  return path


def _body(pickled):
  """A pickle's opcodes without its PROTO header and STOP, to splice in."""
  return pickled[2:-1] if pickled[:1] == b'\x80' else pickled[:-1]


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / 'pwned'
  payload = _malicious_pickle(marker)
  # Sanity: the payload really is an exploit: three GLOBAL + REDUCE calls.
  import pickletools  # pylint: disable=g-import-not-at-top
  ops = [op.name for op, _, _ in pickletools.genops(payload)]
  assert ops.count('GLOBAL') == 3 and ops.count('REDUCE') == 3
  tensor = np.arange(6, dtype='<f4').tobytes()
  evil = [
      _zip(tmp_path / 'evil.pth', payload),
      # A real tensor beside the payload does not make it acceptable.
      _zip(tmp_path / 'evil2.pth', payload[:-1] + _storage_zip_pickle(),
           tensor),
      # The usual exploit, as pickle writes it (protocols 2 and 0) ...
      *[_zip(tmp_path / f'evil_p{proto}.pth', b'(dp0\n' + _storage_zip_pickle()
             [:-1] + b"S'x'\n" + _body(pickle.dumps(
                 _Exploit(f'touch {marker}'), protocol=proto)) + b's.', tensor)
        for proto in (0, 2)],
      # ... and through INST (protocol 0's class instantiation).
      _zip(tmp_path / 'evil_inst.pth', b'(S' + repr(f'touch {marker}').encode()
           + b'\nios\nsystem\n.'),
  ]
  for path in evil:
    with pytest.raises(ValueError, match=r'calls (os|posix|nt)\.system.*'
                       r'refused') as err:
      load_state_dict(path)
    assert str(path) in str(err.value) and '\n' not in str(err.value)
  assert not marker.exists()


def _storage_zip_pickle(offset=0, size=(2, 3), stride=(3, 1)):
  """Protocol-0 opcodes for  "'w': _rebuild_tensor_v2(storage0, ...)" + SETITEM."""
  return (b"S'w'\n"
          b'ctorch._utils\n_rebuild_tensor_v2\n'
          b"((S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI6\ntQ" +
          f'I{offset}\n'.encode() +
          b'(' + b''.join(f'I{s}\n'.encode() for s in size) + b't' +
          b'(' + b''.join(f'I{s}\n'.encode() for s in stride) + b't' +
          b'I00\n' + b'ccollections\nOrderedDict\n)R' + b'tR' + b's.')


@pytest.mark.parametrize('offset,size,stride', [
    (0, (2, 3), (3, 2)),     # reaches element 7 of 6
    (5, (2,), (1,)),         # offset past the end
    (0, (100000, 100000), (100000, 1)),
])
def test_out_of_bounds_geometry_rejected(tmp_path, offset, size, stride):
  p = tmp_path / 'oob.pth'
  with zipfile.ZipFile(p, 'w') as zf:
    zf.writestr('archive/data.pkl', b'(dp0\n' + _storage_zip_pickle(
        offset, size, stride))
    zf.writestr('archive/data/0', np.arange(6, dtype='<f4').tobytes())
  with pytest.raises(ValueError, match='oob.pth'):
    load_state_dict(p)


@pytest.mark.parametrize('order', [b'little', b'big'])
def test_handwritten_zip_any_prefix_and_byte_order(tmp_path, order):
  p = tmp_path / 'w.pth'
  with zipfile.ZipFile(p, 'w') as zf:
    zf.writestr('mae_pretrain_vit_base/data.pkl',
                b'(dp0\n' + _storage_zip_pickle(stride=(1, 2)))
    zf.writestr('mae_pretrain_vit_base/byteorder', order)
    zf.writestr('mae_pretrain_vit_base/data/0',
                np.arange(6, dtype='<f4' if order == b'little' else '>f4')
                .tobytes())
  if order == b'big':  # torch writes little-endian files on every usual host
    with pytest.raises(ValueError, match='not a little-endian'):
      load_state_dict(p)
    return
  got = load_state_dict(p)['w']
  assert got.dtype == np.float32 and got.dtype.isnative
  np.testing.assert_array_equal(
      got, np.arange(6, dtype=np.float32).reshape(3, 2).T)


def test_training_checkpoint_with_namespace_args_loads(tmp_path):
  """A training checkpoint's `args` (an argparse.Namespace) is inert data:
  the weights load, and the Namespace is kept as its pickled state."""
  ns = argparse.Namespace(lr=1.5, model='mae_vit_base_patch16')
  body = _body(pickle.dumps(ns, protocol=2))
  p = _zip(tmp_path / 'checkpoint-3.pth',
           b"(dp0\nS'args'\n" + body + b's' + b"S'model'\n(dp1\n" +
           _storage_zip_pickle()[:-1] + b"sS'epoch'\nI3\ns.",
           np.arange(6, dtype='<f4').tobytes())
  assert list(load_state_dict(p)) == ['w']
  np.testing.assert_array_equal(load_state_dict(p)['w'],
                                np.arange(6, dtype=np.float32).reshape(2, 3))
  obj = torch_io._Unpickler(io.BytesIO(pickle.dumps(ns, protocol=2))).load()
  assert obj.state == {'lr': 1.5, 'model': 'mae_vit_base_patch16'}
  od = collections.OrderedDict(a=1)
  assert torch_io._Unpickler(
      io.BytesIO(pickle.dumps(od, protocol=2))).load() == od


def test_legacy_torch_format_names_the_fix(tmp_path):
  p = tmp_path / 'old.pth'
  p.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2))
  with pytest.raises(ValueError, match=r'torch < 1\.6: re-save it'):
    load_state_dict(p)


# ---------------------------------------------------------------------------
# with torch


@pytest.fixture
def torch():
  return pytest.importorskip('torch')


def _torch_ref(torch):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(10, 4, generator=g)
  return collections.OrderedDict([
      ('f32', torch.randn(3, 5, generator=g)),
      ('f16', torch.randn(7, generator=g).half()),
      ('bf16', torch.randn(2, 3, generator=g).bfloat16()),
      ('i64', torch.arange(-5, 5)),
      ('i32', torch.arange(4, dtype=torch.int32)),
      ('u8', torch.arange(250, 256, dtype=torch.uint8)),
      ('bool', torch.tensor([True, False, True])),
      ('f64', torch.randn(2, 2, generator=g, dtype=torch.float64)),
      ('scalar', torch.tensor(3.5)),
      ('empty', torch.zeros(0, 3)),
      ('transposed', base.t()),         # non-contiguous, shares storage
      ('view_offset', base[2:]),        # storage offset 8
      ('strided', base[1::3, ::2]),     # offset + steps
      ('expanded', torch.randn(1, 3, generator=g).expand(4, 3)),  # stride 0
  ])


def _check_torch(got, want):
  assert list(got) == list(want)
  for k, t in want.items():
    if str(t.dtype) == 'torch.bfloat16':
      ref = t.float().numpy()
    else:
      ref = t.contiguous().numpy()
    assert got[k].dtype == ref.dtype, k
    assert got[k].shape == ref.shape, k
    assert got[k].flags['C_CONTIGUOUS'], k
    np.testing.assert_array_equal(got[k], ref, err_msg=k)


def test_torch_plain_state_dict(tmp_path, torch):
  sd = _torch_ref(torch)
  p = tmp_path / 'sd.pth'
  torch.save(sd, p)
  _check_torch(load_state_dict(p), sd)


def test_torch_mae_training_checkpoint(tmp_path, torch):
  sd = _torch_ref(torch)
  model = torch.nn.Linear(3, 2)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  model(torch.randn(4, 3)).sum().backward()
  opt.step()
  ckpt = {'model': sd, 'optimizer': opt.state_dict(), 'epoch': 3,
          'scaler': {'scale': 65536.0, 'growth_tracker': 0},
          'args': argparse.Namespace(lr=1, output_dir='./out',
                                     model='mae_vit_base_patch16')}
  p = tmp_path / 'checkpoint-3.pth'
  torch.save(ckpt, p)
  _check_torch(load_state_dict(p), sd)


@pytest.mark.parametrize('key', ['state_dict', 'model_state'])
def test_torch_other_wrapper_keys(tmp_path, torch, key):
  sd = {'a': torch.ones(2), 'b': torch.arange(3)}
  p = tmp_path / 'c.ckpt'
  torch.save({key: sd, 'global_step': 10, 'hparams': {'x': 1}}, p)
  _check_torch(load_state_dict(p), sd)


def test_torch_module_state_dict(tmp_path, torch):
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                            torch.nn.Linear(8, 2))
  net[1].weight.data.uniform_()
  sd = net.state_dict()
  p = tmp_path / 'net.pth'
  torch.save(sd, p)
  got = load_state_dict(p)
  assert sorted(got) == sorted(sd)
  _check_torch(got, sd)
  # Parameters themselves (not detached), as in torch.save(dict(named_parameters))
  params = dict(net.named_parameters())
  torch.save(params, p)
  _check_torch(load_state_dict(p), {k: v.detach() for k, v in params.items()})


def test_torch_no_torch_import_needed(tmp_path, torch, monkeypatch):
  sd = {'w': torch.randn(3, 3)}
  p = tmp_path / 'w.pth'
  torch.save(sd, p)
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *a, **k):
    if name == 'torch' or name.startswith('torch.'):
      raise AssertionError('torch_io imported torch')
    return real_import(name, *a, **k)

  monkeypatch.setattr(builtins, '__import__', no_torch)
  got = load_state_dict(p)
  monkeypatch.undo()
  np.testing.assert_array_equal(got['w'], sd['w'].numpy())


def test_torch_truncated_zip(tmp_path, torch):
  p = tmp_path / 'full.pth'
  torch.save({'w': torch.randn(64, 64)}, p)
  data = p.read_bytes()
  q = tmp_path / 'cut.pth'
  q.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='cut.pth'):
    load_state_dict(q)


def test_torch_legacy_format_is_named(tmp_path, torch):
  p = tmp_path / 'legacy.pth'
  torch.save({'w': torch.randn(4)}, p, _use_new_zipfile_serialization=False)
  with pytest.raises(ValueError, match=r'legacy.pth: .*torch < 1\.6'):
    load_state_dict(p)


def test_torch_safetensors_bf16(tmp_path, torch):
  st = pytest.importorskip('safetensors.torch')
  sd = {'bf': torch.randn(3, 4).bfloat16(), 'f': torch.randn(5)}
  p = tmp_path / 'm.safetensors'
  st.save_file(sd, str(p))
  got = load_state_dict(p)
  _check_torch({k: got[k] for k in sd}, sd)
  assert sorted(got) == sorted(sd)


def test_torch_v3_dtypes_parameter_and_requires_grad(tmp_path, torch):
  sd = {'u16': torch.arange(5).to(torch.uint16)[1:],  # _rebuild_tensor_v3
        'param': torch.nn.Parameter(torch.ones(2)),
        'grad': torch.full((3,), 2.0, requires_grad=True)}
  p = tmp_path / 'v3.pth'
  torch.save(sd, p)
  got = load_state_dict(p)
  assert got['u16'].dtype == np.uint16
  np.testing.assert_array_equal(got['u16'], [1, 2, 3, 4])
  np.testing.assert_array_equal(got['param'], [1.0, 1.0])
  np.testing.assert_array_equal(got['grad'], [2.0, 2.0, 2.0])
  if hasattr(torch, 'float8_e4m3fn'):
    torch.save({'f8': torch.ones(2).to(torch.float8_e4m3fn)}, p)
    with pytest.raises(ValueError, match='float8'):
      load_state_dict(p)
  # A tensor carrying Python attributes is rebuilt by a call mimjax refuses.
  t = torch.randn(3)
  t.foo = 'bar'
  torch.save({'sub': t}, p)
  with pytest.raises(ValueError, match='_rebuild_from_type_v2.*refused'):
    load_state_dict(p)
