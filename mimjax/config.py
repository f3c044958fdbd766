"""The config schema every recipe in configs/ fills in, and its validation."""

from __future__ import annotations

import ml_collections as mlc
from ml_collections import config_dict

from mimjax import masking, objectives, sharding, views
from mimjax.models import vit

MODES = ('pretrain', 'finetune', 'linprobe', 'eval', 'analyze', 'pipeline')


def data_config(**overrides) -> mlc.ConfigDict:
  """Input settings (mimjax/data reads them), small offline defaults."""
  c = mlc.ConfigDict(dict(
      name='digits', data_dir=config_dict.placeholder(str), image_size=32,
      train_split='train', eval_split='test', one_image_path='',
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
  c.model = mlc.ConfigDict(dict(
      size='B', patch_size=16, norm_eps=1e-6, scan=False, remat=False,
      dtype='float32'))

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
  c.reference = mlc.ConfigDict()  # the paper's numbers, for the summary
  return c


def validate(config: mlc.ConfigDict, num_devices: int, num_granules: int = 1):
  """One clear line per impossible value, raised before anything compiles.

  num_granules: TPU slices or hosts (sharding.topology).
  """
  if config.mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {config.mode!r}')
  vit.preset(config.model.size)
  mesh, _ = sharding.mesh_shapes(config.mesh, config.mesh_dcn, num_devices,
                                 num_granules, config.model.size)
  data_parallel = mesh[0] * mesh[1]
  width, _, heads = vit.PRESETS[config.model.size]
  if width % mesh[2] or heads % mesh[2]:
    raise ValueError(f'tensor axis {mesh[2]} does not divide the {heads} '
                     f'heads and width {width} of ViT-{config.model.size}')
  decoder = config.pretrain.decoder
  if config.mode in ('pretrain', 'pipeline') and (
      decoder.width % mesh[2] or decoder.num_heads % mesh[2]):
    raise ValueError(f'tensor axis {mesh[2]} does not divide the '
                     f'{decoder.num_heads} heads and width {decoder.width} '
                     'of the decoder (pretrain.decoder)')
  p = config.model.patch_size
  for where, data in (('data', config.data), ('pretrain.data',
                                              config.pretrain.data)):
    if data.image_size % p:
      raise ValueError(f'{where}.image_size {data.image_size} is not '
                       f'divisible by model.patch_size {p}')
  masking.check_ratio(config.pretrain.mask_ratio)
  if config.linprobe.optimizer not in ('lars', 'adamw'):
    raise ValueError("linprobe.optimizer must be 'lars' or 'adamw', got "
                     f'{config.linprobe.optimizer!r}')
  if config.analyze.examples < 4:
    raise ValueError('analyze.examples must be at least 4 (CKA needs them), '
                     f'got {config.analyze.examples}')
  if not 0.0 < config.analyze.mask_ratio < 1.0:
    raise ValueError('analyze.mask_ratio must be in (0, 1), got '
                     f'{config.analyze.mask_ratio}')
  if config.pretrain.objective not in objectives.REGISTRY:
    raise ValueError(f'unknown pretrain.objective '
                     f'{config.pretrain.objective!r}; known: '
                     f'{sorted(objectives.REGISTRY)}')
  if config.mode in ('pretrain', 'pipeline'):
    check_transform(config.pretrain)
  for stage in ('pretrain', 'finetune', 'linprobe'):
    batch = config[stage].batch_size
    if batch % data_parallel:
      raise ValueError(f'{stage}.batch_size {batch} is not divisible by the '
                       f'data-parallel size {data_parallel} (mesh {mesh})')
  if config.eval_batch_size % data_parallel:
    raise ValueError(f'eval_batch_size {config.eval_batch_size} is not '
                     f'divisible by the data-parallel size {data_parallel}')


# Views each mask function gives (None: one per view of the view function).
MASK_VIEWS = {'random': 1, 'block': 1, 'grid': 1, 'complementary': 2,
              'independent': None, 'none': None}
POSITIONAL = ('mae', 'siamese', 'rmae')  # compare pixels patch by patch


def check_transform(c: mlc.ConfigDict):
  """Refuses a (views, mask, objective) triple that makes no sense, naming
  why (docs/objectives.md, "The transform x similarity matrix")."""
  views.get(c.views, **c.view_kwargs.to_dict())  # unknown names and knobs
  if c.mask not in MASK_VIEWS:
    raise ValueError(f'unknown pretrain.mask {c.mask!r}; known: '
                     f'{sorted(MASK_VIEWS)}')
  crops = c.views == 'crops'
  kw = c.view_kwargs
  aligned = not crops or (tuple(kw.get('scale', (0.08, 1.0))) == (1.0, 1.0)
                          and not kw.get('flip', True))
  num_views = (kw.get('num_views', 2) if crops else 1)
  masks = MASK_VIEWS[c.mask] or (num_views if crops else 2)
  what = f'pretrain.views={c.views!r} with pretrain.mask={c.mask!r}'
  if c.mask == 'none' and not crops:
    raise ValueError(f'{what} gives identical views: nothing to learn; use '
                     "views='crops' or a mask that hides patches")
  if crops and masks != num_views and c.mask != 'none':
    raise ValueError(f'{what}: {num_views} crops need one mask each; use '
                     "mask='independent' (crop + mask) or 'none'")
  name = c.objective
  level = c.objective_kwargs.get('level', 'patch')
  if name == 'siamese' and c.objective_kwargs.get('oracle', False):
    name = 'mae'
  if name != 'mae' and masks < 2:
    raise ValueError(f'pretrain.objective={name!r} compares two views; '
                     f'{what} gives one')
  patchwise = name in POSITIONAL or (name == 'cmae' and level == 'patch')
  if patchwise and name != 'mae' and not aligned:
    raise ValueError(
        f'pretrain.objective={name!r} compares the views patch by patch, '
        f'but {what} makes crops whose positions do not correspond (mimjax '
        "does not align crops by their boxes); use cmae level='image' or "
        'simsiam, or views without crops and flips')
  if patchwise and c.mask == 'none':
    raise ValueError(f'pretrain.objective={name!r} predicts hidden patches; '
                     f'{what} hides none')
