"""Read PyTorch checkpoints into numpy without importing torch.

`load_state_dict(path)` reads, telling the format by its first bytes,
`torch.save` zip files (torch >= 1.6: the official MAE releases, whose
training checkpoints add 'optimizer', 'epoch', 'scaler', 'args'; timm and HF
`pytorch_model.bin`), `.safetensors` (through the `safetensors` package) and
`.npz`. bfloat16 becomes float32, exactly.

Safety: the pickle inside a torch file is read by an unpickler whose
`find_class` never imports anything. Tensor rebuild functions, storage types,
dtypes and a few plain containers resolve to local stand-ins; any other name
to an inert placeholder class. An object of one (the `argparse.Namespace` of a
training checkpoint) keeps its pickled state and runs no code, but a pickle
that *calls* a name it gives (`os.system(...)`, `builtins.eval(...)`) is
refused, and tensor geometry is bounds-checked before any view is taken.
"""

from __future__ import annotations

import builtins
import collections
import math
import os
import pickle
import zipfile
from typing import Any, Mapping

import ml_dtypes  # jax's own dependency: numpy's bfloat16 for safetensors
import numpy as np

from mimjax import errors

__all__ = ['load_state_dict', 'save_npz_state_dict']

# Keys under which training checkpoints keep the model weights, most likely
# first ('model': official MAE / DeiT / timm train scripts).
STATE_DICT_KEYS = ('model', 'state_dict', 'model_state', 'module')


class _Error(Exception):
  """A problem with the file's contents (becomes a ValueError)."""


class _DType(str):
  """A torch dtype, by name."""


# torch dtype: its numpy dtype, other torch names, legacy storage classes.
_TYPES = {
    'float32': ('<f4', 'float', 'Float'), 'float64': ('<f8', 'double', 'Double'),
    'float16': ('<f2', 'half', 'Half'), 'int64': ('<i8', 'long', 'Long'),
    'bfloat16': (ml_dtypes.bfloat16, '', 'BFloat16'),
    'int32': ('<i4', 'int', 'Int'), 'int16': ('<i2', 'short', 'Short'),
    'int8': ('i1', '', 'Char'), 'uint8': ('u1', '', 'Byte Untyped'),
    'uint16': ('<u2', '', ''), 'uint32': ('<u4', '', ''),
    'uint64': ('<u8', '', ''), 'bool': ('?', '', 'Bool'),
    'complex64': ('<c8', 'cfloat', 'ComplexFloat'),
    'complex128': ('<c16', 'cdouble', 'ComplexDouble'),
}


class _Storage:
  """A storage: its dtype, and a reader of its bytes."""

  def __init__(self, dtype: _DType, read):
    self.dtype, self.read = dtype, read


def _whole(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0


class _Tensor:
  """A tensor whose data is read from its storage by `numpy()`."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.geometry = storage, offset, size, stride
    self.dtype = dtype or getattr(storage, 'dtype', None)

  def numpy(self) -> np.ndarray:
    storage, offset, size, stride = self.geometry
    if self.dtype not in _TYPES or not isinstance(storage, _Storage):
      raise _Error(f'unsupported tensor dtype or storage: {self.dtype}')
    if not (isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and _whole(offset)
            and all(map(_whole, size + stride))):
      raise _Error(f'bad tensor geometry: offset={offset!r} size={size!r} '
                   f'stride={stride!r}')
    dtype = np.dtype(_TYPES[self.dtype][0])
    raw = storage.read()
    flat = np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize)
    if math.prod(size) == 0:
      out = np.empty(size, dtype)
    elif offset + sum((n - 1) * s for n, s in zip(size, stride)) >= flat.size:
      raise _Error(f'tensor of size {size}, stride {stride}, offset {offset} '
                   f'reaches past its storage of {flat.size} elements '
                   '(truncated file?)')
    else:
      out = np.array(np.lib.stride_tricks.as_strided(
          flat[offset:], size, [s * dtype.itemsize for s in stride],
          writeable=False), dtype.newbyteorder('='), order='C')
    return out.astype(np.float32) if self.dtype == 'bfloat16' else out


# --------------------------------------------------------- what may be built


class _Refused(type):
  """Metaclass of the placeholders: calling one is refused."""

  def __call__(cls, *args, **kwargs):
    raise _Error(f'the pickle calls {cls.name}, which mimjax does not run '
                 '(not a tensor, a container or plain data): refused')


class _Inert(metaclass=_Refused):
  """An object of a class the file names: its pickled `state`, no code."""

  name, state = 'data', None

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, *unused):  # the items of a dict or list subclass:
    pass  # dropped

  append = extend = __setitem__


def _placeholder(name: str) -> type:
  return _Refused('Inert', (_Inert,), {'name': name})


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
  return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, grad, hooks, dtype,
                       *unused):
  return _Tensor(storage, offset, size, stride,
                 dtype if isinstance(dtype, _DType) else getattr(
                     dtype, 'name', repr(dtype)))


_ALLOWED: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch', 'Size'): tuple,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): lambda data, *unused: data,
    ('torch._utils', '_rebuild_parameter_with_state'):
        lambda data, *unused: data,
    **{('builtins', n): getattr(builtins, n)
       for n in ('set', 'frozenset', 'complex', 'slice')},
    # Plain data that is no tensor (numpy scalars and arrays, devices, bytes,
    # protocol 0's objects): kept as an inert object.
    **{k: lambda *args: _Inert.__new__(_Inert) for k in (
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray',
        'scalar'), ('numpy.core.multiarray', '_reconstruct'),
        ('numpy._core.multiarray', '_reconstruct'), ('numpy', 'dtype'),
        ('torch', 'device'), ('_codecs', 'encode'),
        ('copyreg', '_reconstructor'))},
    ('torch.storage', 'UntypedStorage'): _DType('uint8'),
    **{('torch', n): _DType(t) for t, (_, names, storages) in _TYPES.items()
       for n in (t, *names.split())},
    **{('torch', f'{n}Storage'): _DType(t)
       for t, (_, _, storages) in _TYPES.items() for n in storages.split()},
}


class _Unpickler(pickle.Unpickler):
  """Builds only what `_ALLOWED` names (see the module's docstring)."""

  def __init__(self, file, load_storage=None):
    super().__init__(file, encoding='utf-8')
    self.load_storage = load_storage

  def find_class(self, module, name):
    return _ALLOWED.get((module, name)) or _placeholder(f'{module}.{name}')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and self.load_storage):
      raise _Error(f'unexpected persistent id {pid!r}')
    return self.load_storage(*pid[1:])


# ------------------------------------------------------------------ formats


def _load_torch_zip(zf: zipfile.ZipFile, names: list[str]):
  pkl = sorted((n for n in names if n.endswith('data.pkl')
                and n.count('/') <= 1), key=len)
  if not pkl:
    raise _Error('zip archive has no data.pkl: not a torch.save file')
  prefix = pkl[0][:-len('data.pkl')]
  if prefix + 'byteorder' in names and zf.read(
      prefix + 'byteorder').strip() != b'little':
    raise _Error('not a little-endian torch.save file (re-save it on a '
                 'little-endian machine)')
  storages: dict[str, _Storage] = {}

  def load_storage(dtype, key, location, numel):
    entry = f'{prefix}data/{key}'
    if not isinstance(dtype, _DType) or entry not in names:
      raise _Error(f'bad or missing storage record {entry!r}')
    return storages.setdefault(entry, _Storage(dtype, lambda: zf.read(entry)))

  with zf.open(pkl[0]) as f:
    return _Unpickler(f, load_storage).load()


def _tensors(obj) -> dict[str, np.ndarray]:
  """The state dict: under one of STATE_DICT_KEYS, else the top level."""
  if not isinstance(obj, Mapping):
    raise _Error(f'top-level object is {type(obj).__name__}, not a dict')
  for d in [obj[k] for k in STATE_DICT_KEYS if k in obj] + [obj]:
    found = {k: v for k, v in d.items() if isinstance(k, str)
             and isinstance(v, _Tensor)} if isinstance(d, Mapping) else {}
    if found:
      return {k: v.numpy() for k, v in found.items()}
  raise _Error('no tensors found (expected a state dict, or a dict holding '
               f'one under {"/".join(STATE_DICT_KEYS)})')


def _load(path) -> dict[str, np.ndarray]:
  with open(path, 'rb') as f:
    head = f.read(16)
  if head.startswith((b'PK\x03\x04', b'PK\x05\x06')):
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
      if any(n.endswith('data.pkl') for n in names):
        return _tensors(_load_torch_zip(zf, names))
    if names and all(n.endswith('.npy') for n in names):
      with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
    raise _Error('zip archive is neither a torch.save file nor an .npz')
  if head[8:9] == b'{':
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v
            for k, v in safetensors.numpy.load_file(path).items()}
  if head[:1] == b'\x80':
    raise _Error('a pickle stream, the format of torch < 1.6: re-save it with '
                 'torch >= 1.6 (torch.save(torch.load(f), f2))')
  raise _Error('empty file' if not head else 'unrecognised format (expected '
               'a torch.save zip, .safetensors or .npz)')


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torch / safetensors / npz checkpoint as `{name: np.ndarray}`: the state
  dict under 'model' (official MAE), 'state_dict', 'model_state' or 'module',
  else the top-level dict; its tensors only. FileNotFoundError for a missing
  file, ValueError (one line naming the path) for an unreadable or refused one.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise errors.Missing(f'{path}: no such checkpoint file')
  if os.path.isdir(path):
    raise errors.Invalid(f'{path}: is a directory, not a checkpoint file')
  try:
    return _load(path)
  except _Error as e:
    msg = str(e)
  except (MemoryError, KeyboardInterrupt):
    raise
  except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
    msg = f'{type(e).__name__}: {e}'
  msg = ' '.join(msg.split())
  raise errors.Invalid(f'{path}: not a readable checkpoint: {msg}') from None


def save_npz_state_dict(path: str | os.PathLike,
                        state_dict: Mapping[str, Any]) -> None:
  """Writes `{name: array}` as an uncompressed .npz (readable by `load_state_dict`)."""
  with open(os.fspath(path), 'wb') as f:
    np.savez(f, **{str(k): np.asarray(v) for k, v in state_dict.items()})
