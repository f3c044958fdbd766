"""The config schema every recipe in configs/ fills in, and its validation.

Why this module is long: each key's default sits next to the check that
refuses a bad value before anything runs, and next to what decides whether
a stage may resume (its fingerprint).
"""

from __future__ import annotations

import difflib
import json
import os
import re

import jax
import ml_collections as mlc
from ml_collections import config_dict

from mimjax import build, errors, masking, objectives, sharding, views
from mimjax.models import vit

MODES = ('pretrain', 'finetune', 'linprobe', 'eval', 'analyze', 'pipeline')


def data_config(**overrides) -> mlc.ConfigDict:
  """Input settings (mimjax/data reads them), small offline defaults."""
  c = mlc.ConfigDict(dict(
      name='digits', data_dir=config_dict.placeholder(str), image_size=32,
      train_split='train', eval_split='test', one_image_path='',
      # folder: without an eval_split sub-folder, this fraction of train_split
      # is held out (seeded) for evaluation; 0: refused where evaluated.
      holdout=0.1,
      prepare=True, shuffle_buffer=10_000, num_parallel=-1,  # -1: autotune
      randaug=True, erase_prob=0.25,
      min_scale=0.0,  # RandomResizedCrop; 0: 0.2 pretrain, 0.08 otherwise
      flip=True))
  c.update(overrides)
  return c


def base_config() -> mlc.ConfigDict:
  """Every key a recipe may set, with the reference MAE ViT-B/16 values."""
  c = mlc.ConfigDict()
  c.mode = 'pipeline'
  c.seed = 0
  # (data, fsdp, tensor), -1 = the rest; None: per model size
  # (sharding.DEFAULT_FSDP). mesh_dcn: how the mesh splits over TPU slices or
  # hosts; None: data-parallel over them (docs/scaling.md).
  c.mesh = config_dict.placeholder(tuple)
  c.mesh_dcn = config_dict.placeholder(tuple)
  c.sharding_rules = config_dict.placeholder(list)  # None: sharding.DEFAULT_RULES
  c.data = data_config()
  # remat_policy: what a rematerialised block keeps for the backward pass
  # (with remat=True), a name in jax.checkpoint_policies (vit.REMAT_POLICIES).
  # attention: 'xla', 'cudnn' (GPUs, bfloat16/float16) or 'auto', cuDNN's
  # where it runs (vit.resolve_attention).
  c.model = mlc.ConfigDict(dict(
      size='B', patch_size=16, norm_eps=1e-6, scan=False, remat=False,
      remat_policy='nothing_saveable', dtype='float32', attention='auto'))

  c.pretrain = mlc.ConfigDict(dict(
      data=data_config(),  # what is pre-trained on
      objective='mae', objective_kwargs=mlc.ConfigDict(dict(norm_pix=True)),
      mask='random', mask_ratio=0.75,
      # 'identity' (the batch itself) or 'crops' (mimjax/views.py), with
      # view_kwargs; the views are drawn on device, before masking.
      views='identity', view_kwargs=mlc.ConfigDict(),
      decoder=mlc.ConfigDict(dict(width=512, depth=8, num_heads=16,
                                  out_dim=0)),  # 0: pixel head p*p*C
      batch_size=4096, epochs=800, steps=0, warmup_epochs=40, warmup_steps=0,
      base_lr=1.5e-4, min_lr=0.0, weight_decay=0.05, b2=0.95, clip_norm=0.0,
      accumulate=1, knn_every=0, knn_k=20, knn_examples=1024,
      recon_every=0))
  c.finetune = mlc.ConfigDict(dict(
      init='', batch_size=1024, epochs=100, steps=0, warmup_epochs=5,
      warmup_steps=0, base_lr=5e-4, min_lr=1e-6, layer_decay=0.65,
      weight_decay=0.05, b2=0.999, drop_path=0.1, label_smoothing=0.1,
      mixup=0.8, cutmix=1.0, clip_norm=0.0, accumulate=1, pool='gap',
      eval_every=0, scratch_baseline=False,
      # > 0: one more random-init run with this layer decay (1.0: none).
      scratch_layer_decay=0.0))
  c.linprobe = mlc.ConfigDict(dict(
      init='', optimizer='lars', batch_size=16384, epochs=90, steps=0,
      warmup_epochs=10,
      warmup_steps=0, base_lr=0.1, min_lr=0.0, weight_decay=0.0,
      eval_every=0, enabled=True))
  c.analyze = mlc.ConfigDict(dict(
      # 'name=path,...' (path: a checkpoint, or 'random'); '': this run's
      # pre-trained encoder and a random one. mimjax/analysis/report.py.
      encoders='', examples=1024, mask_ratio=0.5, seed=0, enabled=True))
  c.eval_batch_size = 1024
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.stop_at_step = 0  # > 0: end each stage there (checkpointed) to resume later
  # (N, M): a jax.profiler trace of training steps N..M (1-based, inclusive)
  # of each stage, in <workdir>/<stage>/profile (TensorBoard's Profile tab).
  c.profile_steps = config_dict.placeholder(tuple)
  # True: a stage whose checkpoints were written with other settings (see
  # `stage_fingerprint`) is moved aside to <stage>.old-N and starts afresh.
  c.overwrite = False
  c.reference = mlc.ConfigDict()  # the paper's numbers, for the summary
  return c


def validate(config: mlc.ConfigDict, num_devices: int, num_granules: int = 1,
             platform: str | None = None):
  """One clear line per impossible value, raised before anything compiles.

  num_granules: TPU slices or hosts (sharding.topology). platform: the
  devices' ('cpu', 'gpu', 'tpu'); None: jax.devices()'s.
  """
  if config.mode not in MODES:
    raise errors.Invalid(f'mode must be one of {MODES}, got {config.mode!r}')
  check_counts(config)
  check_profile_steps(config.get('profile_steps'))
  vit.preset(config.model.size)
  vit.checkpoint_policy(build.remat_policy(config.model))
  attention = build.attention_choice(config.model)
  if attention == 'cudnn' and platform is None:
    platform = jax.devices()[0].platform
  vit.check_attention(attention, config.model.dtype, platform)
  mesh, _ = sharding.mesh_shapes(config.mesh, config.mesh_dcn, num_devices,
                                 num_granules, config.model.size)
  data_parallel = mesh[0] * mesh[1]
  width, _, heads = vit.PRESETS[config.model.size]
  if width % mesh[2] or heads % mesh[2]:
    raise errors.Invalid(f'tensor axis {mesh[2]} does not divide the {heads} '
                         f'heads and width {width} of ViT-{config.model.size}')
  decoder = config.pretrain.decoder
  if config.mode in ('pretrain', 'pipeline') and (
      decoder.width % mesh[2] or decoder.num_heads % mesh[2]):
    raise errors.Invalid(f'tensor axis {mesh[2]} does not divide the '
                         f'{decoder.num_heads} heads and width {decoder.width} '
                         'of the decoder (pretrain.decoder)')
  p = config.model.patch_size
  for where, data in (('data', config.data), ('pretrain.data',
                                              config.pretrain.data)):
    if data.image_size % p:
      raise errors.Invalid(f'{where}.image_size {data.image_size} is not '
                           f'divisible by model.patch_size {p}')
  masking.check_ratio(config.pretrain.mask_ratio)
  check_data(config)
  check_visible(config)
  check_inits(config)
  if config.linprobe.optimizer not in ('lars', 'adamw'):
    raise errors.Invalid("linprobe.optimizer must be 'lars' or 'adamw', got "
                         f'{config.linprobe.optimizer!r}')
  if config.analyze.examples < 4:
    raise errors.Invalid('analyze.examples must be at least 4 (CKA needs '
                         f'them), got {config.analyze.examples}')
  if not 0.0 < config.analyze.mask_ratio < 1.0:
    raise errors.Invalid('analyze.mask_ratio must be in (0, 1), got '
                         f'{config.analyze.mask_ratio}')
  if config.pretrain.objective not in objectives.REGISTRY:
    raise errors.Invalid(f'unknown pretrain.objective '
                         f'{config.pretrain.objective!r}; known: '
                         f'{sorted(objectives.REGISTRY)}')
  if config.mode in ('pretrain', 'pipeline'):
    check_transform(config.pretrain)
  for stage in ('pretrain', 'finetune', 'linprobe'):
    batch = config[stage].batch_size
    if batch % data_parallel:
      raise errors.Invalid(f'{stage}.batch_size {batch} is not divisible by '
                           f'the data-parallel size {data_parallel} (mesh '
                           f'{mesh})')
    accumulate = config[stage].get('accumulate', 1)
    if batch % (accumulate * data_parallel):
      raise errors.Invalid(f'{stage}.batch_size {batch} is not divisible by '
                           f'{stage}.accumulate {accumulate} x the '
                           f'data-parallel size {data_parallel} = '
                           f'{accumulate * data_parallel}: each micro-batch '
                           '(batch_size / accumulate images) is split over '
                           'the data-parallel devices')
  if config.eval_batch_size % data_parallel:
    raise errors.Invalid(f'eval_batch_size {config.eval_batch_size} is not '
                         f'divisible by the data-parallel size {data_parallel}')


# ------------------------------------------------ refused before any work
# (docs/reliability.md)

STAGES = ('pretrain', 'finetune', 'linprobe')
# mimjax's own datasets (data/pipeline.py reads them); 'folder:/root' too.
DATASETS = ('digits', 'one_image', 'imagenet2012', 'imagenette', 'cifar10',
            'cifar100')


def stages_run(config) -> tuple[str, ...]:
  """The training stages `config.mode` runs."""
  mode = config.mode
  return tuple(s for s in STAGES if mode == s or (
      mode == 'pipeline' and (s != 'linprobe' or config.linprobe.enabled)))


def check_counts(config):
  """Sizes, cadences and lengths that mean nothing (or lose work) below 1."""
  for key, what in (('log_every', 'steps between logs'),
                    ('checkpoint_every', 'steps between checkpoints'),
                    ('keep_checkpoints', 'checkpoints kept; 0 would delete '
                     'every one, the last included'),
                    ('eval_batch_size', 'images per eval batch')):
    if config[key] < 1:
      raise errors.Invalid(f'{key} must be at least 1 ({what}), got '
                           f'{config[key]}')
  if config.stop_at_step < 0:
    raise errors.Invalid(f'stop_at_step must be >= 0 (0: run to the end), got '
                         f'{config.stop_at_step}')
  for stage in STAGES:
    c = config[stage]
    if c.batch_size < 1:
      raise errors.Invalid(f'{stage}.batch_size must be at least 1, got '
                           f'{c.batch_size}')
    for key in ('steps', 'epochs', 'warmup_steps', 'warmup_epochs',
                'eval_every', 'knn_every', 'recon_every'):
      if key in c and c[key] < 0:
        raise errors.Invalid(f'{stage}.{key} must be >= 0, got {c[key]}')
    if c.get('accumulate', 1) < 1:
      raise errors.Invalid(f'{stage}.accumulate must be at least 1, got '
                           f'{c.accumulate}')
  for stage in stages_run(config):
    c = config[stage]
    if not c.steps and not c.epochs:
      raise errors.Invalid(f'{stage} would train nothing: {stage}.steps and '
                           f'{stage}.epochs are both 0')


def check_profile_steps(steps):
  """None or () (no trace), or (first, last) steps with 1 <= first <= last."""
  if not steps:
    return
  if (not isinstance(steps, (tuple, list)) or len(steps) != 2 or
      not all(isinstance(s, int) and not isinstance(s, bool) for s in steps)):
    raise errors.Invalid(f'profile_steps must be (first, last) training steps, '
                         f'e.g. (10, 12), or None; got {steps!r}')
  first, last = steps
  if not 1 <= first <= last:
    raise errors.Invalid(f'profile_steps {tuple(steps)} must have 1 <= first '
                         f'<= last (1-based training steps, both traced)')


def check_data(config):
  """Dataset names (with a suggestion for a typo), image folders (their
  images, classes where labels are needed, a split to evaluate on) and the
  one-image photo, for every data config the mode reads."""
  stages = stages_run(config)
  # config.data's labels: fine-tuning, probing, eval and kNN; its eval split:
  # those and the analyses.
  classes = (bool({'finetune', 'linprobe'} & set(stages)) or
             config.mode == 'eval' or
             ('pretrain' in stages and config.pretrain.knn_every > 0))
  evaluates = classes or config.mode == 'analyze' or (
      config.mode == 'pipeline' and config.analyze.enabled)
  used = [('data', config.data, classes, evaluates)]
  if 'pretrain' in stages:
    used.append(('pretrain.data', config.pretrain.data, False, False))
  for where, data, _, _ in used:
    if not 0 <= data.holdout < 1:
      raise errors.Invalid(f'{where}.holdout must be in [0, 1), got '
                           f'{data.holdout}')
  if len(used) == 2 and evaluates:
    check_same_holdout(config.data, config.pretrain.data)
  for where, data, labels, evaluated in used:
    name = data.name
    if name.startswith('folder:'):
      root = os.path.expanduser(name[len('folder:'):])
      if not os.path.isdir(root):
        raise errors.Invalid(f'{where}.name={name!r}: no directory at {root}')
      if labels or evaluated or where != 'data':
        from mimjax.data import pipeline  # pylint: disable=g-import-not-at-top
        pipeline.check_folder(data, labels, evaluated)
    elif name not in DATASETS:
      close = difflib.get_close_matches(name, DATASETS, n=1)
      hint = f'did you mean {close[0]!r}? ' if close else ''
      raise errors.Invalid(f'unknown dataset {where}.name={name!r}; '
                           f'{hint}known: {", ".join(DATASETS)} or '
                           f'folder:/path/to/root')
    elif name == 'one_image' and data.one_image_path:
      check_photo(data.one_image_path, config.model.patch_size,
                  f'{where}.one_image_path')


def check_same_holdout(data, pretrain):
  """Pre-training on one folder must hold out what evaluation reads."""
  if not (data.name == pretrain.name and data.name.startswith('folder:')):
    return
  root = os.path.expanduser(data.name[len('folder:'):])
  held = (data.eval_split != data.train_split and
          not os.path.isdir(os.path.join(root, data.eval_split)))
  if held and data.holdout != pretrain.holdout:
    raise errors.Invalid(f'data.holdout={data.holdout:g} but pretrain.data.'
                         f'holdout={pretrain.holdout:g} on the one folder '
                         f'{root}: pre-training would see images that are '
                         'evaluated; set them alike')


def check_photo(path: str, min_side: int, what: str = 'one_image_path'):
  """A photo PIL can read whose shorter side is at least `min_side` pixels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(full):
    raise errors.Invalid(f'{what}: no file at {full}')
  try:
    with Image.open(full) as im:
      im.verify()
    with Image.open(full) as im:
      size = im.size
  except Exception as e:  # pylint: disable=broad-except
    raise errors.Invalid(f'{what}: {full} is not an image PIL can read '
                         f'({type(e).__name__})') from None
  if min(size) < min_side:
    raise errors.Invalid(f'{what}: {full} is {size[0]}x{size[1]} pixels, '
                         f'smaller than one {min_side}x{min_side} patch: '
                         f'every crop of it would be nearly constant')


def check_visible(config):
  """Each masked view must keep at least one patch visible."""
  p = config.model.patch_size
  checks = []
  if 'pretrain' in stages_run(config) and config.pretrain.mask in (
      'random', 'complementary', 'independent', 'block'):
    checks.append(('pretrain.mask_ratio', config.pretrain.mask_ratio,
                   config.pretrain.data.image_size))
  if config.mode == 'analyze' or (config.mode == 'pipeline' and
                                  config.analyze.enabled):
    checks.append(('analyze.mask_ratio', config.analyze.mask_ratio,
                   config.data.image_size))
  for key, ratio, size in checks:
    patches = (size // p) ** 2
    if masking.num_kept(patches, ratio) < 1:
      raise errors.Invalid(f'{key}={ratio} leaves no patch visible of the '
                           f'{patches} in a {size}x{size} image (patch {p}); '
                           f'a ratio below {1 - 1 / patches:.4g} keeps one')


def check_inits(config):
  """finetune.init / linprobe.init name a checkpoint that exists (a run
  root or stage directory is accepted: its checkpoints are found)."""
  stages = stages_run(config)
  for stage in ('finetune', 'linprobe'):
    if stage in stages and config[stage].init:
      init_path(config[stage].init, f'{stage}.init')


def init_path(path: str, what: str) -> str:
  """The checkpoint `path` names (checkpoint.find_init), or one clear line."""
  from mimjax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.find_init(path, what)


def config_files(run) -> dict[int, object]:
  """A run directory's resolved configs, one per invocation: {1:
  config.json, 2: config-2.json, ...} (paths; `run` a pathlib or epath)."""
  return {int(m.group(1) or 1): p for p in run.iterdir()
          if (m := re.fullmatch(r'config(?:-(\d+))?\.json', p.name))}


def next_config_file(run):
  """Where this invocation writes its config: config.json, then
  config-2.json, ..."""
  n = max(config_files(run), default=0) + 1
  return run / ('config.json' if n == 1 else f'config-{n}.json')


def check_workdir(workdir: str):
  """A workdir mimjax can create and write: not under a file, not on a
  read-only or full file system (local paths; gs:// is checked on write)."""
  if '://' in workdir:
    return
  path = os.path.abspath(os.path.expanduser(workdir))
  probe = path
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise errors.Invalid(f'workdir {workdir}: {probe} is a file, not a '
                         f'directory')
  if not os.access(probe, os.W_OK | os.X_OK):
    raise errors.Invalid(f'workdir {workdir}: {probe} is not writable')
  try:
    stats = os.statvfs(probe)
  except OSError:
    return
  if stats.f_bavail * stats.f_frsize < (1 << 20):
    raise errors.Invalid(f'workdir {workdir}: the file system of {probe} is '
                         f'full ({stats.f_bavail * stats.f_frsize} bytes free)')


# ------------------------------------------------ what defines a stage

# Keys that may change when a stage resumes (training/pipeline.guard_stage): cadences,
# where the data lives, how the run is laid out on devices, and a longer
# run (`GROWABLE`, not a shorter one). Top-level keys other than `seed`
# (stop_at_step, log_every, checkpoint_every, keep_checkpoints,
# eval_batch_size, mesh, mesh_dcn, sharding_rules, mode, overwrite,
# analyze.*, reference.*) are not part of any stage's fingerprint.
RESUMABLE = ('data_dir', 'prepare', 'num_parallel', 'remat', 'remat_policy',
             'attention', 'eval_every',
             'knn_every', 'knn_k', 'knn_examples', 'recon_every', 'init',
             'enabled', 'scratch_baseline', 'scratch_layer_decay')
GROWABLE = ('steps', 'epochs')


def stage_fingerprint(config, kind: str) -> dict:
  """The settings that define a `kind` stage ('pretrain', 'finetune' or
  'linprobe'), flattened: its subtree, the model, its data and the seed."""
  def flat(node, prefix):
    out = {}
    for key, value in node.items():
      path = f'{prefix}.{key}'
      if isinstance(value, (mlc.ConfigDict, dict)):
        out.update(flat(value, path))
      elif key not in RESUMABLE:
        out[path] = value
    return out

  fingerprint = {'seed': config.seed, **flat(config.model, 'model'),
                 **flat(config[kind], kind)}
  if kind != 'pretrain':  # pretrain.data is in pretrain's subtree
    fingerprint.update(flat(config.data, 'data'))
  # JSON's view of the values (tuples are lists), as they are stored.
  return json.loads(json.dumps(fingerprint, default=str))


def fingerprint_changes(old: dict, new: dict) -> list[str]:
  """'key old -> new' for each key that differs and may not (RESUMABLE and
  GROWABLE excepted). A key added to the schema after `old` was written
  matches at its default."""
  changes = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, '<unset>'), new.get(key, '<unset>')
    if a == b or key.rsplit('.', 1)[-1] in RESUMABLE:
      continue
    if key not in old and b == _schema_default(key):
      continue
    if (key.rsplit('.', 1)[-1] in GROWABLE and isinstance(a, (int, float))
        and isinstance(b, (int, float)) and b >= a):
      continue
    changes.append(f'{key} {a!r} -> {b!r}')
  return changes


def _schema_default(key: str):
  """base_config()'s value at a dotted key, as JSON stores it; None where
  the schema has no such key."""
  node = base_config()
  try:
    for part in key.split('.'):
      node = node[part]
  except (KeyError, AttributeError, TypeError):
    return None
  return json.loads(json.dumps(node, default=str))


POSITIONAL = ('mae', 'siamese', 'rmae')  # compare pixels patch by patch


def check_transform(c: mlc.ConfigDict):
  """Refuses a (views, mask, objective) triple that makes no sense, naming
  why (docs/objectives.md, "The transform x similarity matrix")."""
  view_fn = views.get(c.views, **c.view_kwargs.to_dict())
  if c.mask not in masking.NUM_VIEWS:
    raise errors.Invalid(f'unknown pretrain.mask {c.mask!r}; known: '
                         f'{sorted(masking.NUM_VIEWS)}')
  crops = view_fn is not None
  num_views, aligned = views.layout(view_fn)
  masks = masking.NUM_VIEWS[c.mask] or (num_views if crops else 2)
  what = f'pretrain.views={c.views!r} with pretrain.mask={c.mask!r}'
  if c.mask == 'none' and not crops:
    raise errors.Invalid(f'{what} gives identical views: nothing to learn; use '
                         "views='crops' or a mask that hides patches")
  if crops and masks != num_views and c.mask != 'none':
    raise errors.Invalid(f'{what}: {num_views} crops need one mask each; use '
                         "mask='independent' (crop + mask) or 'none'")
  name = c.objective
  level = c.objective_kwargs.get('level', 'patch')
  if name == 'siamese' and c.objective_kwargs.get('oracle', False):
    name = 'mae'
  if name != 'mae' and masks < 2:
    raise errors.Invalid(f'pretrain.objective={name!r} compares two views; '
                         f'{what} gives one')
  patchwise = name in POSITIONAL or (name == 'cmae' and level == 'patch')
  if patchwise and name != 'mae' and not aligned:
    raise errors.Invalid(
        f'pretrain.objective={name!r} compares the views patch by patch, '
        f'but {what} makes crops whose positions do not correspond (mimjax '
        "does not align crops by their boxes); use cmae level='image' or "
        'simsiam, or views without crops and flips')
  if patchwise and c.mask == 'none':
    raise errors.Invalid(f'pretrain.objective={name!r} predicts hidden '
                         f'patches; {what} hides none')
