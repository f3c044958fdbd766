"""jit options that make tiny test programs compile several times faster."""

import os

import jax
import numpy as np


def _fast_compile_options():
  """Tiny programs compile several times faster without XLA's expensive CPU
  passes (the numbers do not change beyond float rounding); {} where this
  XLA does not know the options."""
  options = {'xla_backend_optimization_level': 0,
             'xla_llvm_disable_expensive_passes': True,
             'xla_cpu_use_fusion_emitters': False}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options)(np.zeros(()))
  except Exception:  # pylint: disable=broad-except
    return {}
  return options


FAST = _fast_compile_options()


def fast_xla_flags(flags: str = '') -> str:
  """FAST as XLA_FLAGS after `flags`, for tests that run a subprocess
  (compile times there are reported or waited for, never judged)."""
  fast = ' '.join(f'--{k}={str(v).lower() if isinstance(v, bool) else v}'
                  for k, v in FAST.items())
  return f'{flags} {fast}'.strip()


def fast_env(env=None) -> dict:
  """A copy of `env` (this process's environment if None) whose XLA_FLAGS
  end with FAST, for a subprocess whose compile times are not judged."""
  env = dict(os.environ if env is None else env)
  env['XLA_FLAGS'] = fast_xla_flags(env.get('XLA_FLAGS', ''))
  return env
