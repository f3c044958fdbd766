"""Tests for mimjax.data: builders, augmentations and batch iterators."""

import collections
import hashlib

# mimjax.data before TensorFlow: it loads triton first (see its __init__).
from mimjax import config as config_lib
from mimjax import data
from mimjax.data import augment

import jax  # pylint: disable=g-bad-import-order
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A tfds data dir with `digits` prepared."""
  path = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=path).download_and_prepare()
  return path


def _config(data_dir, **kwargs):
  config = config_lib.data_config()
  config.data_dir = data_dir
  config.update(kwargs)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _hashes(images):
  return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
          for x in images]


def test_digits_builder(data_dir):
  builder = tfds.builder('digits', data_dir=data_dir)
  assert builder.is_prepared()
  assert str(builder.version) == '1.0.0' and builder.info.release_notes
  splits = builder.info.splits
  assert splits['train'].num_examples == 1497
  assert splits['test'].num_examples == 300
  examples = list(tfds.as_numpy(builder.as_dataset(split='train')))
  images = np.stack([e['image'] for e in examples])
  labels = np.array([e['label'] for e in examples])
  assert images.shape == (1497, 8, 8, 1) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0
  assert set(labels) == set(range(10))
  config = _config(data_dir)
  assert data.num_examples(config, 'test') == 300
  assert data.num_classes(config) == 10


def test_one_image_independent_crops(data_dir):
  config = _config(data_dir, name='one_image', image_size=48)
  first, second = _take(data.train_batches(config, 'pretrain', 4, seed=0), 2)
  assert first['image'].shape == (4, 48, 48, 3)
  assert first['image'].dtype == np.float32
  assert (first['label'] == 0).all() and first['label'].dtype == np.int32
  assert not np.array_equal(first['image'], second['image'])
  assert not np.array_equal(first['image'][0], first['image'][1])
  assert data.num_examples(config, 'train') == 1
  (batch,) = list(data.eval_batches(config, 2))
  assert batch['valid'].tolist() == [True, False]


def test_one_image_builder_from_file(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'photo.png'
  Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(path)
  builder = data.one_image_builder(str(path), str(tmp_path / 'tfds'))
  assert builder.builder_config.name != 'china'
  builder.download_and_prepare()
  (example,) = tfds.as_numpy(builder.as_dataset(split='train'))
  assert example['image'].shape == (20, 30, 3)


@pytest.mark.parametrize('mode', ['pretrain', 'finetune'])
def test_resume_is_bitwise(data_dir, mode):
  config = _config(data_dir, image_size=16)
  run = _take(data.train_batches(config, mode, 8, seed=3), 4)
  resumed = next(data.train_batches(config, mode, 8, seed=3, start_step=3))
  assert _same(run[3], resumed)
  assert not _same(run[2], run[3])


def test_same_seed_same_batches_across_epochs(data_dir):
  config = _config(data_dir, image_size=12)
  # 100 rows a step: step 14 straddles the end of the first epoch (1,497).
  run = _take(data.train_batches(config, 'pretrain', 100, seed=1), 17)
  again = _take(data.train_batches(config, 'pretrain', 100, seed=1), 17)
  assert all(_same(a, b) for a, b in zip(run, again))
  resumed = _take(
      data.train_batches(config, 'pretrain', 100, seed=1, start_step=14), 3)
  assert all(_same(a, b) for a, b in zip(run[14:], resumed))
  other = next(data.train_batches(config, 'pretrain', 100, seed=2))
  assert not np.array_equal(other['image'], run[0]['image'])


def test_each_epoch_visits_every_example_once(data_dir):
  # 'none' mode is deterministic, so images can be matched to the split's.
  config = _config(data_dir, image_size=8, eval_split='train')
  batches = _take(data.train_batches(config, 'none', 499, seed=0), 6)
  stream = np.concatenate([b['image'] for b in batches])
  reference = np.concatenate(
      [b['image'] for b in data.eval_batches(config, 499)])
  want = collections.Counter(_hashes(reference))
  epoch0, epoch1 = _hashes(stream[:1497]), _hashes(stream[1497:])
  assert collections.Counter(epoch0) == want
  assert collections.Counter(epoch1) == want
  assert epoch0 != epoch1  # Reshuffled.


def test_eval_covers_test_split_once(data_dir):
  config = _config(data_dir, image_size=8)
  batches = list(data.eval_batches(config, 64))
  assert len(batches) == 5
  assert all(b['image'].shape == (64, 8, 8, 3) for b in batches)
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.sum() == 300 and valid[:300].all()


def test_two_processes_share_the_data(data_dir, monkeypatch):
  config = _config(data_dir, image_size=8)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  labels, images, rows = [], [], []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda i=index: i)
    batches = list(data.eval_batches(config, 64))
    rows.append(sum(len(b['valid']) for b in batches))
    labels += [b['label'][b['valid']] for b in batches]
    images += [b['image'][b['valid']] for b in batches]
    train = next(data.train_batches(config, 'none', 8, seed=0))
    assert train['image'].shape == (4, 8, 8, 3)
  assert rows == [160, 160]  # 150 examples each, padded to 5 batches of 32.
  _one_line_error(lambda: data.train_batches(config, 'pretrain', 9, 0),
                  'Global batch 9', '2')
  monkeypatch.undo()
  whole = np.concatenate(
      [b['image'][b['valid']] for b in data.eval_batches(config, 64)])
  assert collections.Counter(_hashes(np.concatenate(images))) == (
      collections.Counter(_hashes(whole)))
  assert len(np.concatenate(labels)) == 300


@pytest.mark.parametrize('name,split,mode,size', [
    ('imagenet2012', 'validation', 'pretrain', 64),
    ('cifar10', 'test', 'finetune', 32),
])
def test_tfds_mock_end_to_end(name, split, mode, size):
  config = _config(None, name=name, eval_split=split, image_size=size)
  with tfds.testing.mock_data(num_examples=6):
    train = _take(data.train_batches(config, mode, 4, seed=0), 3)
    evals = list(data.eval_batches(config, 4))
  assert train[-1]['image'].shape == (4, size, size, 3)
  assert np.isfinite(train[-1]['image']).all()
  assert sum(int(b['valid'].sum()) for b in evals) == 6
  assert all(b['image'].shape == (4, size, size, 3) for b in evals)


def test_image_folder_skips_corrupt_files(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for c, name in enumerate(['cat', 'dog']):
    (tmp_path / name).mkdir()
    for i in range(3):
      pixels = rng.integers(0, 255, (10 + i, 12, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(tmp_path / name / f'{c}{i}.png')
  (tmp_path / 'dog' / 'broken.jpg').write_bytes(rng.bytes(300))
  (tmp_path / 'dog' / 'notes.txt').write_text('ignored')
  config = _config(None, name=f'folder:{tmp_path}', image_size=16)
  info = data.folder_info(str(tmp_path), 'train')
  assert info.num_skipped == 1 and info.skipped[0].endswith('broken.jpg')
  assert info.class_names == ('cat', 'dog') and len(info.paths) == 6
  assert data.num_classes(config) == 2
  # No test/: data.holdout (10%) of the 6 is held out for evaluation.
  assert data.num_examples(config, 'train') == 5
  assert data.num_examples(config, 'test') == 1
  batch = next(data.train_batches(config, 'finetune', 4, seed=0))
  assert batch['image'].shape == (4, 16, 16, 3)
  labels = np.concatenate([b['label'][b['valid']]
                           for split in ('train', 'test')
                           for b in data.eval_batches(config, 4, split)])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def _one_line_error(fn, *words):
  with pytest.raises(ValueError) as e:
    fn()
  message = str(e.value)
  assert '\n' not in message
  for word in words:
    assert word in message
  return message


def test_errors_are_one_line(tmp_path):
  config = _config(str(tmp_path), name='nope')
  _one_line_error(lambda: data.train_batches(config, 'pretrain', 4, 0), 'nope')
  config.name = f'folder:{tmp_path / "missing"}'
  _one_line_error(lambda: data.eval_batches(config, 4), 'missing')
  (tmp_path / 'empty').mkdir()
  config.name = f'folder:{tmp_path / "empty"}'
  _one_line_error(lambda: data.num_classes(config), 'class sub-folders')
  config.name = 'imagenet2012'
  _one_line_error(lambda: data.train_batches(config, 'pretrain', 4, 0),
                  'imagenet2012', str(tmp_path), 'ILSVRC2012_img_train.tar',
                  'downloads/manual')
  config.name = 'digits'
  config.prepare = False
  _one_line_error(lambda: data.eval_batches(config, 4), 'digits', 'prepare')
  if jax.process_count() == 1:
    config.prepare = True
    _one_line_error(lambda: data.train_batches(config, 'pretrain', 0, 0),
                    'Global batch')


def test_mixup_cutmix():
  images = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3))
  onehot = jax.nn.one_hot(jnp.arange(6) % 4, 4)
  mix = jax.jit(augment.mixup_cutmix)
  for seed in range(4):
    out, soft = mix(jax.random.key(seed), images, onehot)
    assert out.shape == images.shape and soft.shape == onehot.shape
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
  out, soft = augment.mixup_cutmix(jax.random.key(0), images, onehot,
                                   mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(soft, onehot * 0.9 + 0.1 / 4, rtol=1e-6)


@pytest.mark.parametrize('alpha,cutmix_alpha', [(0.8, 0.0), (1.0, 0.0),
                                                (0.8, 1.0)])
def test_mixup_lambda_is_beta_distributed(alpha, cutmix_alpha):
  """Mixup's weight is Beta(alpha, alpha), as timm draws it (mimjax draws
  it from two gammas at once), also where cutmix could have been chosen
  and its alpha must not be used (switch_prob 0: always mixup)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  images = jnp.zeros((2, 4, 4, 3))
  onehot = jnp.eye(2)
  lam = jax.vmap(lambda k: augment.mixup_cutmix(
      k, images, onehot, mixup_alpha=alpha, cutmix_alpha=cutmix_alpha,
      switch_prob=0.0, label_smoothing=0.0)[1][0, 0])(
          jax.random.split(jax.random.key(0), 4000))
  assert stats.kstest(np.asarray(lam), 'beta', args=(alpha, alpha)).pvalue > 1e-3


def test_cutmix_only_pastes_mirrored_rows():
  images = jnp.arange(4, dtype=jnp.float32)[:, None, None, None] * jnp.ones(
      (4, 8, 8, 1))
  onehot = jax.nn.one_hot(jnp.arange(4), 4)
  out, soft = augment.mixup_cutmix(jax.random.key(1), images, onehot,
                                   mixup_alpha=0.0, label_smoothing=0.0)
  for i in range(4):
    pasted = np.mean(np.asarray(out[i]) == 3 - i)
    np.testing.assert_allclose(soft[i, 3 - i], pasted, rtol=1e-6)


def test_rand_augment_and_erasing_are_seeded():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (24, 24, 3)),
                      tf.uint8)
  rand_augment = tf.function(lambda x, s: augment.rand_augment(x, s))
  erase = tf.function(lambda x, s: augment.random_erasing(x, s, prob=1.0))
  seeds = [tf.constant([0, i], tf.int64) for i in range(6)]
  outs = [rand_augment(image, s).numpy() for s in seeds]
  assert all(o.dtype == np.uint8 and o.shape == (24, 24, 3) for o in outs)
  np.testing.assert_array_equal(outs[0], rand_augment(image, seeds[0]).numpy())
  assert any(not np.array_equal(o, image.numpy()) for o in outs)
  normed = augment.normalize(image)
  erased = [erase(normed, s).numpy() for s in seeds[:3]]
  np.testing.assert_array_equal(erased[0], erase(normed, seeds[0]).numpy())
  assert any((e != normed.numpy()).any() for e in erased)


def test_greyscale_and_geometry():
  grey = tf.zeros([8, 8, 1], tf.uint8)
  assert augment.to_rgb(grey).shape == (8, 8, 3)
  seed = tf.constant([1, 2], tf.int64)
  crop = augment.random_resized_crop(tf.ones([30, 40, 3]) * 300, seed, 12)
  assert crop.shape == (12, 12, 3) and float(tf.reduce_max(crop)) == 255.0
  centre = augment.center_crop_eval(tf.ones([100, 80, 3]), 32)
  assert centre.shape == (32, 32, 3)
  flipped = augment.flip(tf.reshape(tf.range(6.0), [1, 6, 1]), seed)
  assert sorted(flipped.numpy().ravel().tolist()) == list(range(6))


# RandAugment against the reference: timm 'rand-m9-mstd0.5-inc1' with MAE's
# hparams (bicubic, img_mean fill), whose ops are PIL's.

TIMM_INCREASING_OPS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
    'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
    'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']


def _test_images():
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (21, 26, 3)).astype(np.uint8)
  rows, cols = np.mgrid[0:21, 0:26]
  ramp = np.stack([cols * 9, rows * 11, (rows + cols) * 5], -1)
  return [noise, np.clip(ramp, 0, 255).astype(np.uint8)]


def test_rand_augment_op_set_and_levels_are_timms():
  assert [name for name, *_ in augment.RAND_AUGMENT_OPS] == TIMM_INCREASING_OPS
  assert augment.FILL_RGB == (124, 116, 104)  # round(255 * ImageNet mean)
  levels = {name: fn for name, _, fn in augment.RAND_AUGMENT_OPS}
  m = tf.constant(9.0)
  plus, minus = tf.constant(False), tf.constant(True)
  # timm's 'increasing' level functions at magnitude 9 (of 10).
  want = {'Rotate': 27.0, 'PosterizeIncreasing': 4 - 3,
          'SolarizeIncreasing': 256 - 230, 'SolarizeAdd': 99,
          'ColorIncreasing': 1.81, 'SharpnessIncreasing': 1.81,
          'ShearX': 0.27, 'TranslateYRel': 0.405}
  for name, value in want.items():
    np.testing.assert_allclose(float(levels[name](m, plus)), value, rtol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(float(levels['Rotate'](m, minus)), -27.0)
  np.testing.assert_allclose(float(levels['ContrastIncreasing'](m, minus)),
                             0.19, rtol=1e-6)
  assert int(levels['SolarizeAdd'](tf.constant(10.0), plus)) == 110


def test_invert_and_solarize_add():
  x = tf.constant([[[0, 1, 99], [127, 128, 255]]], tf.uint8)
  np.testing.assert_array_equal(augment.invert(x), 255 - x.numpy())
  # Values below 128 get + add, capped at 255; the others are kept.
  np.testing.assert_array_equal(augment.solarize_add(x, 110),
                                [[[110, 111, 209], [237, 128, 255]]])
  np.testing.assert_array_equal(augment.solarize_add(x, 0), x)


def test_rotate_fills_with_the_imagenet_mean():
  white = tf.fill([32, 32, 3], tf.constant(255, tf.uint8))
  out = augment.rotate(white, tf.constant(30.0)).numpy()
  for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
    np.testing.assert_array_equal(corner, [124, 116, 104])
  np.testing.assert_array_equal(out[12:20, 12:20], 255)


@pytest.mark.parametrize('name,level', [
    ('rotate', 27.3), ('rotate', -13.0), ('shear_x', 0.27), ('shear_y', -0.11),
    ('translate_x', 0.41), ('translate_y', -0.2)])
def test_geometric_ops_are_pil_bicubic(name, level):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  level = float(np.float32(level))  # The op sees a float32 level.
  op = getattr(augment, name)
  for image in _test_images():
    pil = Image.fromarray(image)
    w, h = pil.size
    coeffs = {'shear_x': (1, level, 0, 0, 1, 0),
              'shear_y': (1, 0, 0, level, 1, 0),
              'translate_x': (1, 0, level * w, 0, 1, 0),
              'translate_y': (1, 0, 0, 0, 1, level * h)}.get(name)

    def ref(resample, pil=pil, coeffs=coeffs):
      kwargs = {'resample': resample, 'fillcolor': augment.FILL_RGB}
      if coeffs is None:
        return np.asarray(pil.rotate(level, **kwargs))
      return np.asarray(pil.transform(pil.size, Image.Transform.AFFINE,
                                      coeffs, **kwargs))

    ours = op(tf.constant(image), tf.constant(level, tf.float32)).numpy()
    bicubic = ref(Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(ours, bicubic, err_msg=name)
    assert not np.array_equal(ours, ref(Image.Resampling.BILINEAR))


def test_pixel_ops_match_pil():
  # pylint: disable-next=g-import-not-at-top
  from PIL import Image, ImageEnhance, ImageOps
  for image in _test_images():
    pil = Image.fromarray(image)
    x = tf.constant(image)
    pairs = [(augment.autocontrast(x), ImageOps.autocontrast(pil)),
             (augment.equalize(x), ImageOps.equalize(pil)),
             (augment.invert(x), ImageOps.invert(pil)),
             (augment.solarize(x, 100.0), ImageOps.solarize(pil, 100)),
             (augment.posterize(x, 2), ImageOps.posterize(pil, 2))]
    for factor in (0.19, 0.6, 1.81):
      for ours, enhance in [(augment.color, ImageEnhance.Color),
                            (augment.contrast, ImageEnhance.Contrast),
                            (augment.brightness, ImageEnhance.Brightness),
                            (augment.sharpness, ImageEnhance.Sharpness)]:
        pairs.append((ours(x, tf.constant(factor)),
                      enhance(pil).enhance(float(np.float32(factor)))))
    for i, (ours, ref) in enumerate(pairs):
      np.testing.assert_array_equal(ours.numpy(), np.asarray(ref),
                                    err_msg=str(i))
