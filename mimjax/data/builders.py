"""Two small tfds datasets that prepare offline.

`digits`: scikit-learn's 1,797 labelled 8x8 handwritten digits.
`one_image`: one photo (scikit-learn's china.jpg unless a path is given), as a
single-example 'train' split; `one_image_builder` makes a config per path.

Importing this module registers both names, so `tfds.builder('digits', ...)`
works afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os


import numpy as np
import tensorflow_datasets as tfds

from mimjax import errors

_DIGITS_TRAIN = 1497  # The remaining 300 of the 1,797 digits are 'test'.


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, 1,497 train / 300 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: load_digits, seed-0 split.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='8x8 greyscale digits from sklearn.datasets.load_digits, '
                    'scaled from 0..16 to 0..255.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    order = np.random.RandomState(0).permutation(1797)
    return {
        'train': self._generate_examples(order[:_DIGITS_TRAIN]),
        'test': self._generate_examples(order[_DIGITS_TRAIN:]),
    }

  def _generate_examples(self, indices):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i in indices:
      yield int(i), {'image': images[i][..., None],
                     'label': int(digits.target[i])}


@dataclasses.dataclass(eq=False)
class OneImageConfig(tfds.core.BuilderConfig):
  """Which photo to use; '' is scikit-learn's china.jpg."""

  path: str = ''


def load_photo(path: str = '') -> np.ndarray:
  """Reads `path` (or scikit-learn's china.jpg for '') as (H, W, 3) uint8."""
  if not path:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    return datasets.load_sample_image('china.jpg')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except (OSError, SyntaxError, ValueError) as e:  # PIL's "not an image"
    raise errors.Invalid(f'one_image: {path} is not an image PIL can read '
                         f'({type(e).__name__})') from None


class OneImage(tfds.core.GeneratorBasedBuilder):
  """A single photo as a one-example 'train' split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [OneImageConfig(name='china', description='china.jpg')]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='One RGB photo, for overfitting and visual checks.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    yield 0, {'image': load_photo(self.builder_config.path)}


def one_image_config(path: str = '') -> OneImageConfig:
  """A config named after a hash of `path` (its size and mtime included)."""
  if not path:
    return OneImage.BUILDER_CONFIGS[0]
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise errors.Invalid(f'one_image: no file at {path}.')
  st = os.stat(path)
  # Size and mtime in the hash: an edited file gets prepared afresh.
  key = f'{path}|{st.st_size}|{st.st_mtime_ns}'.encode()
  name = 'p' + hashlib.sha1(key).hexdigest()[:16]
  return OneImageConfig(name=name, path=path, description=path)


def one_image_builder(path: str = '', data_dir: str | None = None) -> OneImage:
  """The `one_image` builder for `path` ('' for china.jpg), not yet prepared."""
  return OneImage(config=one_image_config(path), data_dir=data_dir)
