"""Image folders that tell the truth (issue 29): evaluators and analyses read
a seeded subset of every class, a folder without test/ holds images out
rather than scoring training images, a flat folder is for pre-training."""

import hashlib
import logging

# mimjax.data before TensorFlow: it loads triton first (see its __init__).
from mimjax import config as config_lib
from mimjax import data
from mimjax import evaluators, sharding
from mimjax.analysis import stream
from mimjax.data import pipeline as data_pipeline

import numpy as np
import pytest

from tiny_config import tiny_config


def _folder(root, classes=10, per_class=40, flat=False):
  """`classes` x `per_class` distinct 8x8 PNGs, sorted by class on disk."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for c in range(classes):
    where = root if flat else root / f'class_{c}'
    where.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      pixels = np.zeros((8, 8, 3), np.uint8)
      pixels[..., 0], pixels[..., 1] = c * 20, i * 5
      Image.fromarray(pixels).save(where / f'{c}_{i:03d}.png')
  return root


def _config(root, mode='pipeline', **overrides):
  c = tiny_config(None, mode=mode, **overrides)
  for d in (c.data, c.pretrain.data):
    d.name = f'folder:{root}'
  return c


def _rows(batches):
  """(label, image hash) of the real rows of eval batches."""
  return [(int(l), hashlib.sha1(x.tobytes()).hexdigest())
          for b in batches
          for l, x in zip(b['label'][b['valid']], b['image'][b['valid']])]


def _one_line(fn, *words):
  with pytest.raises(ValueError) as e:
    fn()
  assert '\n' not in str(e.value), str(e.value)
  for word in words:
    assert word in str(e.value), str(e.value)


def test_knn_and_analysis_examples_span_a_class_sorted_folder(tmp_path):
  c = _config(_folder(tmp_path / 'digits'))
  c.pretrain.knn_examples = c.analyze.examples = 100
  c.eval_batch_size = 32
  bank, queries = (_rows(b) for b in evaluators.Knn(c, None, None, None,
                                                    1).images)
  assert len(bank) == 100 and len(set(bank)) == 100  # each image once
  assert len({label for label, _ in bank}) >= 8  # not classes 0-2 only
  again, _ = (_rows(b) for b in evaluators.Knn(c, None, None, None, 1).images)
  assert again == bank
  # The queries: the 40 held-out images (fewer than 100), none in the bank.
  assert len(queries) == 40 and not set(queries) & set(bank)
  mesh = sharding.config_mesh(c)
  shown = lambda: [(int(label), hashlib.sha1(x.tobytes()).hexdigest())
                   for _, g, valid in stream.eval_stream(
                       c.data, 32, mesh, split='train', limit=100)
                   for label, x in zip(np.asarray(g['label'])[valid],
                                       np.asarray(g['image'])[valid])]
  examples = shown()
  assert len(examples) == 100 and len({l for l, _ in examples}) >= 8
  assert shown() == examples


def test_a_subset_is_dealt_out_over_processes(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  c = _config(_folder(tmp_path / 'digits', classes=4, per_class=30)).data
  one = _rows(data.eval_batches(c, 16, 'train', 50))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  rows, sizes = [], []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda i=index: i)
    batches = list(data.eval_batches(c, 16, 'train', 50))
    sizes.append(sum(len(b['valid']) for b in batches))
    rows += _rows(batches)
  assert sizes == [32, 32]  # 25 each, padded to 4 batches of 8
  assert len(rows) == 50 and sorted(rows) == sorted(one)


def test_a_folder_without_test_holds_out_a_stated_fraction(tmp_path, caplog):
  root = _folder(tmp_path / 'digits')
  c = _config(root)
  with caplog.at_level(logging.WARNING):
    config_lib.validate(c, num_devices=1)
    config_lib.validate(c, num_devices=1)
  said = [r.getMessage() for r in caplog.records if 'holding out' in
          r.getMessage()]
  assert said == [f'data: folder {root} has no test/; holding out 10% (40 '
                  'images, seed 0) for evaluation']
  assert data.num_examples(c.data, 'train') == 360
  assert data.num_examples(c.data, 'test') == 40
  train = _rows(data.eval_batches(c.data, 64, 'train'))
  test = _rows(data.eval_batches(c.data, 64))
  assert len(set(train) | set(test)) == 400 and not set(train) & set(test)
  c.data.holdout = c.pretrain.data.holdout = 0.0
  _one_line(lambda: config_lib.validate(c, num_devices=1), 'no test/',
            'data.holdout')
  _one_line(lambda: list(data.eval_batches(c.data, 64)), 'no test/')
  c.mode = 'pretrain'  # nothing evaluated: every image trains
  config_lib.validate(c, num_devices=1)
  assert data.num_examples(c.pretrain.data, 'train') == 400
  c.mode, c.pretrain.data.holdout = 'pipeline', 0.2
  c.data.holdout = 0.1
  _one_line(lambda: config_lib.validate(c, num_devices=1), 'data.holdout=0.1',
            'pretrain.data.holdout=0.2')
  c.data.holdout = 1.0
  _one_line(lambda: config_lib.validate(c, num_devices=1),
            'data.holdout must be in [0, 1)')
  # With a test/ of its own, nothing is held out.
  split = tmp_path / 'split'
  _folder(split / 'train')
  _folder(split / 'test', per_class=2)
  c = _config(split, **{'data.holdout': 0.0, 'pretrain.data.holdout': 0.0})
  config_lib.validate(c, num_devices=1)
  assert data.num_examples(c.data, 'train') == 400
  assert data.num_examples(c.data, 'test') == 20


def test_a_flat_folder_pretrains_but_does_not_classify(tmp_path):
  root = _folder(tmp_path / 'photos', classes=2, per_class=10, flat=True)
  c = _config(root, mode='pretrain')
  config_lib.validate(c, num_devices=1)
  batch = next(data.train_batches(c.pretrain.data, 'pretrain', 8, seed=0))
  assert batch['image'].shape == (8, 16, 16, 3) and not batch['label'].any()
  for mode in ('finetune', 'linprobe', 'pipeline'):
    c.mode = mode
    _one_line(lambda: config_lib.validate(c, num_devices=1),
              'no class sub-folders', 'pre-training')
  c.mode, c.pretrain.knn_every = 'pretrain', 10  # kNN needs classes too
  _one_line(lambda: config_lib.validate(c, num_devices=1),
            'no class sub-folders')
  _one_line(lambda: data.num_classes(c.data), 'no class sub-folders')
  _one_line(lambda: data.train_batches(c.data, 'finetune', 8, seed=0),
            'no class sub-folders')
  assert data_pipeline.folder_info(str(root)).class_names == ()
