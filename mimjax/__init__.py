"""mimjax: masked image modeling in JAX/Flax, as occlusion-invariant learning.

The Python API (docs/architecture.md): `mimjax.load_encoder(run)` gives a
trained encoder (`.module`, `.params`, `.config`, `.embed(images)`);
`mimjax.export(run, out_dir, hf_config=True)` writes its weights for
PyTorch. Both live in mimjax.convert and are imported on first use, so that
`import mimjax` stays free of jax.
"""

import importlib

__version__ = '0.1.0'

_API = {'load_encoder': 'mimjax.convert', 'export': 'mimjax.convert',
        'LoadedEncoder': 'mimjax.convert'}


def __getattr__(name):
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted([*globals(), *_API])
