"""Command-line tools: memory check (memcheck), collectives and FLOP model
(scaling)."""

import os

from absl import flags
from absl import logging


def simulate_devices(argv):
  """With --devices=N among `argv`, N simulated CPU devices: call before jax
  opens a backend."""
  for arg in argv:
    if arg.startswith('--devices='):
      count = int(arg.split('=', 1)[1])
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={count}')
      os.environ['JAX_PLATFORMS'] = 'cpu'


def quiet_logs():
  """Library INFO logs (jax's backend probing and the like) stay off the
  console unless --verbosity is given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
