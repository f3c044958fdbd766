"""The MAE decoder: encoder tokens + mask tokens -> a prediction per patch."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mimjax import errors
from mimjax.models import vit


class Decoder(nn.Module):
  """d_φ: projects, fills hidden positions with a mask token, predicts per patch.

  `out_dim` is p*p*C for a pixel head or any D' for a feature head. Call with
  the encoder tokens (B, 1 + K, D), cls first, and the restore ids (B, L)
  of the view that produced them; returns (B, L, out_dim), cls dropped.
  """
  out_dim: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  scan: bool = False
  remat: bool = False
  dtype: Any = jnp.float32
  remat_policy: str = 'nothing_saveable'  # with remat (vit.REMAT_POLICIES)
  attention: str = 'xla'  # 'xla' or 'cudnn' (vit.resolve_attention)

  @nn.compact
  def __call__(self, tokens, ids_restore, grid: tuple[int, int], *,
               train: bool = False):
    b, num_tokens, _ = tokens.shape
    num_patches = ids_restore.shape[1]
    if grid[0] * grid[1] != num_patches:
      raise errors.Invalid(f'grid {grid} does not have {num_patches} patches')
    x = nn.Dense(self.width, dtype=self.dtype, name='embed',
                 kernel_init=vit.logical(vit.xavier, (None, 'embed')),
                 bias_init=vit.logical(nn.initializers.zeros,
                                       ('embed',)))(tokens)
    mask_token = self.param(
        'mask_token', vit.logical(vit.token_init, (None, None, 'embed')),
        (1, 1, self.width))
    num_hidden = num_patches + 1 - num_tokens
    fill = jnp.broadcast_to(mask_token, (b, num_hidden, self.width))
    patches = jnp.concatenate([x[:, 1:], fill.astype(x.dtype)], axis=1)
    patches = vit.gather_tokens(patches, ids_restore)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(vit.posemb_sincos_2d(grid, self.width),
                        x.dtype)[None]
    x = vit.constrain(x, ('batch', 'length', 'embed'))
    x, _ = vit.Transformer(
        self.depth, self.num_heads, self.mlp_ratio, self.norm_eps,
        scan=self.scan, remat=self.remat, dtype=self.dtype,
        remat_policy=self.remat_policy, attention=self.attention,
        name='transformer',
    )(x, train=train)
    x = vit.layer_norm('norm', self.norm_eps, self.dtype)(x)
    x = nn.Dense(self.out_dim, dtype=self.dtype, name='pred',
                 kernel_init=vit.logical(vit.xavier, ('embed', None)),
                 bias_init=vit.logical(nn.initializers.zeros, (None,)))(x)
    return x[:, 1:].astype(jnp.float32)
