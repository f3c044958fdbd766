"""Host-side input pipeline: tfds or an image folder -> augmented numpy batches.

Each process reads its own shard and yields its share of each global batch.
Training streams are resumable: the example order depends only on (seed,
epoch) and each example's augmentation seed only on (seed, process, position
in the stream), so `train_batches(..., start_step=s)` yields exactly the
batches a run from step 0 would yield from step s on.

Image folders ('folder:/root', one sub-folder per class, sorted names give the
labels; a `<root>/<split>` sub-folder is used when it exists) are listed and
every file with an image extension is checked with PIL at startup. Unreadable
or corrupt files are skipped rather than fatal: a warning gives their count and
the first few paths, and `folder_info(...).num_skipped` exposes the count. Only
when no readable image remains is it an error. PIL's check reads headers, so a
file truncated after a valid header still passes it. A folder without class
sub-folders is one unlabelled class (label 0), for pre-training only. Without
an eval split sub-folder, the eval split is a seeded `holdout` fraction of the
train split's images, and the train split the rest.

Evaluators and analyses read a subset of a split (`eval_batches(...,
limit=n)`): n examples drawn with a fixed seed from the whole split, the same
in every run and on every process, never its first n (a folder is sorted by
class).

Why this module is long: it is the one path from every source (tfds, an
image folder, one photo) to resumable per-process batches; split, the
resumability argument above would be spread over several files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Callable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mimjax import errors
from mimjax.data import augment
from mimjax.data import builders

TFDS_NAMES = ('digits', 'one_image', 'imagenet2012', 'imagenette', 'cifar10',
              'cifar100')
OFFLINE = ('digits', 'one_image')  # Builders that prepare without a network.
MODES = ('pretrain', 'finetune', 'linprobe', 'none')  # 'eval' means 'none'.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
# PIL formats that tf.io.decode_image reads (MPO: multi-picture JPEG).
_PIL_FORMATS = ('JPEG', 'MPO', 'PNG', 'BMP', 'GIF', 'WEBP')
_SMALL = 64  # Eval images whose shorter side is below this are just resized.
HOLDOUT_SEED = 0  # Which images of a folder are held out for evaluation.
SUBSET_SEED = 0  # Which examples of a split an evaluator or analysis reads.


@dataclasses.dataclass(frozen=True)
class FolderInfo:
  """The readable images of one image folder and what was skipped."""
  directory: str
  class_names: tuple[str, ...]  # (): no class sub-folders, every label 0.
  paths: tuple[str, ...]
  labels: tuple[int, ...]
  skipped: tuple[str, ...]

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)


@dataclasses.dataclass
class _Source:
  """One process's shard of a split, undecoded, in a fixed order."""
  ds: tf.data.Dataset  # {'image': raw, 'label': int}, one pass.
  decode: Callable[[tf.Tensor], tf.Tensor]  # raw -> (H, W, C) uint8.
  size: int  # Examples in `ds`; -1 if unknown.
  sharded: bool = True  # False: every process reads the whole split.


def _folder_root(name: str) -> str | None:
  if not name.startswith('folder:'):
    return None
  return os.path.abspath(os.path.expanduser(name[len('folder:'):]))


def _check_name(name: str) -> None:
  if name not in TFDS_NAMES and _folder_root(name) is None:
    raise errors.Invalid(f'Unknown dataset {name!r}: expected one of '
                         f'{", ".join(TFDS_NAMES)} or folder:/path/to/root.')


def _local_batch(global_batch: int) -> int:
  count = jax.process_count()
  if global_batch <= 0 or global_batch % count:
    raise errors.Invalid(f'Global batch {global_batch} is not a positive '
                         f'multiple of the process count {count}.')
  return global_batch // count


# Image folders.


def _readable(path: str) -> bool:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.verify()
      return im.format in _PIL_FORMATS
  except Exception:  # pylint: disable=broad-except
    return False


@functools.lru_cache(maxsize=16)
def folder_info(root: str, split: str = 'train') -> FolderInfo:
  """Lists and checks an image folder's split; unreadable files are skipped."""
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise errors.Invalid(f'Image folder {root} does not exist.')
  directory = os.path.join(root, split)
  if not os.path.isdir(directory):
    directory = root
  class_names = tuple(sorted(
      d.name for d in os.scandir(directory)
      if d.is_dir() and not d.name.startswith('.')))
  image = lambda f: f.lower().endswith(IMAGE_EXTENSIONS) and f[0] != '.'
  candidates = []
  if not class_names:  # A flat folder: one unlabelled class.
    candidates = [(os.path.join(directory, f), 0)
                  for f in sorted(os.listdir(directory)) if image(f)]
  for label, name in enumerate(class_names):
    for dirpath, _, filenames in sorted(
        os.walk(os.path.join(directory, name), followlinks=True)):
      candidates += [(os.path.join(dirpath, f), label)
                     for f in sorted(filenames) if image(f)]
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    ok = list(pool.map(_readable, [p for p, _ in candidates]))
  good = [c for c, k in zip(candidates, ok) if k]
  skipped = tuple(p for (p, _), k in zip(candidates, ok) if not k)
  if skipped and jax.process_index() == 0:
    logging.warning('Image folder %s: skipped %d unreadable image(s), e.g. %s',
                    directory, len(skipped), ', '.join(skipped[:3]))
  if not good:
    raise errors.Invalid(f'Image folder {directory} has no readable images, '
                         f'in class sub-folders or at its top '
                         f'({len(skipped)} skipped).')
  return FolderInfo(directory, class_names, tuple(p for p, _ in good),
                    tuple(l for _, l in good), skipped)


def _decode_file(path):
  return tf.io.decode_image(tf.io.read_file(path), channels=3,
                            expand_animations=False)


def _holds_out(config) -> bool:
  """Whether a folder's eval split is held out of its train split."""
  root = _folder_root(config.name)
  return (config.eval_split != config.train_split and
          not os.path.isdir(os.path.join(root, config.eval_split)))


@functools.lru_cache(maxsize=16)
def _held_out(root: str, train: str, evals: str,
              fraction: float) -> frozenset[int]:
  """The indices into folder_info(root, train) held out as split `evals`."""
  info = folder_info(root, train)
  root = os.path.abspath(root)
  if fraction <= 0:
    raise errors.Invalid(f'Image folder {root} has no {evals}/ to evaluate on '
                         f'and data.holdout is 0: add {evals}/, or set '
                         f'data.holdout (e.g. 0.1) to hold out that fraction '
                         f'of {info.directory}.')
  n = len(info.paths)
  count = round(fraction * n)
  if not 0 < count < n:
    raise errors.Invalid(f'Image folder {root}: data.holdout={fraction:g} of '
                         f'its {n} images holds out {count}; evaluation and '
                         f'training each need at least one.')
  if jax.process_index() == 0:
    logging.warning('data: folder %s has no %s/; holding out %g%% (%d images, '
                    'seed %d) for evaluation', root, evals, 100 * fraction,
                    count, HOLDOUT_SEED)
  rng = np.random.default_rng(HOLDOUT_SEED)
  return frozenset(rng.permutation(n)[:count].tolist())


def _folder_split(config, split: str) -> tuple[FolderInfo, tuple, tuple]:
  """(info, paths, labels) of a folder's `split`: its own sub-folder, else the
  images held out of (or left in) the train split."""
  root = _folder_root(config.name)
  train, evals = config.train_split, config.eval_split
  if _holds_out(config) and split in (train, evals):
    info = folder_info(root, train)
    if split == train and config.holdout <= 0:
      return info, info.paths, info.labels
    held = _held_out(root, train, evals, float(config.holdout))
    rows = [i for i in range(len(info.paths))
            if (i in held) == (split == evals)]
    return (info, tuple(info.paths[i] for i in rows),
            tuple(info.labels[i] for i in rows))
  info = folder_info(root, split)
  if split != train:
    if (os.path.isdir(os.path.join(root, split)) and
        not os.path.isdir(os.path.join(root, train))):
      raise errors.Invalid(f'Image folder {root} has {split}/ but no {train}/: '
                           f'training would read {split}/ as a class.')
    if info.class_names != folder_info(root, train).class_names:
      raise errors.Invalid(f'Image folder {info.directory}: class sub-folders '
                           f'differ from those of split {train!r}.')
  return info, info.paths, info.labels


def _folder_classes(config) -> FolderInfo:
  info = folder_info(_folder_root(config.name), config.train_split)
  if not info.class_names:
    raise errors.Invalid(f'Image folder {info.directory} has no class '
                         f'sub-folders: fine-tuning, linear probing and kNN '
                         f'need one per class (a flat folder is for '
                         f'pre-training).')
  return info


def check_folder(config, classes: bool, evaluates: bool) -> None:
  """Refuses, in one line, an image folder a run cannot use: no readable
  image, no class sub-folders where labels are needed (`classes`), no split
  to evaluate on (`evaluates`). Prints the hold-out, if any, once."""
  if classes:
    _folder_classes(config)
  _folder_split(config, config.train_split)
  if evaluates:
    _folder_split(config, config.eval_split)


def _subset(items: tuple, limit: int | None) -> tuple:
  """The first `limit` of `items` in an order drawn with SUBSET_SEED: a
  smaller subset is the start of a larger one."""
  if limit is None:
    return items
  pick = np.random.default_rng(SUBSET_SEED).permutation(len(items))[:limit]
  return tuple(items[i] for i in pick)


def _folder_source(config, split: str, shard: bool,
                   subset: int | None = None) -> _Source:
  _, paths, labels = _folder_split(config, split)
  rows = _subset(tuple(zip(paths, labels)), subset)
  if shard:  # Strided, so that every process gets every class.
    i, count = jax.process_index(), jax.process_count()
    rows = rows[i::count]
  ds = tf.data.Dataset.from_tensor_slices(
      {'image': tf.constant([p for p, _ in rows], tf.string),
       'label': np.asarray([l for _, l in rows], np.int64)})
  return _Source(ds, _decode_file, len(rows), shard)


# tfds datasets.


def _data_dir(builder) -> str:
  return os.fspath(builder.data_dir_root)


def _not_prepared(name: str, data_dir: str) -> ValueError:
  if name == 'imagenet2012':
    return ValueError(
        f'imagenet2012 is not prepared in {data_dir}: tfds expects the manual '
        'files ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
        f'{os.path.join(data_dir, "downloads", "manual")}, then '
        f'`tfds build imagenet2012 --data_dir={data_dir}`.')
  if name in OFFLINE:
    return ValueError(f'{name} is not prepared in {data_dir}; set '
                      'prepare=True to build it (offline).')
  return ValueError(f'{name} is not prepared in {data_dir} and mimjax never '
                    f'downloads: run `tfds build {name} '
                    f'--data_dir={data_dir}`.')


def _builder(config):
  """The tfds builder for `config.name`, prepared if it is an offline one."""
  if config.name == 'one_image':
    builder = builders.one_image_builder(
        config.one_image_path, config.data_dir)
  else:
    builder = tfds.builder(config.name, data_dir=config.data_dir)
  if (config.name in OFFLINE and config.prepare
      and not builder.is_prepared()):
    builder.download_and_prepare()
  return builder


def _as_dataset(builder, name: str, split: str, shard: bool,
                **kwargs) -> tf.data.Dataset:
  """builder.as_dataset with tfds's errors turned into one-line ValueErrors."""
  try:
    return builder.as_dataset(
        split=tfds.split_for_jax_process(split) if shard else split, **kwargs)
  except AssertionError as e:
    if 'could not find data' not in str(e):
      raise
    raise _not_prepared(name, _data_dir(builder)) from None
  except (KeyError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise errors.Invalid(f'{name}: cannot read split {split!r}: {first}') from None


def _tfds_source(config, split: str, shard: bool, seed: int | None,
                 subset: int | None = None) -> _Source:
  builder = _builder(config)
  if config.name == 'one_image':
    # Its one example, for training and evaluation, on every process.
    split, shard = 'train', False
  decode = builder.info.features['image'].decode_example

  def read(shard, seed):
    read_config = tfds.ReadConfig(
        shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
        try_autocache=False, skip_prefetch=True)
    ds = _as_dataset(builder, config.name, split, shard,
                     shuffle_files=seed is not None, read_config=read_config,
                     decoders={'image': tfds.decode.SkipDecoding()})
    return ds.map(lambda ex: {
        'image': ex['image'],
        'label': ex.get('label', tf.constant(0, tf.int64))})

  if subset is not None:
    # The whole split in a seeded order (its files, then a buffer of
    # shuffle_buffer examples), its first `subset`, dealt out to processes.
    ds = read(False, SUBSET_SEED)
    total = int(ds.cardinality())
    if total < 0:
      raise errors.Invalid(f'{config.name}: the size of split {split!r} is '
                           f'unknown.')
    subset = min(subset, total)
    ds = ds.shuffle(max(1, min(total, config.shuffle_buffer)),
                    seed=SUBSET_SEED,
                    reshuffle_each_iteration=False).take(subset)
    if not shard:
      return _Source(ds, decode, subset, False)
    i, count = jax.process_index(), jax.process_count()
    ds = ds.enumerate().filter(lambda j, _: j % count == i)
    size = subset // count + (i < subset % count)
    return _Source(ds.map(lambda _, ex: ex), decode, size, True)
  ds = read(shard, seed)
  return _Source(ds, decode, int(ds.cardinality()), shard)


def _source(config, split: str, shard: bool, seed: int | None = None,
            subset: int | None = None):
  _check_name(config.name)
  if _folder_root(config.name) is not None:
    return _folder_source(config, split, shard, subset)
  return _tfds_source(config, split, shard, seed, subset)


def num_examples(config, split: str) -> int:
  """Examples in `split` over all processes (1 for one_image)."""
  src = _source(config, split, shard=False)
  if src.size < 0:
    raise errors.Invalid(f'{config.name}: the size of split {split!r} is '
                         f'unknown.')
  return src.size


def num_classes(config) -> int:
  """Number of labels (1 for one_image)."""
  _check_name(config.name)
  if _folder_root(config.name) is not None:
    return len(_folder_classes(config).class_names)
  if config.name == 'one_image':
    return 1
  return tfds.builder(config.name, data_dir=config.data_dir).info.features[
      'label'].num_classes


# Preprocessing.


def _eval_image(image, size: int):
  """Resize small images; resize-and-centre-crop (224/256) the others."""
  image = augment.to_rgb(image)
  shape = tf.shape(image)
  small = tf.minimum(shape[0], shape[1]) < _SMALL
  image = tf.cond(small, lambda: augment.resize(image, size),
                  lambda: augment.center_crop_eval(image, size))
  return augment.normalize(tf.reshape(image, [size, size, 3]))


def _train_image(image, seed, mode: str, config):
  """One training view of `image`, seeded by a [2] `seed`."""
  size = config.image_size
  if mode == 'none':
    return _eval_image(image, size)
  s_crop, s_flip, s_aug, s_erase = tf.unstack(augment.split_seed(seed, 4))
  scale = (config.min_scale or (0.2 if mode == 'pretrain' else 0.08),
           1.0)
  image = augment.to_rgb(image)
  image = augment.random_resized_crop(image, s_crop, size, scale=scale)
  if config.flip:
    image = augment.flip(image, s_flip)
  if mode == 'finetune' and config.randaug:
    image = augment.rand_augment(image, s_aug)
  image = augment.normalize(tf.reshape(image, [size, size, 3]))
  erase_prob = config.erase_prob
  if mode == 'finetune' and erase_prob > 0:
    image = augment.random_erasing(image, s_erase, prob=erase_prob)
  return image


def _options(config) -> tuple[tf.data.Options, int]:
  options = tf.data.Options()
  options.deterministic = True
  parallel = config.num_parallel
  return options, tf.data.AUTOTUNE if parallel in (-1, None) else parallel


def _numpy_iterator(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  for batch in ds.as_numpy_iterator():
    yield batch


def train_batches(config, mode: str, global_batch: int, seed: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of this process's rows: 'image' (b, S, S, 3) float32,
  normalised, and 'label' (b,) int32, from step `start_step` on."""
  mode = 'none' if mode == 'eval' else mode
  if mode not in MODES:
    raise errors.Invalid(f'Unknown mode {mode!r}: expected one of {MODES}.')
  local_batch = _local_batch(global_batch)
  if mode in ('finetune', 'linprobe') and _folder_root(config.name):
    _folder_classes(config)
  src = _source(config, config.train_split, shard=True, seed=seed)
  if src.size == 0:
    raise errors.Invalid(f'{config.name}: split {config.train_split!r} has no '
                         f'examples for process {jax.process_index()}.')
  options, parallel = _options(config)
  run_seed = tf.constant([seed, jax.process_index()], tf.int64)
  start = start_step * local_batch

  decode = src.decode

  def example(position, ex):
    image_seed = tf.random.experimental.stateless_fold_in(run_seed, position)
    image = _train_image(decode(ex['image']), image_seed, mode, config)
    return {'image': image, 'label': tf.cast(ex['label'], tf.int32)}

  if config.name == 'one_image':
    # One decoded image, an independent view of it at each position. The
    # seed follows the row's place in the *global* batch, so the stream does
    # not depend on the number of processes.
    raw = next(iter(src.ds))
    one = {'image': decode(raw['image']), 'label': raw['label']}
    decode = tf.identity
    run_seed = tf.constant([seed, 0], tf.int64)
    rows_before = jax.process_index() * local_batch

    def global_position(pos):
      step, row = pos // local_batch, pos % local_batch
      return step * global_batch + rows_before + row

    ds = tf.data.Dataset.counter(start).map(
        lambda pos: (global_position(pos), one))
  else:
    buffer = config.shuffle_buffer
    if src.size > 0:
      buffer = min(buffer, src.size)
    if _folder_root(config.name) is not None:
      buffer = src.size  # File names are cheap: shuffle them fully.

    def epoch(e):
      epoch_seed = tf.random.stateless_uniform(
          [], tf.stack([tf.constant(seed, tf.int64), e]), None, None, tf.int64)
      return src.ds.shuffle(buffer, seed=epoch_seed,
                            reshuffle_each_iteration=False)

    if src.size > 0:  # Start at the right epoch rather than skip whole ones.
      first, offset = divmod(start, src.size)
    else:
      first, offset = 0, start
    ds = tf.data.Dataset.counter(first).flat_map(epoch)
    ds = ds.enumerate(start=first * max(src.size, 0)).skip(offset)
  ds = ds.map(example, num_parallel_calls=parallel, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy_iterator(ds.with_options(options))


def eval_batches(config, global_batch: int, split: str | None = None,
                 limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split (or `split`) in batches of this process's
  rows, padded; 'valid' (b,) bool marks the real examples, each seen by one
  process once. `limit`: only that many of the split's examples, drawn with
  a fixed seed (SUBSET_SEED) from all of it, the same in every run."""
  return _numpy_iterator(eval_dataset(config, global_batch, split, limit))


def eval_dataset(config, global_batch: int, split: str | None = None,
                 limit: int | None = None) -> tf.data.Dataset:
  """`eval_batches` as a tf.data.Dataset: built once, read once per pass."""
  local_batch = _local_batch(global_batch)
  split = split or config.eval_split
  src = _source(config, split, shard=True, subset=limit)
  count = jax.process_count()
  if count == 1:
    per_process = src.size
  else:  # Shards differ by at most one example; every process pads to the max.
    total = num_examples(config, split)
    if limit is not None:
      total = min(total, limit)
    per_process = -(-total // count)
  if per_process < 0:
    raise errors.Invalid(f'{config.name}: the size of split {split!r} is '
                         f'unknown.')
  num_batches = -(-per_process // local_batch)
  size = config.image_size
  options, parallel = _options(config)

  def example(ex):
    return {'image': _eval_image(src.decode(ex['image']), size),
            'label': tf.cast(ex['label'], tf.int32),
            'valid': tf.constant(True)}

  ds = src.ds
  if not src.sharded and jax.process_index() > 0:
    ds = ds.take(0)  # Process 0 alone counts an unsharded split.
  pad = tf.data.Dataset.from_tensors({
      'image': tf.zeros([size, size, 3], tf.float32),
      'label': tf.constant(0, tf.int32), 'valid': tf.constant(False)}).repeat()
  ds = ds.map(example, num_parallel_calls=parallel, deterministic=True)
  ds = ds.concatenate(pad).take(num_batches * local_batch)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(options)
