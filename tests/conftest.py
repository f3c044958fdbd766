import os
import sys

# Tests import the shared reference helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

# A CUDA build of torch brings triton, whose native library crashes the
# process when it loads after TensorFlow's: load it first when present.
try:
  import triton  # pylint: disable=unused-import
except Exception:  # pylint: disable=broad-except
  pass
