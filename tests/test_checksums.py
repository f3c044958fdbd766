"""Checkpoint sealing off the training thread, and the split of the hashing
between processes (mimjax/checkpoint.py). The tiny pre-training runs of
test_reliability.py cover the fallback in a whole pipeline, and
test_multiprocess.py two processes checkpointing and resuming."""

import json
import os
import shutil
import threading

import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import pytest

import damage
from mimjax import checkpoint

STATE = {'w': jnp.arange(4096, dtype=jnp.float32), 'b': jnp.ones((3, 3))}


def _ckpts(tmp_path, **kwargs):
  return checkpoint.Checkpoints(str(tmp_path / 'checkpoints'), **kwargs)


@pytest.fixture
def held(monkeypatch):
  """Makes every hash wait for `held.set()`; `held.entered` once one waits."""
  release, entered = threading.Event(), threading.Event()
  sha256 = checkpoint._sha256

  def blocked(path):
    entered.set()
    release.wait(timeout=120)
    return sha256(path)
  monkeypatch.setattr(checkpoint, '_sha256', blocked)
  release.entered = entered
  yield release
  release.set()


def test_save_returns_before_the_seal(tmp_path, held):
  ckpts = _ckpts(tmp_path)
  ckpts.save(1, STATE, {'step': 1})
  assert held.entered.wait(timeout=120)  # the sealing thread is hashing
  sealed = tmp_path / 'checkpoints' / '1' / checkpoint.CHECKSUMS
  assert not sealed.exists()
  assert checkpoint.verify(sealed.parent)[0] is None  # restorable unsealed
  held.set()
  ckpts.wait()
  assert sealed.exists()
  assert checkpoint.verify(sealed.parent) == (True, '')
  ckpts.close()


def test_a_damaged_step_is_set_aside(tmp_path):
  ckpts = _ckpts(tmp_path)
  for step in (1, 2):
    ckpts.save(step, STATE, {'step': step})
  ckpts.close()
  damage.flip_a_byte(tmp_path / 'checkpoints' / '2')
  step, state, meta = _ckpts(tmp_path).restore_latest(STATE)
  assert (step, meta) == (1, {'step': 1})
  np.testing.assert_array_equal(state['w'], STATE['w'])
  assert os.listdir(tmp_path / 'checkpoints_damaged') == ['2']


def test_steps_deleted_by_max_to_keep_raise_nothing(tmp_path):
  ckpts = _ckpts(tmp_path, keep=1, keep_best=True)
  for step, score in ((1, 0.5), (2, 0.9), (3, 0.1)):
    ckpts.save(step, STATE, {'step': step})
    ckpts.save_best(step, STATE, score)  # 3 is deleted as soon as written
  ckpts.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', 'best']
  assert os.listdir(tmp_path / 'checkpoints' / 'best') == ['2']
  for sealed in ('3', 'best/2'):
    assert checkpoint.verify(tmp_path / 'checkpoints' / sealed) == (True, '')


def test_a_save_that_deletes_a_step_waits_for_its_seal(tmp_path, held):
  ckpts = _ckpts(tmp_path, keep=1)
  ckpts.save(1, STATE, {'step': 1})
  assert held.entered.wait(timeout=120)
  second = threading.Thread(target=ckpts.save, args=(2, STATE, {'step': 2}))
  second.start()
  second.join(timeout=3)
  assert second.is_alive()  # orbax would delete 1 while it is hashed
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
  held.set()
  second.join()
  ckpts.close()
  assert os.listdir(tmp_path / 'checkpoints') == ['2']


def test_a_step_deleted_while_it_is_hashed_raises_nothing(tmp_path, held):
  ckpts = _ckpts(tmp_path)
  ckpts.save(1, STATE, {'step': 1})
  assert held.entered.wait(timeout=120)
  shutil.rmtree(tmp_path / 'checkpoints' / '1')
  held.set()
  ckpts.close()
  assert not (tmp_path / 'checkpoints' / '1').exists()


def test_shares_are_disjoint_cover_every_file_and_balance_bytes():
  sizes = {'a': 900, 'b': 800, 'c': 100, 'd': 100, 'e': 0, 'f': 0, 'g': 5}
  for count in (1, 2, 3):
    shares = [checkpoint.share(sizes, count, i) for i in range(count)]
    assert sorted(sum(shares, [])) == sorted(sizes)  # each file once
    assert all(s == sorted(s) for s in shares)
  first, second = (checkpoint.share(sizes, 2, i) for i in range(2))
  assert abs(sum(sizes[f] for f in first) - sum(sizes[f] for f in second)) < 200
  # Files of one size (an older manifest has none) go round.
  assert checkpoint.share(dict.fromkeys('abcd', 0), 2, 1) == ['b', 'd']


@pytest.fixture
def step_dir(tmp_path):
  """A finished checkpoint directory, not sealed."""
  ckpts = _ckpts(tmp_path)
  ckpts.save(1, STATE, {'step': 1})
  ckpts.wait()
  ckpts.close()
  step = tmp_path / 'checkpoints' / '1'
  os.remove(step / checkpoint.CHECKSUMS)
  return step


def test_verify_combines_the_parts_of_two_processes(step_dir):
  checkpoint.write_checksums(step_dir, 1, 2)
  assert checkpoint.verify(step_dir) == (
      None, 'not all processes wrote their checksums')
  checkpoint.write_checksums(step_dir, 0, 2)
  parts = [json.loads((step_dir / f'mimjax_checksums.{i}.json').read_text())
           for i in range(2)]
  assert not set(parts[0]['sha256']) & set(parts[1]['sha256'])
  assert checkpoint.verify(step_dir) == (True, '')
  assert checkpoint.foreign_entries(step_dir) == []
  changed = step_dir / sorted(parts[1]['sha256'])[0]
  changed.write_bytes(changed.read_bytes() + b'x')
  assert checkpoint.verify(step_dir, 0, 2) == (True, '')  # not its share
  assert checkpoint.verify(step_dir, 1, 2)[0] is False
  assert checkpoint.verify(step_dir) == (
      False, f'{sorted(parts[1]["sha256"])[0]} does not match its checksum')


def test_an_older_single_manifest_still_verifies(step_dir):
  old = {rel: checkpoint._sha256(p) for rel, p in checkpoint._files(step_dir)}
  (step_dir / checkpoint.CHECKSUMS).write_text(json.dumps({'sha256': old}))
  assert checkpoint.verify(step_dir) == (True, '')
  assert checkpoint.verify(step_dir, 1, 2) == (True, '')
  assert checkpoint.foreign_entries(step_dir) == []
  (step_dir / 'notes.txt').write_text('mine')
  assert checkpoint.foreign_entries(step_dir) == ['notes.txt']


def test_processes_agree_on_the_worst_verdict(monkeypatch):
  sent = []

  def allgather(mine):  # as if each call were one more process
    sent.append(mine)
    return np.stack(sent)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  assert checkpoint._agree(True, '') == (True, '')
  unsealed = 'no checksums were written with it'
  assert checkpoint._agree(None, unsealed) == (None, unsealed)
  why = 'state/ocdbt.process_1/d/0f does not match its checksum'
  assert checkpoint._agree(False, why) == (False, why)
  assert checkpoint._agree(True, '') == (False, why)
