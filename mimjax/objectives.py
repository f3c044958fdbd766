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

from mimjax import errors
from mimjax import masking
from mimjax.mim import MIMContext
from mimjax.models import vit

sg = jax.lax.stop_gradient


def masked_mse(pred, target, weights):
  """Per-patch mean squared error, averaged over positions with weight 1."""
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _views(ctx: MIMContext, count: int, name: str):
  if len(ctx.masks) < count:
    raise errors.Invalid(f'{name} needs {count} views, the mask function gave '
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


def siamese(norm_pix: bool = True, inner_steps: int = 1, inner_lr: float = 1e-3,
            stop_gradient: bool = True, oracle: bool = False):
  """L_siam (Eq. 7): view A's prediction matched to d_φ'(z_B), where φ'
  tracks argmin_φ' mse(d_φ'(z_B), t(P(x))) on the patches A hides and B sees.

  φ' is a persistent second decoder with its own Adam state (rate
  `inner_lr`), kept in the 'inner' variable collection: it starts as φ's
  initial value, is warm-started from its previous value at every outer
  step and takes `inner_steps` updates on the inner loss (z_B held fixed)
  before the outer loss uses it. φ' never receives the outer gradient.
  `stop_gradient`: sg[d_φ'(z_B)], so the encoder learns through view A
  only; off, the outer gradient also reaches the encoder through z_B.
  `aux['inner_loss']`: the inner loss after the updates. With `oracle` the
  target is t(P(x)) itself and the loss is exactly L_MAE.
  """
  inner_tx = optax.adam(inner_lr)

  def loss_fn(ctx: MIMContext):
    if oracle:
      (view_a,), (z_a,) = _views(ctx, 1, 'siamese')
      pred_a = ctx.decode(z_a, view_a)
      return masked_mse(pred_a, ctx.targets(norm_pix), view_a.mask), {
          'pred': pred_a}
    (view_a, view_b), (z_a, z_b) = _views(ctx, 2, 'siamese')
    ctx.require_aligned('siamese')
    pred_a = ctx.decode(z_a, view_a)
    weights = masking.hidden_and_seen(view_a, view_b)
    pixels = ctx.targets(norm_pix, view=1)
    module = ctx.module
    if not (module.is_initializing() or
            module.has_variable('inner', 'phi_prime')):
      raise errors.Invalid("siamese keeps φ' in the 'inner' variable "
                           'collection: apply with the variables init '
                           "returned ({'params': ..., 'inner': ...}) and "
                           "mutable=['inner']")
    phi = module.variable('inner', 'phi_prime',
                          lambda: nn.meta.unbox(ctx.decoder_params()))
    opt = module.variable('inner', 'opt_state',
                          lambda: inner_tx.init(phi.value))

    def inner_loss(params):
      return masked_mse(ctx.decoder_apply(params, sg(z_b), view_b), pixels,
                        weights)

    params, opt_state = phi.value, opt.value
    if module.is_mutable_collection('inner') and not module.is_initializing():
      for _ in range(inner_steps):
        grads = jax.grad(inner_loss)(params)
        updates, opt_state = inner_tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
      phi.value, opt.value = params, opt_state
    target = ctx.decoder_apply(params, z_b, view_b)
    aux = {'pred': pred_a,
           'inner_loss': masked_mse(sg(target), pixels, weights)}
    target = sg(target) if stop_gradient else target
    return masked_mse(pred_a, target, weights), aux
  return loss_fn


# ------------------------------------------------------------------ R-MAE


def rmae(norm_pix: bool = True, lam: float = 1.0, share_decoder: bool = True,
         stop_gradient: bool = True, symmetric: bool = False):
  """L_R: siamese term against sg[d_φ'(z_B)] plus λ · autoencoding of B, both
  on the patches A hides and B sees."""
  target_decoder = 'decoder' if share_decoder else 'target_decoder'

  def one_way(ctx, online, target):
    (view_o, z_o, i_o), (view_t, z_t, i_t) = online, target
    del i_o
    weights = masking.hidden_and_seen(view_o, view_t)
    pred_o = ctx.decode(z_o, view_o)
    pred_t = ctx.decode(z_t, view_t, target_decoder)
    branch = sg(pred_t) if stop_gradient else pred_t
    siam = masked_mse(pred_o, branch, weights)
    recon = masked_mse(pred_t, ctx.targets(norm_pix, view=i_t), weights)
    return siam + lam * recon, siam, recon, pred_o, pred_t

  def loss_fn(ctx: MIMContext):
    views, latents = _views(ctx, 2, 'rmae')
    ctx.require_aligned('rmae')
    a, b = zip(views, latents, (0, 1))
    loss, siam, recon, pred, pred_t = one_way(ctx, a, b)
    if symmetric:
      loss_b, siam_b, recon_b, _, _ = one_way(ctx, b, a)
      loss, siam, recon = ((loss + loss_b) / 2, (siam + siam_b) / 2,
                           (recon + recon_b) / 2)
    return loss, {'pred': pred, 'target_pred': pred_t, 'siamese_loss': siam,
                  'recon_loss': recon}
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


def info_nce(queries, keys, temperature, weights=None):
  """InfoNCE with positives on the diagonal; rows of q and k are the pairs.

  Under jit the arrays are global, so the negatives are every key of the
  global batch, across all devices. `weights` (same leading shape, 0 or 1)
  drops pairs: a 0 row's key is no candidate and its query does not count.
  """
  q = _normalize(queries.reshape(-1, queries.shape[-1]))
  k = _normalize(keys.reshape(-1, keys.shape[-1]))
  logits = q @ k.T / temperature
  labels = jnp.arange(logits.shape[0])
  if weights is None:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  w = weights.reshape(-1).astype(logits.dtype)
  logits = jnp.where(w[None, :] > 0, logits, -1e9)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def grid_tokens(latent, mask: masking.Mask):
  """A view's encoder tokens (B, 1 + K, D) on the patch grid (B, L, D), in
  grid order, zero where the view hides the patch."""
  tokens = latent[:, 1:]
  b, k, d = tokens.shape
  hidden = jnp.zeros((b, mask.mask.shape[1] - k, d), tokens.dtype)
  return vit.gather_tokens(jnp.concatenate([tokens, hidden], 1),
                           mask.ids_restore)


def patch_positions(weights, count: int, noise=None):
  """(B, count) positions per image: those with weight 1 first, in grid
  order, or in random order given `noise` (B, L) (sampling)."""
  length = weights.shape[1]
  tie = (jnp.arange(length) / (2 * length) if noise is None else noise * 0.5)
  return jnp.argsort((1.0 - weights) + tie, axis=1)[:, :count]


def cmae(level: str = 'patch', temperature: float = 0.2, proj_dim: int = 256,
         proj_hidden: int = 2048, proj_depth: int = 2,
         stop_gradient_keys: bool = False, symmetric: bool = True,
         key_source: str = 'encoder', max_positions: int | None = None):
  """L_C: InfoNCE between two views.

  level='patch': for each position i hidden from A and seen by B
  (`masking.hidden_and_seen`), query q_i = g(d_φ(z_A)_i) and key
  k_i = g'(z_B)_i, B's encoder token at i (`key_source='decoder'`:
  d_φ(z_B)_i). The decoder should have a feature head. Each image uses as
  many positions as B sees (`max_positions`: that many, sampled), and a
  position that A does not hide or B does not see is neither a query nor a
  key. The views must be aligned (no crops): position i is the same patch.
  level='image': q = g(pool(z_A)), k = g'(pool(z_B)), for any views.
  """
  if level not in ('patch', 'image'):
    raise errors.Invalid(f"cmae level must be 'patch' or 'image', got "
                         f'{level!r}')
  if key_source not in ('encoder', 'decoder'):
    raise errors.Invalid(f"key_source must be 'encoder' or 'decoder', got "
                         f'{key_source!r}')

  def patch_pairs(ctx, online, target):
    (view_o, z_o), (view_t, z_t) = online, target
    weights = masking.hidden_and_seen(view_o, view_t)
    count = view_t.num_visible
    noise = None
    if max_positions is not None and max_positions < count:
      count = max_positions
      noise = jax.random.uniform(ctx.rng(), weights.shape)
    pick = patch_positions(weights, count, noise)
    queries = vit.gather_tokens(ctx.decode(z_o, view_o), pick)
    keys = (grid_tokens(z_t, view_t) if key_source == 'encoder' else
            ctx.decode(z_t, view_t))
    return (queries, vit.gather_tokens(keys, pick),
            jnp.take_along_axis(weights, pick, axis=1))

  def image_pairs(ctx, online, target):
    (_, z_o), (_, z_t) = online, target
    return z_o[:, 1:].mean(axis=1), z_t[:, 1:].mean(axis=1), None

  pairs = patch_pairs if level == 'patch' else image_pairs

  def loss_fn(ctx: MIMContext):
    views, latents = _views(ctx, 2, 'cmae')
    if level == 'patch':
      ctx.require_aligned("cmae level='patch'")
    g = Projector(proj_dim, proj_hidden, proj_depth, name='projector')
    g_key = Projector(proj_dim, proj_hidden, proj_depth, name='key_projector')
    a, b = zip(views, latents)
    directions = [(a, b), (b, a)] if symmetric else [(a, b)]
    losses, num_keys = [], []
    for online, target in directions:
      queries, keys, weights = pairs(ctx, online, target)
      keys = g_key(keys)
      keys = sg(keys) if stop_gradient_keys else keys
      losses.append(info_nce(g(queries), keys, temperature, weights))
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
    raise errors.Invalid(f'unknown objective {name!r}; known: '
                         f'{sorted(REGISTRY)}')
  return REGISTRY[name](**kwargs)
