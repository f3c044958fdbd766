"""Heads on the encoder: a fine-tuning classifier and a linear probe."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimjax import errors
from mimjax.models import vit


class Classifier(nn.Module):
  """ViT classifier: global average pool + norm ('gap'), or the cls token.

  'gap' follows the fine-tuned MAE / timm global-pool ViT: no final norm on
  the tokens, mean over patch tokens, then `fc_norm`. Returns logits and
  the pooled features.
  """
  encoder: vit.Encoder
  num_classes: int
  pool: str = 'gap'
  head_init_std: float = 2e-5

  def __post_init__(self):
    if self.pool not in ('gap', 'cls'):
      raise errors.Invalid(f"pool must be 'gap' or 'cls', got {self.pool!r}")
    # The final token norm exists only with the cls token ('gap' has fc_norm).
    if self.encoder.final_norm != (self.pool == 'cls'):
      object.__setattr__(self, 'encoder', self.encoder.clone(
          final_norm=self.pool == 'cls'))
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    tokens = self.encoder(images, train=train)['tokens']
    if self.pool == 'gap':
      feats = vit.layer_norm('fc_norm', self.encoder.norm_eps, jnp.float32)(
          tokens[:, 1:].mean(axis=1))
    else:
      feats = tokens[:, 0]
    logits = nn.Dense(
        self.num_classes, name='head',
        kernel_init=vit.logical(
            nn.initializers.truncated_normal(self.head_init_std),
            ('embed', 'classes')),
        bias_init=vit.logical(nn.initializers.zeros, ('classes',)))(feats)
    return logits.astype(jnp.float32), feats


class LinearProbe(nn.Module):
  """Frozen-encoder features -> BatchNorm without affine -> linear."""
  num_classes: int
  head_init_std: float = 0.01

  @nn.compact
  def __call__(self, features, *, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, use_bias=False,
                     use_scale=False, epsilon=1e-6, momentum=0.9,
                     name='bn')(features)
    return nn.Dense(
        self.num_classes, name='head',
        kernel_init=nn.initializers.truncated_normal(self.head_init_std),
    )(x)


class ProbedEncoder(nn.Module):
  """Frozen encoder (cls token after the final norm) -> `LinearProbe`."""
  encoder: vit.Encoder
  num_classes: int

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    features = self.encoder(images)['tokens'][:, 0]
    return LinearProbe(self.num_classes, name='probe')(
        jax.lax.stop_gradient(features), train=train)
