"""The results report: statistics over seeds, tables and verdicts."""

import numpy as np

from mimjax.tools import results_tables as results


def _analysis(offset):
  enc = lambda v: {'invariance_cka': [0.1, v], 'invariance_cosine': [0.9, 0.9],
                   'invariance_cosine_centred': [0.2, v / 2]}
  return {'examples': 300, 'cka_estimator': 'minibatch_unbiased',
          'encoders': {'mae': enc(0.4 + offset), 'cmae': enc(0.5 + offset),
                       'one_image_china': enc(0.2), 'random': enc(0.1)},
          'cka': {'mae vs cmae': [[0.9, 0.1], [0.2, 0.7 + offset]]}}


def _rows(ft, knn=50.0, lp=40.0, loss=0.5):
  return {('pretrain', ''): {'stage': 'pretrain', 'knn_top1': knn,
                             'loss': loss},
          ('finetune', '/x/pretrain/checkpoints'): {'stage': 'finetune',
                                                    'top1': ft},
          ('linprobe', '/x/pretrain/checkpoints'): {'stage': 'linprobe',
                                                    'top1': lp}}


def fake_results(seeds=3):
  return {
      'variants': {'mae': [_rows(90 + s) for s in range(seeds)],
                   'cmae': [_rows(90.5 + s) for s in range(seeds)]},
      'scratch': {s: {('finetune', 'random init'): {'top1': 80.0 + s},
                      ('finetune', 'random init, decay 1'): {'top1': 95.0}}
                  for s in range(seeds)},
      'one_image': {'china': [_rows(88 + s) for s in range(seeds)]},
      'analysis': {s: _analysis(0.01 * s) for s in range(seeds)},
      'minutes': 1.5,
  }


def test_stat_and_formats():
  assert results.stat([1.0, 3.0, None]) == (2.0, 1.0, 2)
  assert results.fmt((2.0, 1.0, 2)) == '2.00 ± 1.00'
  assert results.fmt((2.0, 0.0, 1)) == '2.00'
  assert results.fmt((float('nan'), float('nan'), 0)) == '—'


def test_verdict_uses_the_spread():
  assert results.verdict((10.0, 1.0, 3), (5.0, 1.0, 3)) == 'holds'
  assert results.verdict((5.0, 1.0, 3), (10.0, 1.0, 3)) == 'does not hold'
  assert 'not separable' in results.verdict((6.0, 1.0, 3), (5.0, 1.0, 3))
  assert 'one seed' in results.verdict((6.0, 0.0, 1), (5.0, 0.0, 1))


def test_tables_and_markdown():
  res = fake_results()
  t = results.tables(res)
  mae = t['variants']['mae']
  np.testing.assert_allclose(mae['finetune'][:2], (91.0, np.std([90, 91, 92])))
  np.testing.assert_allclose(mae['inv_cka'][0], 0.41)
  assert t['scratch']['flat'] == (95.0, 0.0, 3)
  assert t['scratch']['recipe'][0] == 81.0
  np.testing.assert_allclose(t['cka_last']['mae vs cmae'][0], 0.71)
  text = results.markdown(res, t, 3, False, 'make results', 'Setup.')
  assert '| mae | one random mask |' in text
  assert '91.00 ± 0.82' in text
  assert '| one photo: china | 89.00 ± 0.82 |' in text
  claims = results.claims(t)
  words = {c[0]: c[2] for c in claims}
  assert words['C-MAE (InfoNCE) fine-tunes about as well as MAE.'].startswith(
      'holds')
  one = [w for c, w in words.items() if c.startswith('One-image')][0]
  assert one.startswith('holds') and 'does not hold' in one
  assert 'occlusion-invariant' in ' '.join(words)
