import os
import sys

# Tests import the shared reference helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
