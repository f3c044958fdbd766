"""The stages a mode runs (pre-train -> fine-tune -> probe -> analyse), each
guarded by its workdir fingerprint, and the summary they print."""

from __future__ import annotations

import json
import logging as pylogging
import os

from absl import logging
import jax
from jax.experimental import multihost_utils

from mimjax import checkpoint
from mimjax import config as config_lib
from mimjax import errors
from mimjax import sharding
from mimjax.analysis import report
from mimjax.training import preemption, trainers


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def run(config, workdir: str, checkpoint_path: str | None = None) -> list[dict]:
  """Runs the configured mode; returns one summary dict per stage."""
  config_lib.validate(config, *sharding.topology())
  config_lib.check_workdir(workdir)
  out = checkpoint.resolve(workdir)
  pretrained = os.path.join(stage_dir(workdir, 'pretrain'), 'checkpoints')
  summaries = []
  mode = config.mode
  analyze = mode == 'analyze' or (mode == 'pipeline' and
                                  config.analyze.enabled)
  if analyze:  # a wrong path is an error now, not after training
    encoders = report.parse_encoders(config.analyze.encoders, pretrained)
    if mode == 'analyze' or config.analyze.encoders:
      report.check_paths(encoders)
  # The training stages, each checked against the fingerprint of the
  # checkpoints already in its directory before anything trains.
  plan = []  # (stage, kind, config, init, trainer)
  if mode in ('pretrain', 'pipeline'):
    plan.append(('pretrain', 'pretrain', config, None,
                 lambda c, d, _: trainers.pretrain(c, d)))
  if mode in ('finetune', 'pipeline'):
    init = (config_lib.init_path(config.finetune.init, 'finetune.init')
            if config.finetune.init else
            pretrained if mode == 'pipeline' else None)
    plan.append(('finetune', 'finetune', config, init, trainers.finetune))
    if config.finetune.scratch_baseline:
      plan.append(('finetune_scratch', 'finetune', config, None,
                   trainers.finetune))
    decay = config.finetune.scratch_layer_decay
    if decay:
      flat = config.copy_and_resolve_references()
      with flat.unlocked():
        flat.finetune.layer_decay = decay
      plan.append((f'finetune_scratch_ld{decay:g}', 'finetune', flat, None,
                   trainers.finetune))
  if 'linprobe' in config_lib.stages_run(config):
    init = (config_lib.init_path(config.linprobe.init, 'linprobe.init')
            if config.linprobe.init else pretrained)
    if mode == 'linprobe' and not config.linprobe.init:
      config_lib.init_path(init, "linprobe.init (this run's pre-training)")
    plan.append(('linprobe', 'linprobe', config, init, trainers.linprobe))
  made_here = str(checkpoint.resolve(pretrained))
  for stage, kind, cfg, init, _ in plan:
    guard_stage(cfg, stage_dir(workdir, stage), kind, init, write=False,
                partial=(mode == 'pipeline' and init is not None and
                         str(checkpoint.resolve(init)) == made_here))
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    config_lib.next_config_file(out).write_text(
        config.to_json_best_effort(indent=1))
    log_to(out / 'log.txt')
  stopped = False
  for i, (stage, kind, cfg, init, trainer) in enumerate(plan):
    guard_stage(cfg, stage_dir(workdir, stage), kind, init)
    summary = trainer(cfg, stage_dir(workdir, stage), init)[1]
    if kind != 'pretrain':
      summary = _tagged(summary, init or (
          'random init' if cfg is config else
          f'random init, decay {cfg.finetune.layer_decay:g}'))
    summaries.append(summary)
    if config.stop_at_step and config.stop_at_step < summary['steps']:
      # An unfinished stage is nobody's init: carry on in the next call.
      logging.info('%s stopped at step %d of %d (stop_at_step); the next '
                   'invocation carries on', stage, config.stop_at_step,
                   summary['steps'])
      stopped = True
      break
    if preemption.requested() and (i + 1 < len(plan) or analyze):
      raise preemption.stopped_after(stage)
  if analyze and not stopped:
    summaries += report.run(config, stage_dir(workdir, 'analyze'), encoders)
  if mode == 'eval':
    path = checkpoint_path or os.path.join(stage_dir(workdir, 'finetune'),
                                           'checkpoints')
    summaries.append({'stage': 'eval', **trainers.evaluate(config, path)})
  table = summary_table(summaries, config)
  if jax.process_index() > 0:  # the same numbers, in this process's log
    logging.info('summary of process %d:\n%s', jax.process_index(), table)
  else:
    print(table)
    (out / 'summary.json').write_text(json.dumps(summaries, indent=1))
    (out / 'summary.md').write_text(summary_markdown(summaries) + '\n')
    print(pictures(out))
    print(f'TensorBoard: tensorboard --logdir {workdir}; library logs: '
          f'{out / "log.txt"}')
  return summaries


_LOG_FILE = None


def log_to(path):
  """Library logs (INFO and up) of this run go to `path` (a local file);
  the console keeps its own lines (main.py sets its threshold)."""
  global _LOG_FILE
  root = pylogging.getLogger()
  if _LOG_FILE is not None:
    root.removeHandler(_LOG_FILE)
    _LOG_FILE.close()
    _LOG_FILE = None
  if '://' in str(path):
    return
  _LOG_FILE = pylogging.FileHandler(str(path))
  _LOG_FILE.setLevel(pylogging.INFO)
  _LOG_FILE.setFormatter(pylogging.Formatter(
      '%(asctime)s %(levelname)s %(name)s: %(message)s'))
  root.addHandler(_LOG_FILE)


def pictures(out) -> str:
  """Where the PNGs of this workdir are: the last reconstruction grid and the
  analysis plots."""
  recon = sorted(out.glob('pretrain/reconstructions_*.png'),
                 key=lambda p: int(p.stem.split('_')[-1]))
  analysis = [out / 'analyze' / n for n in ('occlusion_invariance.png',
                                            'cka_overview.png')]
  shown = [str(p) for p in recon[-1:] + analysis if p.exists()]
  pairs = len(list(out.glob('analyze/cka_*_vs_*.png')))
  more = f' (and {pairs} cka_*_vs_*.png there)' if pairs else ''
  return ('Pictures: ' + ', '.join(shown) + more) if shown else ''


# The summary's columns; 'inner_loss' (Eq. 7: how close φ' is) only when a
# stage has one.
SUMMARY_KEYS = ('loss', 'inner_loss', 'knn_top1', 'top1', 'top5',
                'invariance', 'steps', 'train_seconds')


def summary_markdown(summaries: list[dict]) -> str:
  """The summary table as Markdown (summary.md)."""
  keys = [k for k in SUMMARY_KEYS if any(k in s for s in summaries)]
  cell = lambda v: (f'{v:.4f}' if isinstance(v, float) else
                    '—' if v is None else str(v))
  lines = ['| stage | init | ' + ' | '.join(keys) + ' |',
           '|---|---|' + '---|' * len(keys)]
  for s in summaries:
    lines.append(f'| {s["stage"]} | {s.get("init", "—")} | ' +
                 ' | '.join(cell(s.get(k)) for k in keys) + ' |')
  return '\n'.join(lines)


def guard_stage(config, directory: str, kind: str, init: str | None,
                partial: bool = False, write: bool = True):
  """Refuses to resume a stage whose checkpoints were written with other
  settings (config.stage_fingerprint, the init and its step), naming the
  keys; --config.overwrite=True moves such a stage aside instead. Writes
  the fingerprint of a stage about to run (`write`). `partial`: the init is
  made by an earlier stage of this call, so only the settings are
  compared."""
  stage = checkpoint.resolve(directory)
  ckpts = stage / 'checkpoints'
  path = ckpts / checkpoint.FINGERPRINT
  new = {**config_lib.stage_fingerprint(config, kind),
         **({} if partial else checkpoint.init_identity(init))}
  old = json.loads(path.read_text()) if path.exists() else None
  resumes = checkpoint.latest_step(ckpts) is not None
  if resumes and old is None and write:
    logging.warning('%s has no fingerprint (written by an older mimjax): '
                    'resuming it unchecked', ckpts)
  if resumes and old is not None:
    if partial:
      old = {k: v for k, v in old.items() if not k.startswith('init')}
    changes = config_lib.fingerprint_changes(old, new)
    if changes and not config.overwrite:
      more = f' (+{len(changes) - 4} more)' if len(changes) > 4 else ''
      raise errors.Invalid(
          f'{stage.name}: the checkpoints in {ckpts} were written with other '
          f'settings: {"; ".join(changes[:4])}{more}; start fresh with a new '
          '--workdir, or --config.overwrite=True to move them aside')
    if changes:
      n = 1
      while (stage.parent / f'{stage.name}.old-{n}').exists():
        n += 1
      aside = stage.parent / f'{stage.name}.old-{n}'
      if jax.process_index() == 0:
        stage.rename(aside)
      _sync(f'mimjax_overwrite_{stage.name}')
      logging.warning('%s: settings changed (%s); overwrite=True: moved the '
                      'old stage to %s', stage.name, '; '.join(changes), aside)
  if write and jax.process_index() == 0:
    ckpts.mkdir(parents=True, exist_ok=True)
    tmp = ckpts / (checkpoint.FINGERPRINT + '.tmp')
    tmp.write_text(json.dumps(new, indent=1, sort_keys=True))
    tmp.replace(path)


def _sync(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _tagged(summary: dict, init: str) -> dict:
  return {**summary, 'init': init}


def summary_table(summaries: list[dict], config) -> str:
  """A short table of what each stage measured."""
  keys = [k for k in SUMMARY_KEYS
          if k != 'inner_loss' or any(k in s for s in summaries)]
  cell = lambda v: (f'{v:>13.4f}' if isinstance(v, float) else
                    f'{"-" if v is None else v!s:>13}')
  lines = [f'{"stage":<10} {"init":<24} ' + ' '.join(f'{k:>13}' for k in keys)]
  for s in summaries:
    init = str(s.get('init', '-'))
    if os.sep in init:  # a checkpoint path: its last two parts say enough
      init = os.path.join(*init.rstrip(os.sep).split(os.sep)[-2:])
    lines.append(f'{s["stage"]:<10} {init[-24:]:<24} ' +
                 ' '.join(cell(s.get(k)) for k in keys))
  if config.reference:
    lines.append(f'reference (paper): {config.reference.to_dict()}')
  return '\n'.join(lines)
