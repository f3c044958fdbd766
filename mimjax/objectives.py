"""Loss functions for `mimjax.mim.MIM`, one signature::

    loss_fn(ctx: MIMContext) -> (scalar loss, dict of auxiliaries)

Each factory below returns such a function; its arguments are the knobs of
docs/objectives.md with the defaults given there.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mimjax.mim import MIMContext
from mimjax.models import vit

sg = jax.lax.stop_gradient


def masked_mse(pred, target, weights):
  """Per-patch mean squared error, averaged over positions with weight 1."""
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _views(ctx: MIMContext, count: int, name: str):
  if len(ctx.masks) < count:
    raise ValueError(f'{name} needs {count} views, the mask function gave '
                     f'{len(ctx.masks)}; use masking.complementary()')
  return ctx.masks[:count], ctx.latents[:count]


# ------------------------------------------------------------------- MAE


def mae(norm_pix: bool = True, hidden_only: bool = True):
  """L_MAE: pixel MSE of the decoder's prediction on the hidden patches."""

  def loss_fn(ctx: MIMContext):
    (mask,), (latent,) = _views(ctx, 1, 'mae')
    pred = ctx.decode(latent, mask)
    target = ctx.targets(norm_pix)
    weights = mask.mask if hidden_only else jnp.ones_like(mask.mask)
    return masked_mse(pred, target, weights), {'pred': pred}
  return loss_fn


# ------------------------------------------------------- siamese-form MAE


def siamese(norm_pix: bool = True, inner_steps: int = 1, inner_lr: float = 0.1,
            oracle: bool = False, unroll: bool = False):
  """L_siam: view A's prediction matched to d_φ'(z_B), φ' fitted to what B sees.

  φ' starts from φ and takes `inner_steps` SGD steps (rate `inner_lr`) on
  mean_{m=1} ‖d_φ'(z_B) − t(P(x))‖². With `unroll` the outer gradient flows
  through those steps; otherwise φ' is a constant of the outer step. With
  `oracle` the target is t(P(x)) itself and the loss is exactly L_MAE.
  """

  def loss_fn(ctx: MIMContext):
    (view_a, view_b), (z_a, z_b) = _views(ctx, 2, 'siamese')
    pred_a = ctx.decode(z_a, view_a)
    pixels = ctx.targets(norm_pix)
    aux = {'pred': pred_a}
    if oracle:
      target = pixels
    else:
      def inner_loss(phi):
        pred_b = ctx.decoder_apply(phi, z_b, view_b)
        return masked_mse(pred_b, pixels, view_a.mask)

      phi = ctx.decoder_params()
      for _ in range(inner_steps):
        grads = jax.grad(inner_loss)(phi)
        phi = jax.tree.map(lambda p, g: p - inner_lr * g, phi, grads)
      phi = phi if unroll else sg(phi)
      target = ctx.decoder_apply(phi, z_b, view_b)
      aux['inner_loss'] = inner_loss(sg(phi))
    return masked_mse(pred_a, target, view_a.mask), aux
  return loss_fn


# ------------------------------------------------------------------ R-MAE


def rmae(norm_pix: bool = True, lam: float = 1.0, share_decoder: bool = True,
         stop_gradient: bool = True, symmetric: bool = False):
  """L_R: siamese term against sg[d_φ'(z_B)] plus λ · autoencoding of B."""
  target_decoder = 'decoder' if share_decoder else 'target_decoder'

  def one_way(ctx, pixels, online, target):
    (view_o, z_o), (view_t, z_t) = online, target
    pred_o = ctx.decode(z_o, view_o)
    pred_t = ctx.decode(z_t, view_t, target_decoder)
    branch = sg(pred_t) if stop_gradient else pred_t
    siam = masked_mse(pred_o, branch, view_o.mask)
    recon = masked_mse(pred_t, pixels, view_o.mask)
    return siam + lam * recon, siam, recon, pred_o

  def loss_fn(ctx: MIMContext):
    views, latents = _views(ctx, 2, 'rmae')
    pixels = ctx.targets(norm_pix)
    a, b = zip(views, latents)
    loss, siam, recon, pred = one_way(ctx, pixels, a, b)
    if symmetric:
      loss_b, siam_b, recon_b, _ = one_way(ctx, pixels, b, a)
      loss, siam, recon = ((loss + loss_b) / 2, (siam + siam_b) / 2,
                           (recon + recon_b) / 2)
    return loss, {'pred': pred, 'siamese_loss': siam, 'recon_loss': recon}
  return loss_fn


# ------------------------------------------------------------------ C-MAE


class Projector(nn.Module):
  """MLP projector g: `depth` Dense layers, GELU between them."""
  out_dim: int = 256
  hidden: int = 2048
  depth: int = 2

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth - 1):
      x = nn.gelu(nn.Dense(self.hidden, name=f'fc{i}')(x), approximate=False)
    return nn.Dense(self.out_dim, name=f'fc{self.depth - 1}')(x)


def info_nce(queries, keys, temperature):
  """InfoNCE with positives on the diagonal; rows of q and k are the pairs.

  Under jit the arrays are global, so the negatives are every key of the
  global batch, across all devices.
  """
  q = _normalize(queries.reshape(-1, queries.shape[-1]))
  k = _normalize(keys.reshape(-1, keys.shape[-1]))
  logits = q @ k.T / temperature
  labels = jnp.arange(logits.shape[0])
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cmae(level: str = 'patch', temperature: float = 0.2, proj_dim: int = 256,
         proj_hidden: int = 2048, proj_depth: int = 2,
         stop_gradient_keys: bool = False, symmetric: bool = True,
         key_source: str = 'encoder', max_positions: int | None = None):
  """L_C: InfoNCE between the two complementary views.

  level='patch': query q_i = g(d_φ(z_A)_i) for each patch i hidden from A,
  key k_i = g'(z_B)_i from view B, which sees it (`key_source='decoder'` uses
  d_φ(z_B)_i). The decoder should have a feature head. `max_positions`
  samples that many positions per image to bound the logits matrix.
  level='image': q = g(pool(z_A)), k = g'(pool(z_B)).
  """
  if level not in ('patch', 'image'):
    raise ValueError(f"cmae level must be 'patch' or 'image', got {level!r}")
  if key_source not in ('encoder', 'decoder'):
    raise ValueError(f"key_source must be 'encoder' or 'decoder', got "
                     f'{key_source!r}')

  def patch_pairs(ctx, online, target):
    (view_o, z_o), (view_t, z_t) = online, target
    # Positions hidden from the online view = the target view's visible ids,
    # in the order of the target view's tokens.
    positions = view_t.ids_keep
    queries = vit.gather_tokens(ctx.decode(z_o, view_o), positions)
    if key_source == 'encoder':
      keys = z_t[:, 1:]
    else:
      keys = vit.gather_tokens(ctx.decode(z_t, view_t), positions)
    if max_positions is not None and max_positions < positions.shape[1]:
      noise = jax.random.uniform(ctx.rng(), positions.shape[:2])
      pick = jnp.argsort(noise, axis=1)[:, :max_positions]
      queries = vit.gather_tokens(queries, pick)
      keys = vit.gather_tokens(keys, pick)
    return queries, keys

  def image_pairs(ctx, online, target):
    (_, z_o), (_, z_t) = online, target
    return z_o[:, 1:].mean(axis=1), z_t[:, 1:].mean(axis=1)

  pairs = patch_pairs if level == 'patch' else image_pairs

  def loss_fn(ctx: MIMContext):
    views, latents = _views(ctx, 2, 'cmae')
    g = Projector(proj_dim, proj_hidden, proj_depth, name='projector')
    g_key = Projector(proj_dim, proj_hidden, proj_depth, name='key_projector')
    a, b = zip(views, latents)
    directions = [(a, b), (b, a)] if symmetric else [(a, b)]
    losses, num_keys = [], []
    for online, target in directions:
      queries, keys = pairs(ctx, online, target)
      keys = g_key(keys)
      keys = sg(keys) if stop_gradient_keys else keys
      losses.append(info_nce(g(queries), keys, temperature))
      num_keys.append(keys.size // keys.shape[-1])
    # Each query's candidates: its positive and every other key of the batch.
    return sum(losses) / len(losses), {'keys_per_direction': tuple(num_keys)}
  return loss_fn


# ---------------------------------------------------------------- SimSiam


def simsiam(proj_dim: int = 256, proj_hidden: int = 2048, pred_hidden: int = 512,
            symmetric: bool = True):
  """Negative cosine between a predictor's output and the other view's
  stop-gradient projection (SimSiam), on pooled encoder tokens."""

  def loss_fn(ctx: MIMContext):
    _, latents = _views(ctx, 2, 'simsiam')
    g = Projector(proj_dim, proj_hidden, 2, name='projector')
    h = Projector(proj_dim, pred_hidden, 2, name='predictor')
    z = [g(latent[:, 1:].mean(axis=1)) for latent in latents[:2]]
    p = [h(zi) for zi in z]
    cos = lambda u, v: jnp.mean(jnp.sum(_normalize(u) * _normalize(sg(v)), -1))
    loss = -cos(p[0], z[1])
    if symmetric:
      loss = (loss - cos(p[1], z[0])) / 2
    return loss, {}
  return loss_fn


REGISTRY = {'mae': mae, 'siamese': siamese, 'rmae': rmae, 'cmae': cmae,
            'simsiam': simsiam}


def get(name: str, **kwargs):
  """A loss function by name, with its knobs as keyword arguments."""
  if name not in REGISTRY:
    raise ValueError(f'unknown objective {name!r}; known: {sorted(REGISTRY)}')
  return REGISTRY[name](**kwargs)
