"""Host-side input pipeline: tfds builders, TF augmentations, batches."""

import tensorflow as tf

# The input pipeline runs on the host; keep TensorFlow off any GPU JAX uses.
try:
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # Already initialised, or no such devices.
  pass

# pylint: disable=g-import-not-at-top,g-bad-import-order
from mimjax.data.augment import center_crop_eval
from mimjax.data.augment import flip
from mimjax.data.augment import mixup_cutmix
from mimjax.data.augment import normalize
from mimjax.data.augment import rand_augment
from mimjax.data.augment import random_erasing
from mimjax.data.augment import random_resized_crop
from mimjax.data.builders import Digits
from mimjax.data.builders import one_image_builder
from mimjax.data.builders import OneImage
from mimjax.data.builders import OneImageConfig
from mimjax.data.pipeline import eval_batches
from mimjax.data.pipeline import eval_dataset
from mimjax.data.pipeline import folder_info
from mimjax.data.pipeline import FolderInfo
from mimjax.data.pipeline import num_classes
from mimjax.data.pipeline import num_examples
from mimjax.data.pipeline import train_batches
