"""The README's "Writing your own objective" example runs and does what it says."""

import os
import re

import jax
import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'README.md')


def test_readme_example_runs_and_hides_the_left_half():
  text = open(README).read()
  code = re.search(r'## Writing your own objective.*?```python\n(.*?)```',
                   text, re.S).group(1)
  scope = {}
  exec(compile(code, README, 'exec'), scope)  # pylint: disable=exec-used
  assert np.isfinite(scope['loss'])
  (mask,) = scope['hide_left_half'](jax.random.key(0), 4, 64)
  hidden = np.asarray(mask.mask).reshape(4, 8, 8)
  np.testing.assert_array_equal(hidden[:, :, :4], 1)  # the left half
  assert hidden[:, :, 4:].sum() == 4 * (64 - 16 - 32)  # and random others
