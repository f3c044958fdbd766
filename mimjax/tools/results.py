"""The paper's experiments in small, over seeds, written to docs/results.md.

  python -m mimjax.tools.results --runs=workdir/results --out=docs
  python -m mimjax.tools.results --quick ...   # one seed, short runs

For every seed: each variant of the transform x similarity matrix in
`VARIANTS` is pre-trained with the demo recipe (configs/demo.py), then
fine-tuned and linearly probed; the demo's fine-tuning runs from random
initialisation with the recipe's layer decay and with none (1.0); MAE is
pre-trained on each of `PHOTOS` alone (one-image pre-training) and
fine-tuned; then every encoder is analysed (occlusion invariance, CKA).
Pre-training is never repeated for a fine-tuning variant. The tables give
mean ± std over seeds, and each of the paper's claims gets a verdict from
the numbers. Runs already in --runs are resumed, not redone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from absl import app, flags

from mimjax import host_memory
from mimjax.tools import results_tables as tables_lib
from mimjax.tools.results_tables import VARIANTS

_RUNS = flags.DEFINE_string('runs', 'workdir/results', 'Where the runs go.')
_OUT = flags.DEFINE_string('out', 'docs', 'Where results.md and its PNGs go.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds (pre-training + fine-tuning).')
_QUICK = flags.DEFINE_bool('quick', False,
                           'One seed, a fifth of the steps: a smoke run.')
_VARIANTS = flags.DEFINE_list('variants', None,
                              'Variants to run (default: all of VARIANTS).')
_PHOTOS = flags.DEFINE_list('photos', None, 'One-image photos (default: '
                            'all of PHOTOS; "" for none).')

PHOTOS = ('china', 'flower', 'hopper')


def photo_path(name: str) -> str:
  """Photos that ship with mimjax's dependencies ('' is the bundled one)."""
  if name == 'china':
    return ''
  if name == 'flower':
    import sklearn  # pylint: disable=g-import-not-at-top
    return os.path.join(os.path.dirname(sklearn.__file__), 'datasets',
                        'images', 'flower.jpg')
  import matplotlib.cbook  # pylint: disable=g-import-not-at-top
  return str(matplotlib.cbook.get_sample_data('grace_hopper.jpg',
                                              asfileobj=False))


def recipe(variant: str, seed: int, quick: bool, mode: str = 'pipeline'):
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config(variant)
  c.seed, c.mode = seed, mode
  c.analyze.enabled = False
  c.finetune.scratch_baseline = False
  c.finetune.scratch_layer_decay = 0.0
  c.pretrain.recon_every = 0
  # Two thirds of the demo's pre-training and half its probe, so that three
  # seeds of everything fit in about 90 minutes on 2 cores.
  c.pretrain.epochs, c.pretrain.warmup_epochs = 20, 3
  c.linprobe.epochs, c.linprobe.warmup_epochs = 10, 1
  if quick:
    c.pretrain.epochs, c.pretrain.warmup_epochs = 6, 1
    c.finetune.epochs, c.finetune.warmup_epochs = 3, 1
    c.linprobe.epochs, c.linprobe.warmup_epochs = 3, 1
  c.pretrain.knn_every = 0  # once, at the end (below)
  return c


def one_image_recipe(photo: str, seed: int, quick: bool):
  c = recipe('mae', seed, quick)
  from configs import one_image  # pylint: disable=g-import-not-at-top
  ref = one_image.get_config('digits')
  c.pretrain.data = ref.pretrain.data
  c.pretrain.data.one_image_path = photo_path(photo)
  # As many steps as the digits pre-training above.
  c.pretrain.steps = ref.pretrain.steps * 2 // (15 if quick else 3)
  c.pretrain.warmup_steps = ref.pretrain.warmup_steps * 2 // (15 if quick else 3)
  c.linprobe.enabled = False
  return c


class Runs:
  """Runs each stage once (a finished stage is read back from its workdir)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.started = time.time()
    self.seconds = 0.0  # of every run, also those done by an earlier call

  def __call__(self, name: str, config) -> dict:
    from mimjax.training import pipeline  # pylint: disable=g-import-not-at-top
    where = os.path.join(self.workdir, name)
    done = os.path.join(where, 'summary.json')
    elapsed = os.path.join(where, 'elapsed_seconds')
    if not os.path.exists(done):
      minutes = (time.time() - self.started) / 60
      print(f'[{minutes:5.1f} min] {name}', flush=True)
      started = time.time()
      pipeline.run(config, where)
      with open(elapsed, 'w') as f:
        f.write(f'{time.time() - started:.1f}')
    if os.path.exists(elapsed):
      self.seconds += float(open(elapsed).read())
    rows = json.loads(open(done).read())
    return {(r['stage'], r.get('init', '')): r for r in rows}


def knn_at_end(config):
  """kNN monitoring once, at the last pre-training step."""
  c = config.pretrain
  from mimjax import data  # pylint: disable=g-import-not-at-top
  from mimjax.training import trainers  # pylint: disable=g-import-not-at-top
  total, _ = trainers.stage_steps(
      c, data.num_examples(c.data, c.data.train_split), 'pretrain')
  c.knn_every = total
  return config


def run_all(workdir: str, seeds: int, quick: bool, variants, photos) -> dict:
  runs = Runs(workdir)
  out = {'variants': {}, 'scratch': {}, 'one_image': {}, 'analysis': {}}
  for seed in range(seeds):
    encoders = {}
    for variant in variants:
      name = f'seed{seed}/{variant}'
      rows = runs(name, knn_at_end(recipe(variant, seed, quick)))
      out['variants'].setdefault(variant, []).append(rows)
      encoders[variant] = os.path.join(workdir, name, 'pretrain',
                                       'checkpoints')
    scratch = recipe('mae', seed, quick, mode='finetune')
    scratch.finetune.scratch_layer_decay = 1.0
    out['scratch'][seed] = runs(f'seed{seed}/scratch', scratch)
    for photo in photos:
      name = f'seed{seed}/one_image_{photo}'
      out['one_image'].setdefault(photo, []).append(
          runs(name, one_image_recipe(photo, seed, quick)))
      encoders[f'one_image_{photo}'] = os.path.join(
          workdir, name, 'pretrain', 'checkpoints')
    encoders['random'] = 'random'
    analyze = recipe('mae', seed, quick, mode='analyze')
    analyze.analyze.encoders = ','.join(f'{k}={v}' for k, v in
                                        encoders.items())
    runs(f'seed{seed}/analyze', analyze)
    path = os.path.join(workdir, f'seed{seed}', 'analyze', 'analyze',
                        'analysis.json')
    out['analysis'][seed] = json.loads(open(path).read())
  out['minutes'] = round(runs.seconds / 60, 1)
  return out


def setup_text(quick: bool) -> str:
  c = recipe('mae', 0, quick)
  o = one_image_recipe('china', 0, quick)
  return (
      f'Setup (configs/demo.py): ViT-{c.model.size} (patch '
      f'{c.model.patch_size}) on {c.data.image_size}×{c.data.image_size} '
      f'digits; pre-training {c.pretrain.epochs} epochs at batch '
      f'{c.pretrain.batch_size} (one image: {o.pretrain.steps} steps on '
      'random crops of one photo), decoder width '
      f'{c.pretrain.decoder.width}, depth {c.pretrain.decoder.depth}; '
      f'fine-tuning {c.finetune.epochs} epochs (layer decay '
      f'{c.finetune.layer_decay}), linear probe {c.linprobe.epochs} epochs '
      f'({c.linprobe.optimizer}); kNN (k={c.pretrain.knn_k}) on encoder '
      'features after pre-training. Crops: random-resized crop (scale 0.2–1, '
      'no flips: digits are not mirror-symmetric) + colour jitter + '
      'grayscale, on device (mimjax/views.py). Eq. 7: φ\' a persistent '
      'decoder, one Adam step per outer step, target under stop-gradient.')


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  # Seeds after the first reuse the first's compiled programs.
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(os.path.abspath(_RUNS.value), 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  seeds = 1 if _QUICK.value else _SEEDS.value
  variants = _VARIANTS.value or list(VARIANTS)
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f'unknown variants {unknown}; known: {list(VARIANTS)}')
  photos = [p for p in (PHOTOS if _PHOTOS.value is None else _PHOTOS.value)
            if p]
  res = run_all(_RUNS.value, seeds, _QUICK.value, variants, photos)
  t = tables_lib.tables(res)
  command = ' '.join(['python -m mimjax.tools.results', *sys.argv[1:]])
  text = tables_lib.markdown(res, t, seeds, _QUICK.value, command,
                  setup_text(_QUICK.value))
  os.makedirs(os.path.join(_OUT.value, 'results'), exist_ok=True)
  analyzed = os.path.join(_RUNS.value, 'seed0', 'analyze', 'analyze')
  for png in ('occlusion_invariance.png', 'cka_overview.png'):
    shutil.copy(os.path.join(analyzed, png),
                os.path.join(_OUT.value, 'results', png))
  with open(os.path.join(_OUT.value, 'results.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(_RUNS.value, 'tables.json'), 'w') as f:
    json.dump({k: v for k, v in t.items()}, f, indent=1, default=str)
  print(text)
  print(f'wrote {os.path.join(_OUT.value, "results.md")}', file=sys.stderr)


if __name__ == '__main__':
  host_memory.reexec_with_tunables()
  app.run(main)
