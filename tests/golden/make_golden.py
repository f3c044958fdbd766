"""Regenerates the golden files from HF transformers and timm (needs torch).

    python tests/golden/make_golden.py        # all (timm too)
    python tests/golden/make_golden.py step   # step_*.npz only

step_{pretrain,finetune}.npz: the official recipes' runs of
tests/test_step_parity.py (torch and transformers).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_step_parity  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = {'tiny': 4, 'base16': 1}


def step_parity():
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  versions = (f'torch {torch.__version__}, transformers '
              f'{transformers.__version__}')
  for stage in ('pretrain', 'finetune'):
    np.savez_compressed(os.path.join(HERE, f'step_{stage}.npz'),
                        versions=np.array(versions),
                        **test_step_parity.golden(stage))
    print('wrote step', stage)


def main(argv):
  step_parity()
  if argv[1:] == ['step']:
    return
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  versions = (f'torch {torch.__version__}, transformers '
              f'{transformers.__version__}, timm {timm.__version__}')
  for name in reference.HF_CONFIGS:
    size = reference.HF_CONFIGS[name]['image_size']
    num_patches = (size // reference.HF_CONFIGS[name]['patch_size'])**2
    images = reference.images(BATCH[name], size)
    noise = np.random.default_rng(2).uniform(
        size=(BATCH[name], num_patches)).astype(np.float32)
    model, names = reference.hf_mae(name)
    out = reference.hf_outputs(model, images, noise)
    np.savez_compressed(os.path.join(HERE, f'hf_vitmae_{name}.npz'),
                        names=reference.pack_names(names), images=images,
                        noise=noise, versions=np.array(versions), **out)
    model, names = reference.timm_vit(name)
    np.savez_compressed(os.path.join(HERE, f'timm_vit_{name}.npz'),
                        names=reference.pack_names(names), images=images,
                        logits=reference.timm_logits(model, images),
                        versions=np.array(versions))
    print('wrote', name)


if __name__ == '__main__':
  main(sys.argv)
