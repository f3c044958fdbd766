"""The tables and verdicts of `mimjax.tools.results`: statistics over seeds
of the runs' summaries and analyses, the paper's claims checked against
them, and the Markdown page (docs/results.md)."""

from __future__ import annotations

import os
import time

import numpy as np

# name: (transform, similarity), as in mimjax/matrix.py.
VARIANTS = {
    'mae': ('one random mask', 'pixel L2 (oracle target)'),
    'siamese': ('complementary masks', 'pixel L2 through φ\', Eq. 7'),
    'rmae': ('complementary masks', 'pixel L2, relaxed (R-MAE)'),
    'cmae': ('complementary masks', 'patch InfoNCE (C-MAE)'),
    'cmae_image': ('complementary masks', 'image InfoNCE'),
    'crop_mask': ('crop + mask', 'image InfoNCE'),
    'simclr': ('two crops + colour', 'image InfoNCE (SimCLR-like)'),
}
CHANCE = 10.0  # digits: 10 classes


# ------------------------------------------------------------ statistics


def stat(values) -> tuple[float, float, int]:
  values = [v for v in values if v is not None]
  if not values:
    return float('nan'), float('nan'), 0
  return float(np.mean(values)), float(np.std(values)), len(values)


def fmt(s, digits: int = 2) -> str:
  """'mean ± std' of a (mean, std, n) stat; the mean alone for one seed."""
  mean, std, n = s
  if n == 0:
    return '—'
  return (f'{mean:.{digits}f}' if n == 1 else
          f'{mean:.{digits}f} ± {std:.{digits}f}')


def fmt3(s) -> str:
  return fmt(s, 3)


def pick(rows_per_seed, stage, key, init=None):
  vals = []
  for rows in rows_per_seed:
    for (s, i), row in rows.items():
      if s == stage and (init is None or init == i):
        vals.append(row.get(key))
        break
  return vals


def verdict(a, b, more: bool = True) -> str:
  """'holds' when a beats b (or, more=False, trails it) by more than the
  two spreads together; 'does not hold' when the other way round by as much;
  otherwise 'not separable at this scale'."""
  (ma, sa, na), (mb, sb, nb) = a, b
  if not (na and nb):
    return 'not measured'
  gap = (ma - mb) if more else (mb - ma)
  margin = sa + sb
  if na < 2 or nb < 2:
    return (f'{"holds" if gap > 0 else "does not hold"} on one seed '
            '(no spread measured)')
  if gap > margin:
    return 'holds'
  if gap < -margin:
    return 'does not hold'
  return 'not separable at this scale (difference within the spread)'


# ------------------------------------------------------------ the report


def tables(res: dict) -> dict:
  """Every number of the report, as (mean, std, n)."""
  t = {'variants': {}, 'scratch': {}, 'one_image': {}}
  analysis = list(res['analysis'].values())

  def inv(name, key):
    return stat([a['encoders'][name][key][-1] for a in analysis
                  if name in a['encoders']])

  for v, rows in res['variants'].items():
    t['variants'][v] = {
        'knn': stat(pick(rows, 'pretrain', 'knn_top1')),
        'loss': stat(pick(rows, 'pretrain', 'loss')),
        'inner_loss': stat(pick(rows, 'pretrain', 'inner_loss')),
        'finetune': stat(pick(rows, 'finetune', 'top1')),
        'linprobe': stat(pick(rows, 'linprobe', 'top1')),
        'inv_cka': inv(v, 'invariance_cka'),
        'inv_cos': inv(v, 'invariance_cosine_centred'),
    }
  scratch = list(res['scratch'].values())
  t['scratch'] = {
      'recipe': stat(pick(scratch, 'finetune', 'top1', 'random init')),
      'flat': stat(pick(scratch, 'finetune', 'top1', 'random init, decay 1')),
      'inv_cka': inv('random', 'invariance_cka'),
      'inv_cos': inv('random', 'invariance_cosine_centred'),
  }
  for photo, rows in res['one_image'].items():
    t['one_image'][photo] = {
        'finetune': stat(pick(rows, 'finetune', 'top1')),
        'inv_cka': inv(f'one_image_{photo}', 'invariance_cka'),
        'inv_cos': inv(f'one_image_{photo}', 'invariance_cosine_centred'),
    }
  pairs = {}
  for a in analysis:
    for pair, matrix in a['cka'].items():
      pairs.setdefault(pair, []).append(np.asarray(matrix)[-1, -1])
  t['cka_last'] = {p: stat(v) for p, v in pairs.items()}
  t['examples'] = analysis[0]['examples'] if analysis else 0
  t['estimator'] = analysis[0].get('cka_estimator', 'linear') if analysis else ''
  return t


def cka_pair(t, a, b):
  return t['cka_last'].get(f'{a} vs {b}') or t['cka_last'].get(
      f'{b} vs {a}') or (float('nan'), float('nan'), 0)


def claims(t) -> list[tuple[str, str, str]]:
  """(the paper's claim, what was measured here, verdict)."""
  v, s = t['variants'], t['scratch']
  out = []
  has = lambda *names: all(n in v for n in names)
  # 1. The transform matters more than the similarity.
  occl = [v[k]['finetune'][0] for k in ('siamese', 'rmae', 'cmae',
                                        'cmae_image') if k in v]
  trans = [v[k]['finetune'][0] for k in ('cmae_image', 'crop_mask', 'simclr')
           if k in v]
  if len(occl) > 1 and len(trans) > 1:
    spread_sim = max(occl) - min(occl)
    spread_tr = max(trans) - min(trans)
    out.append((
        'The transform matters more than the similarity.',
        f'fine-tune top-1 spread (max − min of the means) over '
        f'{len(occl)} similarities with complementary masks: '
        f'{spread_sim:.2f} points; over {len(trans)} transforms with image '
        f'InfoNCE: {spread_tr:.2f} points',
        'holds' if spread_tr > spread_sim else 'does not hold'))
  # 2. C-MAE fine-tunes about as well as MAE.
  if has('cmae', 'mae'):
    gap = v['cmae']['finetune'][0] - v['mae']['finetune'][0]
    margin = v['cmae']['finetune'][1] + v['mae']['finetune'][1]
    out.append((
        'C-MAE (InfoNCE) fine-tunes about as well as MAE.',
        f"C-MAE {fmt(v['cmae']['finetune'])} vs MAE "
        f"{fmt(v['mae']['finetune'])}",
        'holds (the gap is within the spread, or under 1 point)'
        if abs(gap) <= max(margin, 1.0) else
        ('does not hold: C-MAE is better' if gap > 0 else
         'does not hold: C-MAE is worse')))
  # 3. R-MAE: similar features to MAE, fine-tunes somewhat lower.
  if has('rmae', 'mae', 'cmae'):
    out.append((
        'R-MAE fine-tunes somewhat lower than MAE.',
        f"R-MAE {fmt(v['rmae']['finetune'])} vs MAE "
        f"{fmt(v['mae']['finetune'])}; last-block CKA MAE vs R-MAE "
        f"{fmt3(cka_pair(t, 'mae', 'rmae'))}, MAE vs C-MAE "
        f"{fmt3(cka_pair(t, 'mae', 'cmae'))}",
        verdict(v['mae']['finetune'], v['rmae']['finetune'])))
  # 4. MIM learns occlusion-invariant features.
  if has('mae'):
    out.append((
        'MIM learns occlusion-invariant features (more than a random '
        'encoder).',
        f"last-block CKA between complementary views: MAE "
        f"{fmt3(v['mae']['inv_cka'])}, random encoder {fmt3(s['inv_cka'])}; "
        f"centred cosine MAE {fmt3(v['mae']['inv_cos'])}, random "
        f"{fmt3(s['inv_cos'])}",
        verdict(v['mae']['inv_cka'], s['inv_cka'])))
  # 5. One-image pre-training beats random initialisation.
  for photo, o in t['one_image'].items():
    out.append((
        f'One-image pre-training ({photo}) beats random initialisation.',
        f"fine-tune {fmt(o['finetune'])} vs random init "
        f"{fmt(s['recipe'])} (recipe layer decay) and {fmt(s['flat'])} "
        '(no layer decay)',
        f"{verdict(o['finetune'], s['recipe'])} against the recipe's "
        f"random init; {verdict(o['finetune'], s['flat'])} against no "
        'layer decay'))
  # 6. The siamese form (Eq. 7) does not collapse when φ' tracks the argmin.
  if not has('siamese', 'mae'):
    return out
  siam = v['siamese']
  collapsed = siam['linprobe'][0] < 2 * CHANCE
  out.append((
      'The siamese form (Eq. 7) is MAE rewritten, so it should learn like '
      'it when φ\' is near the argmin.',
      f"Eq. 7: pre-training loss {fmt3(siam['loss'])}, inner loss at the "
      f"end {fmt3(siam['inner_loss'])}, linear probe "
      f"{fmt(siam['linprobe'])}, fine-tune {fmt(siam['finetune'])} vs MAE "
      f"{fmt(v['mae']['finetune'])}",
      ('collapsed (linear probe near chance)' if collapsed else
       'no collapse; ' + verdict(siam['finetune'], v['mae']['finetune'],
                                 more=False).replace(
                                     'holds', 'fine-tunes below MAE'))))
  return out


def centred_note(t) -> str:
  """A word on negative centred cosines, when every encoder has one."""
  values = [r['inv_cos'][0] for r in t['variants'].values()
            if r['inv_cos'][2]] + [t['scratch']['inv_cos'][0]]
  if not values or max(values) >= 0:
    return ''
  return (' Every centred cosine is negative: the two views split each '
          "image's patches between them, so once the mean over images is "
          'removed, what one view\'s pooled feature has more of, the '
          'other\'s tends to have less; CKA, which ignores the sign of a '
          'linear relation, is the measure to compare here.')


def markdown(res: dict, t: dict, seeds: int, quick: bool, command: str,
             setup: str) -> str:
  v, s = t['variants'], t['scratch']
  lines = [
      '# Results: the paper\'s claims, measured in small',
      '',
      f'Written by `{command}` on {time.strftime("%Y-%m-%d")} '
      f'({res["minutes"]} min of runs on {os.cpu_count()} CPU cores, '
      f'{seeds} seed{"s" if seeds > 1 else ""}'
      f'{", quick: short runs" if quick else ""}). '
      'Every number below is what that run printed into its summaries; '
      'rerun the command to regenerate this page. Cells are mean ± std '
      'over the seeds (seeds vary pre-training and fine-tuning).',
      '',
      setup,
      '',
      '## The transform × similarity matrix',
      '',
      '| variant | transform | similarity | pre-training kNN top-1 | '
      'fine-tune top-1 | linear probe top-1 | occlusion invariance (CKA, '
      'last block) | centred cosine (last block) |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for name, (transform, similarity) in VARIANTS.items():
    if name not in v:
      continue
    r = v[name]
    lines.append(f"| {name} | {transform} | {similarity} | {fmt(r['knn'])} | "
                 f"{fmt(r['finetune'])} | {fmt(r['linprobe'])} | "
                 f"{fmt3(r['inv_cka'])} | {fmt3(r['inv_cos'])} |")
  lines += [
      f"| random init (layer decay as the recipe) | — | — | — | "
      f"{fmt(s['recipe'])} | — | {fmt3(s['inv_cka'])} | {fmt3(s['inv_cos'])} |",
      f"| random init (no layer decay) | — | — | — | {fmt(s['flat'])} | — | "
      '— | — |',
      '',
      f"Occlusion invariance: {t['examples']} digits test images, two "
      'complementary masked views (ratio 0.5), CKA estimator '
      f"`{t['estimator']}`." + centred_note(t),
      '',
      '![occlusion invariance](results/occlusion_invariance.png)',
      '',
      '## One-image pre-training',
      '',
      '| pre-trained on | fine-tune top-1 | occlusion invariance (CKA) | '
      'centred cosine |',
      '|---|---|---|---|',
  ]
  for photo, o in t['one_image'].items():
    lines.append(f"| one photo: {photo} | {fmt(o['finetune'])} | "
                 f"{fmt3(o['inv_cka'])} | {fmt3(o['inv_cos'])} |")
  lines += [
      *([f"| digits (MAE) | {fmt(v['mae']['finetune'])} | "
         f"{fmt3(v['mae']['inv_cka'])} | {fmt3(v['mae']['inv_cos'])} |"]
        if 'mae' in v else []),
      f"| nothing (random init, recipe layer decay) | {fmt(s['recipe'])} | "
      f"{fmt3(s['inv_cka'])} | {fmt3(s['inv_cos'])} |",
      f"| nothing (random init, no layer decay) | {fmt(s['flat'])} | — | — |",
      '',
      '## CKA between encoders (last block, whole images)',
      '',
      '![CKA overview](results/cka_overview.png)',
      '',
      '| pair | CKA |',
      '|---|---|',
  ]
  for pair, value in sorted(t['cka_last'].items()):
    lines.append(f'| {pair} | {fmt3(value)} |')
  lines += ['', '## The paper\'s claims, here', '',
            '| claim | measured | verdict |', '|---|---|---|']
  for claim, measured, word in claims(t):
    lines.append(f'| {claim} | {measured} | {word} |')
  lines += [
      '',
      'Verdicts compare means against the sum of the two standard '
      'deviations: "holds" only when the gap is larger. At this scale (a '
      'two-block ViT, 32×32 digits, minutes of training) a claim that does '
      'not hold here says nothing about ImageNet; it says the effect is not '
      'visible in small.',
      '',
  ]
  return '\n'.join(lines)
