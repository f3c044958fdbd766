"""Models, mask functions and meshes built from a config (configs/, config.py).

The registries stay next to what they name: masks in `masking`, views in
`views`, objectives in `objectives`; this module only reads a config.
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

from mimjax import masking, mim, objectives, sharding, views
from mimjax.models import Classifier, Decoder, Encoder, ProbedEncoder, vit


def setup(config):
  """The mesh and logical-axis rules a config asks for; logs the attention
  the stage's models run (`attention`)."""
  mesh = sharding.config_mesh(config)
  platform = mesh.devices.flat[0].platform
  choice, why = vit.resolve_attention(attention_choice(config.model),
                                      config.model.dtype, platform)
  logging.info('attention: %s (%s)', choice, why)
  return mesh, sharding.rules_from(config.sharding_rules)


def remat_policy(model_cfg) -> str:
  """model.remat_policy; a config saved before the key existed means
  jax's default (nothing saved)."""
  return model_cfg.get('remat_policy', 'nothing_saveable')


def attention_choice(model_cfg) -> str:
  """model.attention; a config saved before the key existed means 'auto'."""
  return model_cfg.get('attention', 'auto')


def attention(model_cfg) -> str:
  """The attention the models run, 'xla' or 'cudnn': model.attention
  resolved for this process's devices (vit.resolve_attention)."""
  return vit.resolve_attention(attention_choice(model_cfg), model_cfg.dtype,
                               jax.devices()[0].platform)[0]


def encoder(model_cfg, **overrides) -> Encoder:
  return Encoder(patch_size=model_cfg.patch_size, **vit.preset(model_cfg.size),
                 norm_eps=model_cfg.norm_eps, scan=model_cfg.scan,
                 remat=model_cfg.remat, remat_policy=remat_policy(model_cfg),
                 dtype=jnp.dtype(model_cfg.dtype),
                 attention=attention(model_cfg), **overrides)


def grid(config, image_size: int) -> tuple[int, int]:
  return (image_size // config.model.patch_size,) * 2


def mim_model(config) -> mim.MIM:
  """The pre-training model: encoder, decoder, views, masks and loss."""
  c = config.pretrain
  dec = c.decoder
  decoder = Decoder(out_dim=dec.out_dim or config.model.patch_size**2 * 3,
                    width=dec.width, depth=dec.depth, num_heads=dec.num_heads,
                    norm_eps=config.model.norm_eps, scan=config.model.scan,
                    remat=config.model.remat,
                    remat_policy=remat_policy(config.model),
                    dtype=jnp.dtype(config.model.dtype),
                    attention=attention(config.model))
  view_fn = views.get(c.views, **c.view_kwargs.to_dict())
  # Masks for every crop; without crops, two-view masks give two.
  num_views = views.layout(view_fn)[0] if view_fn else 2
  mask_fn = masking.get(c.mask, c.mask_ratio, grid(config, c.data.image_size),
                        num_views)
  return mim.MIM(encoder(config.model), decoder, mask_fn,
                 objectives.get(c.objective, **c.objective_kwargs.to_dict()),
                 view_fn)


def classifier(config, num_classes: int, drop_path: float = 0.0) -> Classifier:
  return Classifier(encoder(config.model, posemb='learn', drop_path=drop_path),
                    num_classes, pool=config.finetune.pool)


def probe(config, num_classes: int) -> ProbedEncoder:
  return ProbedEncoder(encoder(config.model), num_classes)
