"""Read PyTorch checkpoints into numpy without importing torch.

`load_state_dict(path)` reads

* files written by `torch.save` (the zip format of torch >= 1.6, and the
  older non-zip "legacy" pickle stream format), e.g. the official MAE releases
  (`mae_pretrain_vit_base.pth` = `{'model': state_dict}`; training checkpoints
  add 'optimizer', 'epoch', 'scaler', 'args'), timm / HF `pytorch_model.bin`;
* `.safetensors` files (parsed directly; the format is a JSON header plus raw
  little-endian buffers, so neither torch nor the safetensors package is
  needed, and BF16 works);
* `.npz` archives.

The format is told by the file's first bytes, not its name.

Safety: torch files are unpickled by a restricted `pickle.Unpickler` whose
`find_class` never imports anything. It resolves a short allow-list (tensor
rebuild functions, storage types, dtypes, `collections.OrderedDict`, a few
inert builtins) to local stand-ins, and every other global (`argparse.Namespace`,
`os.system`, `builtins.eval`, ...) to an inert `OpaqueObject` subclass that only
records its constructor arguments. Tensor geometry (offset, size, stride) is
bounds-checked against its storage before any `as_strided` view is taken.

bfloat16 tensors come back as float32 (exactly: the bf16 bits become the high
half of the float32 bits). Other dtypes keep their numpy equivalent.
"""

from __future__ import annotations

import builtins
import collections
import json
import math
import mmap
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ['load_state_dict', 'save_npz_state_dict', 'OpaqueObject']

# Keys under which training checkpoints keep the model weights, most likely
# first ('model': official MAE / DeiT / timm train scripts).
STATE_DICT_KEYS = ('model', 'state_dict', 'model_state', 'module')

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _Error(Exception):
  """Internal: a problem with the file's contents (becomes a ValueError)."""


# ----------------------------------------------------------------------------
# dtypes and storage types


class _DType:
  """Stands for a `torch.dtype` (e.g. `torch.float16`)."""

  def __init__(self, name: str, np_dtype: str | None, bf16: bool = False):
    self.name = name
    self.np_dtype = None if np_dtype is None else np.dtype(np_dtype)
    self.bf16 = bf16

  @property
  def itemsize(self) -> int:
    if self.np_dtype is None:
      raise _Error(f'unsupported tensor dtype torch.{self.name}')
    return self.np_dtype.itemsize

  def __repr__(self):
    return f'torch.{self.name}'


_DTYPES: dict[str, _DType] = {}
for _names, _np, _bf in [
    (('float32', 'float'), '<f4', False),
    (('float64', 'double'), '<f8', False),
    (('float16', 'half'), '<f2', False),
    (('bfloat16',), '<u2', True),
    (('int64', 'long'), '<i8', False),
    (('int32', 'int'), '<i4', False),
    (('int16', 'short'), '<i2', False),
    (('int8',), 'i1', False),
    (('uint8',), 'u1', False),
    (('uint16',), '<u2', False),
    (('uint32',), '<u4', False),
    (('uint64',), '<u8', False),
    (('bool',), '?', False),
    (('complex64', 'cfloat'), '<c8', False),
    (('complex128', 'cdouble'), '<c16', False),
]:
  _dt = _DType(_names[0], _np, _bf)
  for _n in _names:
    _DTYPES[_n] = _dt
for _n in ('float8_e5m2', 'float8_e4m3fn', 'float8_e5m2fnuz', 'float8_e4m3fnuz',
           'float8_e8m0fnu', 'complex32', 'qint8', 'quint8', 'qint32',
           'quint4x2', 'quint2x4'):
  _DTYPES[_n] = _DType(_n, None)


class _StorageType:
  """Stands for `torch.FloatStorage` & co. (and `torch.UntypedStorage`)."""

  def __init__(self, name: str, dtype: _DType):
    self.name = name
    self.dtype = dtype

  def __repr__(self):
    return f'torch.{self.name}'


_STORAGE_TYPES: dict[str, _StorageType] = {
    name: _StorageType(name, _DTYPES[dt]) for name, dt in [
        ('FloatStorage', 'float32'),
        ('DoubleStorage', 'float64'),
        ('HalfStorage', 'float16'),
        ('BFloat16Storage', 'bfloat16'),
        ('LongStorage', 'int64'),
        ('IntStorage', 'int32'),
        ('ShortStorage', 'int16'),
        ('CharStorage', 'int8'),
        ('ByteStorage', 'uint8'),
        ('BoolStorage', 'bool'),
        ('ComplexFloatStorage', 'complex64'),
        ('ComplexDoubleStorage', 'complex128'),
        ('QInt8Storage', 'qint8'),
        ('QUInt8Storage', 'quint8'),
        ('QInt32Storage', 'qint32'),
        ('QUInt4x2Storage', 'quint4x2'),
        ('QUInt2x4Storage', 'quint2x4'),
        ('UntypedStorage', 'uint8'),
    ]
}


# ----------------------------------------------------------------------------
# storages and lazy tensors


class _Storage:
  """A storage's raw bytes, read on first use.

  `reader()` returns the bytes of the root storage; a legacy-format storage
  view (`base`) covers `numel` elements from element `elem_offset` of it.
  """

  def __init__(self, dtype: _DType, numel: int, reader: Callable[[], bytes]
               | None, big_endian: bool = False, base: '_Storage | None' = None,
               elem_offset: int = 0):
    self.dtype = dtype
    self.numel = numel
    self.reader = reader
    self.big_endian = big_endian
    self.base = base
    self.elem_offset = elem_offset
    self._buf: bytes | None = None

  def raw(self) -> memoryview:
    """The bytes of this storage (a view into the root's bytes)."""
    if self.base is not None:
      root = self.base.raw()
      start = self.elem_offset * self.dtype.itemsize
      stop = start + self.numel * self.dtype.itemsize
      if self.elem_offset < 0 or stop > len(root):
        raise _Error('storage view out of range of its root storage')
      return root[start:stop]
    if self._buf is None:
      if self.reader is None:
        raise _Error('storage data missing')
      self._buf = self.reader()
    return memoryview(self._buf)

  def elements(self, dtype: _DType) -> np.ndarray:
    """The storage as a 1-D array of `dtype` (bf16 as raw uint16)."""
    npd = dtype.np_dtype
    if npd is None:
      raise _Error(f'unsupported tensor dtype torch.{dtype.name}')
    if self.big_endian and npd.itemsize > 1:
      npd = npd.newbyteorder('>')
    raw = self.raw()
    if self.dtype is dtype:
      need = self.numel * npd.itemsize
      if len(raw) < need:
        raise _Error(f'storage holds {len(raw)} bytes, expected {need} '
                     '(truncated file?)')
      n = self.numel
    else:  # an untyped (byte) storage read as another dtype (_rebuild_tensor_v3)
      n = len(raw) // npd.itemsize
    return np.frombuffer(raw, dtype=npd, count=n)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class _LazyTensor:
  """A tensor whose data is read from its storage on `materialize()`."""

  def __init__(self, storage, offset, size, stride, dtype: _DType | None = None):
    self.storage = storage
    self.offset = offset
    self.size = size
    self.stride = stride
    self.dtype = dtype if dtype is not None else getattr(storage, 'dtype', None)

  def materialize(self) -> np.ndarray:
    storage, offset, size, stride = (self.storage, self.offset, self.size,
                                     self.stride)
    if not isinstance(storage, _Storage) or not isinstance(self.dtype, _DType):
      raise _Error('tensor without a readable storage')
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) and _is_int(offset) and offset >= 0
            and all(_is_int(s) and s >= 0 for s in size)
            and all(_is_int(s) and s >= 0 for s in stride)):
      raise _Error(f'bad tensor geometry: offset={offset!r} size={size!r} '
                   f'stride={stride!r}')
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    flat = storage.elements(self.dtype)
    if math.prod(size) == 0:
      out = np.empty(size, dtype=flat.dtype)
    else:
      last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
      if last >= flat.size:
        raise _Error(f'tensor of size {size}, stride {stride}, offset {offset} '
                     f'reaches past its storage of {flat.size} elements')
      view = np.lib.stride_tricks.as_strided(
          flat[int(offset):], shape=size,
          strides=tuple(s * flat.itemsize for s in stride), writeable=False)
      out = np.array(view, copy=True, order='C')
    out = out.astype(out.dtype.newbyteorder('='), copy=False)
    if self.dtype.bf16:
      out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


# ----------------------------------------------------------------------------
# allow-listed callables and inert placeholders


class OpaqueObject:
  """An inert stand-in for a global the checkpoint names but we do not allow
  (e.g. `argparse.Namespace`). It records constructor args and pickled state
  and never runs any code of the named class."""

  _pickle_global = ('', '')

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    object.__setattr__(obj, '_args', args)
    object.__setattr__(obj, '_kwargs', kwargs)
    object.__setattr__(obj, '_state', None)
    object.__setattr__(obj, '_items', [])
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    object.__setattr__(self, '_state', state)

  def __setitem__(self, key, value):  # SETITEMS on a dict subclass
    self._items.append((key, value))

  def append(self, value):  # APPENDS on a list subclass
    self._items.append(value)

  def extend(self, values):
    self._items.extend(values)

  def __call__(self, *args, **kwargs):  # REDUCE on an instance
    return OpaqueObject(*args, **kwargs)

  def __getattr__(self, name):
    state = object.__getattribute__(self, '_state')
    if isinstance(state, dict) and name in state:
      return state[name]
    raise AttributeError(name)

  def __repr__(self):
    mod, name = self._pickle_global
    return f'<opaque {mod}.{name}>'


_OPAQUE_CLASSES: dict[tuple[str, str], type] = {}


def _opaque_class(module: str, name: str) -> type:
  key = (str(module), str(name))
  cls = _OPAQUE_CLASSES.get(key)
  if cls is None:
    cls = type('Opaque_' + ''.join(c if c.isalnum() else '_' for c in key[1]),
               (OpaqueObject,), {'_pickle_global': key})
    _OPAQUE_CLASSES[key] = cls
  return cls


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  if not isinstance(storage, _Storage):
    return OpaqueObject(storage, storage_offset, size, stride)
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  if not isinstance(storage, _Storage) or not isinstance(dtype, _DType):
    return OpaqueObject(storage, storage_offset, size, stride)
  return _LazyTensor(storage, storage_offset, size, stride, dtype=dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return data


def _rebuild_from_type(func, new_type, args, state=None):
  # `func` came from find_class, i.e. it is one of ours or an OpaqueObject class.
  if not (func in _SAFE_FUNCS or (isinstance(func, type)
                                  and issubclass(func, OpaqueObject))):
    return OpaqueObject(func, new_type, args, state)
  return func(*args)


def _safe_codecs_encode(obj, encoding='utf-8', errors='strict'):
  # Protocol-2 pickles store `bytes` as `_codecs.encode(str, 'latin1')`.
  if isinstance(obj, str) and str(encoding).lower().replace('_', '-') in (
      'latin1', 'latin-1', 'iso-8859-1'):
    return obj.encode('latin-1')
  return OpaqueObject(obj, encoding, errors)


def _safe_reconstructor(cls, base, state=None):
  return OpaqueObject(cls, base, state)


_SAFE_FUNCS = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3,
               _rebuild_parameter, _rebuild_parameter_with_state}

_ALLOWED: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch', 'Size'): tuple,
    ('_codecs', 'encode'): _safe_codecs_encode,
    ('copy_reg', '_reconstructor'): _safe_reconstructor,
    ('copyreg', '_reconstructor'): _safe_reconstructor,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'):
        _rebuild_parameter_with_state,
}
for _mod in ('torch._tensor', 'torch.tensor'):
  for _fn in ('_rebuild_from_type', '_rebuild_from_type_v2'):
    _ALLOWED[(_mod, _fn)] = _rebuild_from_type
for _n in ('set', 'frozenset', 'complex', 'slice'):
  _ALLOWED[('builtins', _n)] = getattr(builtins, _n)
  _ALLOWED[('__builtin__', _n)] = _ALLOWED[('builtins', _n)]
for _n, _st in _STORAGE_TYPES.items():
  _ALLOWED[('torch', _n)] = _st
  _ALLOWED[('torch.cuda', _n)] = _st  # old GPU checkpoints
_ALLOWED[('torch.storage', 'UntypedStorage')] = _STORAGE_TYPES['UntypedStorage']
for _n, _dt in _DTYPES.items():
  _ALLOWED[('torch', _n)] = _dt


class _TorchUnpickler(pickle.Unpickler):
  """Unpickler that only builds allow-listed objects (see module doc)."""

  def __init__(self, file, load_storage: Callable[[tuple], Any] | None = None):
    super().__init__(file, encoding='utf-8')
    self._load_storage = load_storage

  def find_class(self, module, name):
    found = _ALLOWED.get((module, name))
    if found is not None:
      return found
    return _opaque_class(module, name)

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise pickle.UnpicklingError('unexpected persistent id')
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f'bad persistent id {pid!r}')
    typename = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
    if typename == 'module':  # legacy: a pickled nn.Module's source
      return OpaqueObject(*pid[1:])
    if typename != 'storage':
      raise pickle.UnpicklingError(f'unknown persistent id type {typename!r}')
    return self._load_storage(pid[1:])


def _storage_dtype(storage_type) -> _DType:
  if isinstance(storage_type, _StorageType):
    return storage_type.dtype
  if isinstance(storage_type, _DType):
    return storage_type
  raise pickle.UnpicklingError(f'unknown storage type {storage_type!r}')


def _key(k) -> str:
  return k.decode('ascii') if isinstance(k, bytes) else str(k)


# ----------------------------------------------------------------------------
# formats


def _load_torch_zip(zf: zipfile.ZipFile, names: list[str]):
  pkl = sorted((n for n in names if n.endswith('data.pkl')
                and n.count('/') <= 1), key=len)
  if not pkl:
    raise _Error('zip archive has no data.pkl: not a torch.save file')
  prefix = pkl[0][:-len('data.pkl')]
  name_set = set(names)
  big_endian = False
  if prefix + 'byteorder' in name_set:
    order = zf.read(prefix + 'byteorder').strip()
    if order not in (b'little', b'big'):
      raise _Error(f'unknown byteorder record {order!r}')
    big_endian = order == b'big'
  storages: dict[str, _Storage] = {}

  def load_storage(data):
    if len(data) != 4:
      raise pickle.UnpicklingError(f'bad storage id {data!r}')
    storage_type, key, _location, numel = data
    key = _key(key)
    if key not in storages:
      dtype = _storage_dtype(storage_type)
      entry = f'{prefix}data/{key}'
      if entry not in name_set:
        raise _Error(f'missing storage record {entry!r}')
      if not _is_int(numel) or numel < 0:
        raise _Error(f'bad storage size {numel!r}')
      storages[key] = _Storage(dtype, int(numel), lambda e=entry: zf.read(e),
                               big_endian=big_endian)
    return storages[key]

  with zf.open(pkl[0]) as f:
    return _TorchUnpickler(f, load_storage).load()


def _plain_load(f):
  return _TorchUnpickler(f).load()


def _load_torch_legacy(f):
  """The non-zip format of torch < 1.6 (or `_use_new_zipfile_serialization=False`).

  Layout: pickle(magic), pickle(protocol), pickle(sys_info), pickle(obj),
  pickle(storage keys), then per key: int64 numel + raw little-endian data.
  """
  if _plain_load(f) != _LEGACY_MAGIC:
    raise _Error('not a torch.save file (bad magic number)')
  protocol = _plain_load(f)
  if protocol != _LEGACY_PROTOCOL:
    raise _Error(f'unsupported legacy protocol version {protocol!r}')
  _plain_load(f)  # sys_info
  storages: dict[str, _Storage] = {}

  def load_storage(data):
    if len(data) != 5:
      raise pickle.UnpicklingError(f'bad storage id {data!r}')
    storage_type, root_key, _location, numel, view_metadata = data
    root_key = _key(root_key)
    dtype = _storage_dtype(storage_type)
    if root_key not in storages:
      if not _is_int(numel) or numel < 0:
        raise _Error(f'bad storage size {numel!r}')
      storages[root_key] = _Storage(dtype, int(numel), None)
    root = storages[root_key]
    if view_metadata is None:
      return root
    view_key, offset, view_size = view_metadata
    view_key = _key(view_key)
    if view_key not in storages:
      if not (_is_int(offset) and _is_int(view_size)):
        raise _Error(f'bad storage view {view_metadata!r}')
      storages[view_key] = _Storage(dtype, int(view_size), None, base=root,
                                    elem_offset=int(offset))
    return storages[view_key]

  obj = _TorchUnpickler(f, load_storage).load()
  keys = _plain_load(f)
  if not isinstance(keys, list):
    raise _Error('bad storage key list')
  for key in keys:
    key = _key(key)
    head = f.read(8)
    if len(head) != 8:
      raise _Error('truncated file (storage data missing)')
    (numel,) = struct.unpack('<q', head)
    storage = storages.get(key)
    if storage is None:
      raise _Error(f'data for unknown storage {key!r}')
    nbytes = numel * storage.dtype.itemsize
    buf = f.read(nbytes)
    if numel < 0 or len(buf) != nbytes:
      raise _Error('truncated file (storage data short)')
    storage.reader = lambda b=buf: b
  return obj


def _load_safetensors(path) -> dict[str, np.ndarray]:
  dtypes = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'BF16': '<u2',
            'I64': '<i8', 'I32': '<i4', 'I16': '<i2', 'I8': 'i1', 'U8': 'u1',
            'U16': '<u2', 'U32': '<u4', 'U64': '<u8', 'BOOL': '?'}
  with open(path, 'rb') as f:
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      (n,) = struct.unpack('<Q', mm[:8])
      if n > len(mm) - 8:
        raise _Error('safetensors header runs past the end of the file')
      header = json.loads(bytes(mm[8:8 + n]))
      base = 8 + n
      out = {}
      for name, info in header.items():
        if name == '__metadata__':
          continue
        dt = info['dtype']
        if dt not in dtypes:
          raise _Error(f'tensor {name!r}: unsupported safetensors dtype {dt}')
        npd = np.dtype(dtypes[dt])
        shape = tuple(int(s) for s in info['shape'])
        begin, end = (int(x) for x in info['data_offsets'])
        count = math.prod(shape)
        if end - begin != count * npd.itemsize or base + end > len(mm) \
            or begin < 0:
          raise _Error(f'tensor {name!r}: bad data offsets (truncated file?)')
        arr = np.frombuffer(mm, dtype=npd, count=count,
                            offset=base + begin).reshape(shape)
        arr = arr.astype(npd.newbyteorder('='), copy=True)
        if dt == 'BF16':
          arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
        del arr
      return out


def _select_state_dict(obj) -> dict[str, _LazyTensor]:
  def tensors(d):
    return {k: v for k, v in d.items()
            if isinstance(k, str) and isinstance(v, _LazyTensor)}

  if not isinstance(obj, Mapping):
    raise _Error(f'top-level object is {type(obj).__name__}, not a dict')
  for key in STATE_DICT_KEYS:
    inner = obj.get(key)
    if isinstance(inner, Mapping) and tensors(inner):
      return tensors(inner)
  found = tensors(obj)
  if not found:
    raise _Error('no tensors found (expected a state dict, or a dict holding '
                 f'one under {"/".join(STATE_DICT_KEYS)})')
  return found


def _load(path) -> dict[str, np.ndarray]:
  with open(path, 'rb') as f:
    head = f.read(16)
  if not head:
    raise _Error('empty file')
  if head.startswith(b'PK\x03\x04') or head.startswith(b'PK\x05\x06'):
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
      if any(n.endswith('data.pkl') for n in names):
        lazy = _select_state_dict(_load_torch_zip(zf, names))
        return {k: v.materialize() for k, v in lazy.items()}
      if names and all(n.endswith('.npy') for n in names):
        with np.load(path, allow_pickle=False) as npz:
          return {k: npz[k] for k in npz.files}
      raise _Error('zip archive is neither a torch.save file nor an .npz')
  if len(head) >= 9 and head[8:9] == b'{':
    return _load_safetensors(path)
  if head[:1] == b'\x80':
    with open(path, 'rb') as f:
      lazy = _select_state_dict(_load_torch_legacy(f))
      return {k: v.materialize() for k, v in lazy.items()}
  if tarfile.is_tarfile(path):
    raise _Error('legacy tar format of torch < 0.4 is not supported; re-save '
                 'it with torch >= 1.6 (torch.save(torch.load(f), f2))')
  raise _Error('unrecognised format (expected a torch.save zip, legacy torch '
               'pickle, .safetensors or .npz)')


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch / safetensors / npz checkpoint into `{name: np.ndarray}`.

  For `torch.save` files whose top level is a dict holding a state dict under
  'model' (official MAE), 'state_dict', 'model_state' or 'module', that inner
  dict is returned; otherwise the top-level dict. Only tensor entries are
  kept. bfloat16 becomes float32. Raises FileNotFoundError for a missing file
  and ValueError (one line naming the path) for an unreadable one.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  if os.path.isdir(path):
    raise ValueError(f'{path}: is a directory, not a checkpoint file')
  try:
    return _load(path)
  except _Error as e:
    msg = str(e)
  except (MemoryError, KeyboardInterrupt):
    raise
  except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
    msg = f'{type(e).__name__}: {e}'
  msg = ' '.join(msg.split())
  raise ValueError(f'{path}: not a readable checkpoint: {msg}') from None


def save_npz_state_dict(path: str | os.PathLike,
                        state_dict: Mapping[str, Any]) -> None:
  """Writes `{name: array}` as an uncompressed .npz (readable by `load_state_dict`)."""
  arrays = {str(k): np.asarray(v) for k, v in state_dict.items()}
  with open(os.fspath(path), 'wb') as f:
    np.savez(f, **arrays)
