"""Orbax checkpoints of parameter trees.

Why this module is long: saving, restoring and verifying are one contract
(nothing restored unverified, nothing deleted that mimjax did not write).
"""

from __future__ import annotations

from concurrent import futures
import hashlib
import json
import os
import re
import tempfile
import time

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from mimjax import errors


def resolve(path) -> epath.Path:
  """A local path made absolute, or a cloud path (gs://...) as it is."""
  path = str(path)
  return epath.Path(path if '://' in path else os.path.abspath(path))


def save_params(path: str, params, overwrite: bool = False) -> None:
  """Writes a parameter tree as an orbax checkpoint directory at `path`.

  An existing non-empty `path` is refused unless `overwrite`, and even then
  only a previous mimjax checkpoint is replaced: nothing deletes what
  mimjax did not write.
  """
  path = resolve(path)
  if path.exists():
    if not path.is_dir():
      raise errors.Invalid(f'{path} exists and is not a directory')
    names = sorted(p.name for p in path.iterdir())
    if names and not overwrite:
      raise errors.Invalid(f'{path} exists and is not empty ({len(names)} '
                           f'entries: {", ".join(names[:3])}); choose another '
                           'directory, or --overwrite to replace a previous '
                           'mimjax checkpoint there')
    foreign = foreign_entries(path)
    if foreign:
      raise errors.Invalid(f'{path} holds {", ".join(foreign[:3])}'
                           f'{f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""}'
                           ', which mimjax did not write; --overwrite '
                           'replaces only a previous mimjax checkpoint: '
                           'choose another directory')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, jax.tree.map(np.asarray, params), force=True)
  if jax.process_index() == 0:
    write_checksums(path)


def load_params(path: str, like=None):
  """Reads a parameter tree saved by `save_params` (optionally shaped `like`)."""
  path = resolve(path)
  if not path.is_dir():
    raise errors.Missing(f'no orbax checkpoint directory at {path}')
  intact, why = verify(path)
  if intact is False:
    raise errors.Invalid(f'checkpoint {path} is damaged: {why}')
  with ocp.StandardCheckpointer() as checkpointer:
    if like is None:
      return checkpointer.restore(path)
    like = nn.meta.unbox(like)
    stored = checkpointer.metadata(path).item_metadata.tree
    check_compatible(like, stored, f'checkpoint {path}')
    return checkpointer.restore(path, like)


def check_compatible(expected, loaded, what: str = 'checkpoint'):
  """Raises one line naming the first parameter whose presence or shape differs."""
  flat_e = flatten(nn.meta.unbox(expected))
  flat_l = flatten(nn.meta.unbox(loaded))
  for path, leaf in flat_e.items():
    if path not in flat_l:
      raise errors.Invalid(f'{what} lacks parameter {path} {tuple(leaf.shape)}')
    if tuple(flat_l[path].shape) != tuple(leaf.shape):
      raise errors.Invalid(
          f'{what} parameter {path} has shape {tuple(flat_l[path].shape)}, '
          f'the model expects {tuple(leaf.shape)}')
  extra = sorted(set(flat_l) - set(flat_e))
  if extra:
    raise errors.Invalid(f'{what} has parameter {extra[0]} the model does not '
                         f'have')


def flatten(tree, prefix='') -> dict:
  """{'a/b/c': leaf} of a nested dict."""
  if not hasattr(tree, 'items'):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f'{prefix}/{k}' if prefix else k))
  return out


# ------------------------------------------------------------- integrity

CHECKSUMS = 'mimjax_checksums.json'  # in each step / params directory
FINGERPRINT = 'fingerprint.json'  # in a stage's checkpoints/ (guard_stage)
# What orbax writes at the top of a params checkpoint (save_params) before
# mimjax wrote checksums next to it.
_ORBAX_NAMES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding', 'd',
                'commit_success.txt', 'manifest.ocdbt', 'array_metadatas')
# CHECKSUMS, or with several processes one part each: mimjax_checksums.<i>.json
_PART = re.compile(r'mimjax_checksums(\.\d+)?\.json')
_HASH_THREADS = min(4, os.cpu_count() or 1)


def _files(directory: epath.Path, prefix: str = ''):
  """(relative path, path) of every file under `directory`, sorted."""
  for p in sorted(directory.iterdir(), key=lambda p: p.name):
    rel = prefix + p.name
    if p.is_dir():
      yield from _files(p, rel + '/')
    elif not rel.startswith('mimjax_checksums.'):
      yield rel, p


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _hash_files(directory: epath.Path, rels) -> list:
  """The SHA-256 of each file (or the OSError reading it raised), a few
  files at a time: hashlib releases the GIL."""
  def one(rel):
    try:
      return _sha256(directory / rel)
    except OSError as e:
      return e
  with futures.ThreadPoolExecutor(_HASH_THREADS) as pool:
    return list(pool.map(one, rels))


def share(sizes: dict[str, int], process_count: int,
          process_index: int) -> list[str]:
  """The files process `process_index` hashes, sorted: biggest first, each
  file goes to the process with the fewest bytes (then files) so far, so
  each hashes about 1/process_count of the bytes. Every process computes
  the same split from the same sizes."""
  loads = [(0, 0)] * process_count
  mine = []
  for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
    p = loads.index(min(loads))
    loads[p] = (loads[p][0] + sizes[rel], loads[p][1] + 1)
    if p == process_index:
      mine.append(rel)
  return sorted(mine)


def write_checksums(directory, process_index: int = 0,
                    process_count: int = 1) -> None:
  """Seals a finished checkpoint directory: the SHA-256 of every file in
  CHECKSUMS, or with process_count > 1 of this process's `share` of them in
  its own part, mimjax_checksums.<process_index>.json."""
  directory = resolve(directory)
  sizes = {rel: p.stat().length for rel, p in _files(directory)}
  mine = share(sizes, process_count, process_index)
  digests = _hash_files(directory, mine)
  for failed in digests:
    if isinstance(failed, OSError):
      raise failed
  manifest = {'sha256': dict(zip(mine, digests)),
              'bytes': {rel: sizes[rel] for rel in mine}}
  name = CHECKSUMS
  if process_count > 1:
    manifest.update(part=process_index, parts=process_count)
    name = f'mimjax_checksums.{process_index}.json'
  tmp = directory / (name + '.tmp')
  tmp.write_text(json.dumps(manifest, indent=0))
  tmp.replace(directory / name)


def _manifest(directory: epath.Path) -> tuple[dict, list[str], bool]:
  """({file: (sha256, bytes)}, the checksum files, whether all parts are
  there) of a directory; ValueError names a checksum file unreadable."""
  names = sorted(p.name for p in directory.iterdir() if _PART.fullmatch(p.name))
  files, parts, count = {}, set(), 1
  for name in names:
    try:
      part = json.loads((directory / name).read_text())
      sizes = part.get('bytes', {})  # none in an older mimjax's
      files.update({rel: (digest, sizes.get(rel, 0))
                    for rel, digest in part['sha256'].items()})
      parts.add(part.get('part', 0))
      count = max(count, part.get('parts', 1))
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
      raise errors.Invalid(f'{name} is unreadable') from None
  return files, names, parts == set(range(count))


def verify(directory, process_index: int = 0,
           process_count: int = 1) -> tuple[bool | None, str]:
  """(True, '') when every file matches the checksums written with it;
  (False, why) when one is missing, unreadable or changed; (None, why) for
  a directory never sealed (written before its checksums, or by an older
  mimjax). With process_count > 1 only this process's `share` of the files
  is read."""
  directory = resolve(directory)
  if not directory.is_dir():
    return False, 'its directory is missing'
  try:
    files, names, complete = _manifest(directory)
  except ValueError as e:
    return False, str(e)
  if not names:
    return None, 'no checksums were written with it'
  if not complete:
    return None, 'not all processes wrote their checksums'
  mine = share({rel: size for rel, (_, size) in files.items()},
               process_count, process_index)
  for rel, actual in zip(mine, _hash_files(directory, mine)):
    if isinstance(actual, FileNotFoundError):
      return False, f'{rel} is missing'
    if isinstance(actual, OSError):
      return False, f'{rel} is unreadable ({actual.strerror or actual})'
    if actual != files[rel][0]:
      return False, f'{rel} does not match its checksum'
  return True, ''


def _agree(intact: bool | None, why: str) -> tuple[bool | None, str]:
  """The worst of all processes' verdicts (damaged, never sealed, intact)
  with its reason, the same on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  text = why.encode()[:254]
  mine = np.zeros(256, np.int32)
  mine[:2] = [{True: 0, None: 1, False: 2}[intact], len(text)]
  mine[2:2 + len(text)] = np.frombuffer(text, np.uint8)
  verdicts = np.asarray(multihost_utils.process_allgather(mine))
  worst = verdicts[verdicts[:, 0].argmax()]
  return ((True, None, False)[worst[0]],
          bytes(worst[2:2 + worst[1]].astype(np.uint8)).decode(
              errors='replace'))


def foreign_entries(directory) -> list[str]:
  """Top-level entries of a params directory that `save_params` did not
  write (all of them, when it is not a mimjax checkpoint)."""
  directory = resolve(directory)
  names = sorted(p.name for p in directory.iterdir())
  try:
    files, manifests, _ = _manifest(directory)
  except ValueError:  # nothing is known to be ours
    return names
  ours: set[str] = set()
  if manifests:
    ours = {rel.split('/')[0] for rel in files} | set(manifests)
  elif '_CHECKPOINT_METADATA' in names:  # written before checksums existed
    ours = {n for n in names
            if n in _ORBAX_NAMES or n.startswith('ocdbt.process_')}
  return [n for n in names if n not in ours]


def find_init(path: str, what: str = 'finetune.init') -> str:
  """The checkpoint `path` names: a .pth / .npz / .safetensors file, a run's
  `<stage>/checkpoints`, or an orbax directory from mimjax-convert. A stage
  directory or a run root (its pre-training) is accepted and its
  checkpoints found; anything else is one line naming what to give."""
  where = resolve(path)
  if where.is_file():
    return str(where)
  if not where.exists():
    raise errors.Missing(f'{what}={path}: no such file or directory')
  if not where.is_dir():
    raise errors.Invalid(f'{what}={path} is neither a file nor a directory')
  names = {p.name for p in where.iterdir()}
  if (any(n.isdigit() for n in names) or '_CHECKPOINT_METADATA' in names
      or '_METADATA' in names):
    return str(where)
  if 'checkpoints' in names:
    found = where / 'checkpoints'
    if not any(p.name.isdigit() for p in found.iterdir()):
      raise errors.Missing(f'{what}={path}: {found} holds no checkpoint '
                           'yet')
    if found != where:
      logging.info('%s=%s: using its checkpoints %s', what, path, found)
    return str(found)
  stages = sorted(n for n in names if (where / n / 'checkpoints').is_dir())
  if 'pretrain' in stages:
    return find_init(str(where / 'pretrain'), what)
  if stages:
    raise errors.Invalid(f'{what}={path} is a run directory without '
                         f'pre-training; name the checkpoints to use, e.g. '
                         f'{where / stages[0] / "checkpoints"}')
  raise errors.Invalid(f"{what}={path} holds no checkpoint: give a run's "
                       '<stage>/checkpoints directory, a directory written by '
                       'mimjax-convert, or a .pth file')


def latest_step(directory) -> int | None:
  """The newest step directory in a run's checkpoints dir (None: none)."""
  directory = resolve(directory)
  if not directory.is_dir():
    return None
  steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
  return max(steps) if steps else None


def init_identity(path: str | None) -> dict:
  """What a stage was initialised from: the path, and for a mimjax run its
  step and the digest of its own fingerprint (training/pipeline.guard_stage compares these)."""
  if not path:
    return {'init_from': 'random'}
  where = resolve(path)
  out = {'init_from': str(where)}
  if where.is_file():
    out['init_bytes'] = where.stat().length
    return out
  step = latest_step(where)
  if step is not None:
    out['init_step'] = step
    fingerprint = where / FINGERPRINT
    if fingerprint.exists():
      out['init_fingerprint'] = hashlib.sha256(
          fingerprint.read_bytes()).hexdigest()[:16]
  return out


class Checkpoints:
  """Train-state checkpoints of one run: keep the last N, optionally the best.

  Each step directory holds 'state' (the TrainState: params, optimizer,
  step, RNG) and 'meta' (JSON: the data position and anything else). Orbax
  writes to a temporary directory and renames it when complete, so a crash
  mid-save never replaces the last good checkpoint. Once a save has
  finished, a background thread seals it: each process writes the SHA-256
  of its `share` of the files (`write_checksums`), so `save` never hashes
  and no process hashes everything. `restore_latest` verifies them the same
  way, moves a damaged step aside to `<directory>_damaged/` and falls back
  to the newest step that verifies. `wait` and `close` wait for the seals.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               keep_best: bool = False):
    directory = resolve(directory)
    self.directory = directory
    self._keep = keep
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save))
    self.best = None
    if keep_best:
      self.best = ocp.CheckpointManager(
          directory / 'best', options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m['score'],
              best_mode='max', enable_async_checkpointing=False))
    self._sealer = futures.ThreadPoolExecutor(1, 'mimjax_seal')
    self._seals: list[tuple[epath.Path, futures.Future]] = []

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False):
    self._settle(self.manager, self._keep)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta))
    if self.manager.save(step, args=args, force=force):
      self._seal_later(self.manager, step)

  def save_best(self, step: int, state, score: float):
    if self.best is not None:
      self._settle(self.best, 1)
      if self.best.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state)), metrics={'score': score}):
        self._seal_later(self.best, step)

  def _seal_later(self, manager: ocp.CheckpointManager, step: int):
    path = manager.directory / str(step)
    self._seals.append((path, self._sealer.submit(self._seal, manager, path)))

  @staticmethod
  def _seal(manager: ocp.CheckpointManager, path: epath.Path):
    """On the sealing thread: once orbax has written `path`, this process's
    checksums of it."""
    manager.wait_until_finished()
    try:
      write_checksums(path, jax.process_index(), jax.process_count())
    except OSError:
      if path.exists():
        raise
      logging.info('checkpoint %s was deleted before it was sealed', path)

  def _settle(self, manager: ocp.CheckpointManager | None = None,
              keep: int = 0):
    """Raises what a finished seal raised; waits for the seals that may
    still be writing into a step `manager`'s next save deletes (all but its
    newest `keep` - 1), or without `manager`, for every seal."""
    spared = set()
    if manager is not None:
      steps = sorted(manager.all_steps())
      spared = {manager.directory / str(s)
                for s in steps[len(steps) - keep + 1:]}
    pending = []
    for path, seal in self._seals:
      due = manager is None or (path.parent == manager.directory and
                                path not in spared)
      if due or seal.done():
        seal.result()
      else:
        pending.append((path, seal))
    self._seals = pending

  def restore_latest(self, target):
    """(step, state, meta) of the newest checkpoint that verifies, onto the
    shardings of `target`; (None, None, None) when there is none. A damaged
    step on the way is moved aside, one line each; only when no step
    verifies is it an error."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      intact, why = self._verify(step)
      if intact is not False:
        try:
          state, meta = self.restore(step, target)
        except ValueError as e:
          if intact:  # the bytes are the ones written: not damage
            raise
          why = f'it does not restore ({str(e).split(": ", 1)[-1]})'
        else:
          if damaged:
            logging.warning('resuming from step %d, the newest checkpoint in '
                            '%s that verifies', step, self.directory)
          return step, state, meta
      damaged.append(f'{step} ({why})')
      self._set_aside(step, why)
    if damaged:
      raise errors.Invalid(
          f'no checkpoint in {self.directory} verifies: step '
          f'{", ".join(damaged)} moved to {self.aside}; run again to start '
          'this stage from scratch')
    return None, None, None

  def _verify(self, step: int) -> tuple[bool | None, str]:
    """`verify` of a step, each process reading its share of the files;
    every process gets the same verdict."""
    count = jax.process_count()
    verdict = verify(self.directory / str(step), jax.process_index(), count)
    return _agree(*verdict) if count > 1 else verdict

  @property
  def aside(self) -> epath.Path:
    return self.directory.parent / (self.directory.name + '_damaged')

  def _set_aside(self, step: int, why: str):
    """Moves a damaged step out of orbax's sight (never deletes it)."""
    dest = self.aside / str(step)
    n = 1
    while dest.exists():
      dest, n = self.aside / f'{step}.{n}', n + 1
    if jax.process_index() == 0:
      self.aside.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'mimjax_set_aside_{step}')
    self.manager.reload()
    logging.warning('checkpoint step %d in %s is damaged: %s; moved to %s',
                    step, self.directory, why, dest)

  def last_good(self) -> str:
    """The newest checkpoint that verifies, in words (for error messages)."""
    self.wait()
    for step in sorted(self.manager.all_steps(), reverse=True):
      intact, _ = verify(self.directory / str(step))
      if intact is not False:
        return (f'step {step} in {self.directory} '
                f'({"verified" if intact else "not checksummed"})')
    return f'no checkpoint yet in {self.directory}'

  def restore(self, step: int, target):
    """Restores (state, meta) at `step` onto the shardings of `target`."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise errors.Invalid(f'cannot restore checkpoint step {step} from '
                           f'{self.directory}: {type(e).__name__}: '
                           f'{str(e).splitlines()[0] if str(e) else ""}') from e
    return restored.state, restored.meta

  def wait(self):
    self.manager.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()
    self._settle()

  def close(self):
    self.wait()
    self._sealer.shutdown()
    self.manager.close()
    if self.best is not None:
      self.best.close()


def load_state_params(directory: str, step: int | None = None):
  """The parameters of a train-state checkpoint (latest step by default).

  They are restored onto this host whatever mesh wrote them (pre-training on
  a pod, fine-tuning elsewhere).
  """
  directory = resolve(directory)
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
  if step is None:
    raise errors.Missing(f'no checkpoint in {directory}')
  intact, why = verify(directory / str(step))
  if intact is False:
    raise errors.Invalid(f'checkpoint step {step} in {directory} is damaged: '
                         f'{why}')
  path = directory / str(step) / 'state'
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # The item's own tree metadata, from its handler: a Checkpointer's
  # `metadata` would also look for the step's _CHECKPOINT_METADATA inside
  # the item directory (it is one level up) and warn that it is missing.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    stored = handler.metadata(path).tree
  finally:
    handler.close()
  with ocp.PyTreeCheckpointer() as checkpointer:
    target = {'params': jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        dict(stored)['params'])}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=jax.tree.map(
            lambda _: ocp.ArrayRestoreArgs(sharding=device), target)))
  return jax.tree.map(np.asarray, restored['params'])


def measure_hash_rate(path: str = tempfile.gettempdir(),
                      gib: float = 1.0) -> str:
  """One line: the SHA-256 rate of `_sha256` over a file of `gib` GiB
  written under `path`. Nothing is dropped from the page cache, so the file
  is likely read from memory: this is the CPU's rate, a bound on what the
  disk or gs:// can add."""
  with tempfile.TemporaryDirectory(dir=path) as tmp:
    data = epath.Path(tmp) / 'data'
    block = os.urandom(1 << 26)
    with data.open('wb') as f:
      for _ in range(round(gib * 16)):
        f.write(block)
    start = time.perf_counter()
    _sha256(data)
    seconds = time.perf_counter() - start
  return (f'sha256: {gib / seconds:.2f} GiB/s ({seconds / gib:.2f} s per '
          f'GiB) over {gib:g} GiB on {path}')


if __name__ == '__main__':
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m mimjax.checkpoint',
      description='Prints the SHA-256 rate checkpoint sealing runs at.')
  parser.add_argument('--measure', action='store_true', required=True)
  parser.add_argument('--gib', type=float, default=1.0)
  parser.add_argument('--path', default=tempfile.gettempdir())
  flags = parser.parse_args()
  print(measure_hash_rate(flags.path, flags.gib))
