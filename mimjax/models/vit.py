"""Vision Transformer encoder that runs on the visible patches only.

Why this module is long: it holds every part of the ViT that the encoder,
the decoder and the classifier share (patches, position embeddings,
attention, blocks, the scanned or unrolled stack), so that each reads in
one place.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimjax import errors

Dtype = Any

# name: (width, depth, heads). Patch size is a separate argument.
PRESETS = {
    'mu': (64, 2, 4),  # CPU presets for tests and demos
    'nano': (128, 4, 4),
    'Ti': (192, 12, 3),
    'S': (384, 12, 6),
    'M': (512, 8, 8),  # small CPU demo preset
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'H': (1280, 32, 16),
}


def preset(name: str) -> dict[str, int]:
  """Width, depth and heads of a named ViT size ('B', 'L', 'H', ...)."""
  if name not in PRESETS:
    raise errors.Invalid(f'unknown ViT size {name!r}; known: {sorted(PRESETS)}')
  width, depth, heads = PRESETS[name]
  return dict(width=width, depth=depth, num_heads=heads)


# Official MAE init: xavier-uniform on every linear map viewed as 2-D (out, in).
xavier = nn.initializers.xavier_uniform()
# The reference fuses q, k and v into one (D, 3D) matrix, so its xavier bound
# uses fan_out = 3D; on our separate (D, heads, head_dim) kernels that is a
# variance scale of 1/2.
qkv_init = nn.initializers.variance_scaling(
    0.5, 'fan_avg', 'uniform', in_axis=0, out_axis=(1, 2))
out_init = nn.initializers.variance_scaling(
    1.0, 'fan_avg', 'uniform', in_axis=(0, 1), out_axis=2)
# Patch projection: xavier on the conv kernel flattened to (p*p*C, D).
patch_init = nn.initializers.variance_scaling(
    1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)
token_init = nn.initializers.normal(0.02)


def logical(init, names):
  return nn.with_logical_partitioning(init, names)


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


# ---------------------------------------------------------------- patches


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) images -> (B, L, p*p*C) patches, row-major, pixels then channels."""
  b, h, w, c = images.shape
  p = patch_size
  check_patch_size(h, w, p)
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int],
               channels: int = 3) -> jax.Array:
  """Inverse of `patchify`: (B, L, p*p*C) -> (B, H, W, C)."""
  b = patches.shape[0]
  gh, gw = grid
  p = patch_size
  x = patches.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


def check_patch_size(height: int, width: int, patch_size: int):
  if height % patch_size or width % patch_size:
    raise errors.Invalid(
        f'image size {height}x{width} is not divisible by patch size '
        f'{patch_size}')


def posemb_sincos_1d(width: int, positions: np.ndarray) -> np.ndarray:
  omega = np.arange(width // 2, dtype=np.float64) / (width / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum('m,d->md', positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def posemb_sincos_2d(grid: tuple[int, int], width: int,
                     cls_token: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, (1 + gh*gw, width) if cls_token.

  Reference MAE axis order: the first half of the channels encodes the column
  (w) coordinate, the second half the row (h) coordinate.
  """
  if width % 4:
    raise errors.Invalid(f'sin-cos position embedding needs width % 4 == 0, '
                         f'got {width}')
  gh, gw = grid
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')
  emb = np.concatenate([posemb_sincos_1d(width // 2, cols),
                        posemb_sincos_1d(width // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, width)), emb], axis=0)
  return emb.astype(np.float32)


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x[b, ids[b, k], :] for every sample b."""
  return jnp.take_along_axis(x, ids[..., None], axis=1)


# ---------------------------------------------------------------- blocks


def drop_path_scales(rng, rates, batch: int):
  """Stochastic depth for a stack of blocks, drawn at once: (depth, 2, batch)
  factors for each block's two residual branches and each sample, 0 (the
  branch dropped) or 1 / keep. One draw for the stack, where a draw per
  branch would be two RNG loops per branch on CPU."""
  keep = 1.0 - rates[:, None, None]
  kept = jax.random.bernoulli(rng, keep, (len(rates), 2, batch))
  return jnp.where(kept, 1.0 / keep, 0.0)


def drop_path(x, scale):
  """x with its samples' residual branch scaled by `scale` (batch,): 0
  drops it, whatever x holds."""
  scale = scale.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(scale > 0, x * scale, 0)


class PatchEmbed(nn.Module):
  """The patch projection with nn.Conv's parameters (kernel (p, p, C, D),
  bias), applied as a matmul to (B, K, p*p*C) patches: the same map as the
  strided convolution, run only on the patches the encoder keeps."""
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches):
    p = self.patch_size
    kernel = self.param(
        'kernel', logical(patch_init, (None, None, 'channels', 'embed')),
        (p, p, patches.shape[-1] // (p * p), self.width))
    bias = self.param('bias', logical(nn.initializers.zeros, ('embed',)),
                      (self.width,))
    kernel = kernel.reshape(-1, self.width).astype(self.dtype)
    return (jnp.einsum('bkp,pd->bkd', patches.astype(self.dtype), kernel) +
            bias.astype(self.dtype))


class HeadsWeights(nn.Module):
  """The kernel (D, heads, head_dim) and bias (heads, head_dim) of the query,
  key or value projection: explicit 3-D kernels, so that each axis carries
  its own logical name. `Attention` applies q, k and v as one matmul."""
  width: int
  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self):
    heads = (self.num_heads, self.head_dim)
    kernel = self.param('kernel', logical(qkv_init, ('embed', 'heads', 'kv')),
                        (self.width, *heads))
    bias = self.param('bias', logical(nn.initializers.zeros, ('heads', 'kv')),
                      heads)
    return kernel, bias


class HeadsOut(nn.Module):
  """(B, heads, N, head_dim), or (B, N, heads, head_dim) when not
  `heads_major`, -> (B, N, width), with a 3-D kernel."""
  width: int
  dtype: Dtype = jnp.float32
  heads_major: bool = True

  @nn.compact
  def __call__(self, x):
    spec = 'bhnk' if self.heads_major else 'bnhk'
    heads = (x.shape[spec.index('h')], x.shape[3])
    kernel = self.param('kernel', logical(out_init, ('heads', 'kv', 'embed')),
                        (*heads, self.width))
    bias = self.param('bias', logical(nn.initializers.zeros, ('embed',)),
                      (self.width,))
    return (jnp.einsum(f'{spec},hkd->bnd', x.astype(self.dtype),
                       kernel.astype(self.dtype)) + bias.astype(self.dtype))


@jax.custom_vjp
def softmax(x):
  """jax.nn.softmax over the last axis, whose backward keeps only its
  output: autodiff of jax.nn.softmax keeps the exponentials, their sums and
  the output, three arrays of the attention scores' size where one serves."""
  return jax.nn.softmax(x)


def _softmax_fwd(x):
  y = jax.nn.softmax(x)
  return y, y


def _softmax_bwd(y, g):
  # dx = y ⊙ (g - Σ_k y ⊙ g), the transpose of jax.nn.softmax's own JVP.
  yg = y * g
  return (yg - y * jnp.sum(yg, axis=-1, keepdims=True),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def attend(q, k, v):
  """softmax(q kᵀ / √d) v over heads-major (B, heads, N, head_dim) inputs,
  as XLA runs best on CPU: heads-major operands keep the batched matmuls
  free of transposes (docs/performance.md). The softmax's backward keeps
  the key bias's gradient at zero up to rounding, as it is in exact
  arithmetic; normalising after the weighted sum instead left noise there
  that Adam turns into steps of the learning rate's size.
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k,
                      preferred_element_type=jnp.float32)
  weights = softmax(scores).astype(v.dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', weights, v)


def cudnn_attention(q, k, v, implementation='cudnn'):
  """cuDNN's flash attention. jax refuses it for training at an odd length
  (the MAE decoder's 1 + 196 tokens), so such inputs get one more token,
  masked out as padding (query and key lengths), and lose it again.
  (`implementation='xla'` runs the same padding through XLA, for tests.)"""
  n = q.shape[1]
  if n % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v,
                                        implementation=implementation)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
  lengths = jnp.full((q.shape[0],), n, jnp.int32)
  out = jax.nn.dot_product_attention(
      pad(q), pad(k), pad(v), query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :n]


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split()).rstrip('.') or type(error).__name__


def fused_attention(q, k, v):
  """`cudnn_attention`, or one line saying why jax refuses it here: jax
  checks the cuDNN version, the GPU, the dtype and the shapes while
  tracing."""
  try:
    return cudnn_attention(q, k, v)
  except (NotImplementedError, RuntimeError, ValueError) as e:
    raise errors.Invalid(
        f'model.attention=cudnn: jax refuses cuDNN attention for '
        f'{q.dtype} q, k, v of shape {q.shape}: {_one_line(e)}; '
        "model.attention=xla runs XLA's attention") from e


# model.attention: 'auto' resolves to one of the others (resolve_attention).
ATTENTION = ('auto', 'xla', 'cudnn')
CUDNN_DTYPES = ('bfloat16', 'float16')


def check_attention(choice: str, dtype, platform: str):
  """One line refusing a model.attention that cannot run on `platform`'s
  devices (device.platform: 'cpu', 'gpu', 'tpu') at compute dtype
  `dtype`."""
  if choice not in ATTENTION:
    raise errors.Invalid(f'unknown model.attention {choice!r}; known: '
                         f'{", ".join(ATTENTION)}')
  if choice != 'cudnn':
    return
  if platform != 'gpu':
    raise errors.Invalid(f'model.attention=cudnn needs GPUs, but the devices '
                         f"here are {platform}; use 'auto' or 'xla'")
  if jnp.dtype(dtype).name not in CUDNN_DTYPES:
    raise errors.Invalid(f'model.attention=cudnn needs model.dtype bfloat16 '
                         f'or float16 (cuDNN attention takes no '
                         f"{jnp.dtype(dtype)}); use 'auto' or 'xla'")


@functools.lru_cache
def cudnn_refusal(dtype, platform: str) -> str | None:
  """Why cuDNN attention cannot run on `platform` at `dtype`, None where it
  can: a tiny call, forward and backward at an odd length (padded), is
  compiled once per process."""
  if platform != 'gpu':
    return 'cuDNN attention needs GPUs'
  if jnp.dtype(dtype).name not in CUDNN_DTYPES:
    return 'cuDNN attention takes bfloat16 or float16'
  probe = jax.ShapeDtypeStruct((1, 3, 1, 64), dtype)
  loss = lambda *x: cudnn_attention(*x).astype(jnp.float32).sum()
  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(probe, probe,
                                                      probe).compile()
  except (NotImplementedError, RuntimeError, ValueError) as e:
    return f'cuDNN refused a probe call: {_one_line(e)}'
  return None


def resolve_attention(choice: str, dtype, platform: str) -> tuple[str, str]:
  """model.attention as `Attention` runs it, 'xla' or 'cudnn', and why, on
  `platform`'s devices at compute dtype `dtype`: 'auto' is cuDNN's where
  the devices are GPUs, the dtype bfloat16 or float16 and cuDNN takes a
  probe call (`cudnn_refusal`), XLA's otherwise. Call it outside tracing,
  once per stage (build.setup logs it)."""
  check_attention(choice, dtype, platform)
  why = f'model.attention={choice} on {platform}, {jnp.dtype(dtype)}'
  if choice != 'auto':
    return choice, why
  refusal = cudnn_refusal(jnp.dtype(dtype), platform)
  return ('xla', f'{why}: {refusal}') if refusal else ('cudnn', why)


def gpu_attention(q, k, v):
  """Attention over tokens-major (B, N, heads, head_dim) inputs as
  model.attention='auto' runs it on this backend: cuDNN's fused kernel
  where it resolves to 'cudnn', XLA's otherwise."""
  choice, _ = resolve_attention('auto', q.dtype, jax.default_backend())
  if choice == 'cudnn':
    return fused_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')


class Attention(nn.Module):
  """Multi-head self-attention; q, k and v keep separate parameters but
  run as one matmul. `attention` (resolve_attention): 'xla' puts the heads
  first (`attend`); 'cudnn' runs cuDNN's fused kernel, with the heads after
  the tokens as it takes them."""
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = 'xla'

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads:
      raise errors.Invalid(f'width {width} not divisible by {self.num_heads} '
                           f'heads')
    if self.attention not in ('xla', 'cudnn'):
      raise errors.Invalid(f"Attention runs 'xla' or 'cudnn', got "
                           f'{self.attention!r} (vit.resolve_attention '
                           f"resolves 'auto')")
    dims = (self.num_heads, width // self.num_heads)
    weights = [HeadsWeights(width, *dims, name=n)()
               for n in ('query', 'key', 'value')]
    kernel = jnp.stack([w for w, _ in weights], axis=1).astype(self.dtype)
    bias = jnp.stack([b for _, b in weights]).astype(self.dtype)
    cudnn = self.attention == 'cudnn'
    spec, names, bias = (
        ('tbnhk', ('batch', 'length', 'heads', 'kv'), bias[:, None, None])
        if cudnn else
        ('tbhnk', ('batch', 'heads', 'length', 'kv'), bias[:, None, :, None]))
    qkv = jnp.einsum(f'bnd,dthk->{spec}', x.astype(self.dtype), kernel) + bias
    q, k, v = (constrain(y, names) for y in qkv)
    out = fused_attention(q, k, v) if cudnn else attend(q, k, v)
    return HeadsOut(width, self.dtype, heads_major=not cudnn, name='out')(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, name='fc1',
                 kernel_init=logical(xavier, ('embed', 'mlp')),
                 bias_init=logical(nn.initializers.zeros, ('mlp',)))(x)
    # torch's nn.GELU default, as torch writes it: through erf, which XLA
    # evaluates at a fraction of the cost of the erfc in jax.nn.gelu.
    x = 0.5 * x * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))
    x = constrain(x, ('batch', 'length', 'mlp'))
    return nn.Dense(width, dtype=self.dtype, name='fc2',
                    kernel_init=logical(xavier, ('mlp', 'embed')),
                    bias_init=logical(nn.initializers.zeros, ('embed',)))(x)


def layer_norm(name, eps, dtype):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=logical(nn.initializers.ones, ('embed',)),
                      bias_init=logical(nn.initializers.zeros, ('embed',)))


class Block(nn.Module):
  """Pre-norm Transformer block. Returns (tokens, tokens) so it can be
  scanned. `drop_scales`: None, or (2, batch) drop path factors for the
  attention and the MLP branch (drop_path_scales)."""
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention: str = 'xla'  # or 'cudnn' (Attention)

  @nn.compact
  def __call__(self, x, drop_scales=None):
    width = x.shape[-1]
    drop = lambda y, i: y if drop_scales is None else drop_path(
        y, drop_scales[i])
    y = layer_norm('norm1', self.norm_eps, self.dtype)(x)
    y = Attention(self.num_heads, self.dtype, self.attention, name='attn')(y)
    x = x + drop(y, 0)
    y = layer_norm('norm2', self.norm_eps, self.dtype)(x)
    y = Mlp(int(width * self.mlp_ratio), self.dtype, name='mlp')(y)
    x = x + drop(y, 1)
    x = constrain(x, ('batch', 'length', 'embed'))
    return x, x


# The policies of jax.checkpoint_policies that take no arguments: what a
# rematerialised block keeps from its forward pass (model.remat_policy).
REMAT_POLICIES = tuple(n for n in (
    'nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
    'everything_saveable', 'checkpoint_dots',
    'checkpoint_dots_with_no_batch_dims')
                       if hasattr(jax.checkpoint_policies, n))


def checkpoint_policy(name: str):
  """jax.checkpoint_policies.<name>, or one line naming the known ones."""
  if name not in REMAT_POLICIES:
    raise errors.Invalid(f'unknown model.remat_policy {name!r}; known: '
                         f'{", ".join(REMAT_POLICIES)}')
  return getattr(jax.checkpoint_policies, name)


class Transformer(nn.Module):
  """A stack of blocks, unrolled (blocks_0, blocks_1, ...) or scanned (blocks).

  With `remat`, each block is rematerialised under `remat_policy` (a name in
  `REMAT_POLICIES`: what the backward pass may keep instead of recomputing).
  Returns the final tokens and the output of every block, (depth, B, N, D).
  """
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  drop_path: float = 0.0
  scan: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  remat_policy: str = 'nothing_saveable'
  attention: str = 'xla'  # or 'cudnn' (Attention)

  @nn.compact
  def __call__(self, x, *, train: bool):
    scales = None  # drop path's, one (2, batch) per block
    if train and self.drop_path > 0:
      rates = self.drop_path * jnp.arange(self.depth) / max(self.depth - 1, 1)
      scales = drop_path_scales(self.make_rng('dropout'), rates, x.shape[0])
    block = (nn.remat(Block, policy=checkpoint_policy(self.remat_policy))
             if self.remat else Block)
    kwargs = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                  norm_eps=self.norm_eps, dtype=self.dtype,
                  attention=self.attention)
    if self.scan:
      stack = nn.scan(
          block, variable_axes={'params': 0}, in_axes=0, length=self.depth,
          split_rngs={'params': True},
          metadata_params={nn.PARTITION_NAME: 'layers'})
      return stack(**kwargs, name='blocks')(x, scales)
    outputs = []
    for i in range(self.depth):
      x, _ = block(**kwargs, name=f'blocks_{i}')(
          x, None if scales is None else scales[i])
      outputs.append(x)
    return x, jnp.stack(outputs)


# ---------------------------------------------------------------- encoder


class Encoder(nn.Module):
  """ViT encoder over the visible patches: f_θ(x; visible ids).

  Returns a dict with 'tokens' (B, 1 + K, D), cls first, after the final norm
  (unless `final_norm` is False), and 'layers' (depth, B, 1 + K, D), the
  output of every block.
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  drop_path: float = 0.0
  posemb: str = 'sincos'  # or 'learn' (fine-tuned timm / official ViT)
  final_norm: bool = True
  scan: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  remat_policy: str = 'nothing_saveable'  # with remat (REMAT_POLICIES)
  attention: str = 'xla'  # 'xla' or 'cudnn' (resolve_attention)

  def grid(self, images) -> tuple[int, int]:
    _, h, w, _ = images.shape
    check_patch_size(h, w, self.patch_size)
    return h // self.patch_size, w // self.patch_size

  @nn.compact
  def __call__(self, images, ids_keep: jax.Array | None = None, *,
               train: bool = False):
    grid = self.grid(images)
    patches = patchify(images, self.patch_size)
    b = patches.shape[0]
    if self.posemb == 'sincos':
      pos = jnp.asarray(posemb_sincos_2d(grid, self.width))[None]
    elif self.posemb == 'learn':
      pos = self.param(
          'pos_embed',
          logical(lambda _, s: jnp.asarray(posemb_sincos_2d(grid, s[-1]))[None],
                  (None, 'length', 'embed')),
          (1, 1 + grid[0] * grid[1], self.width))
      if pos.shape[1] != 1 + grid[0] * grid[1]:
        raise errors.Invalid(
            f'learned position embedding has {pos.shape[1] - 1} patches but '
            f'the image has {grid[0] * grid[1]}; interpolate it '
            '(mimjax.convert.resize_posemb) when loading')
    else:
      raise errors.Invalid(f"posemb must be 'sincos' or 'learn', got "
                           f'{self.posemb!r}')
    patch_pos = pos[:, 1:]
    if ids_keep is not None:  # the projection is per patch: keep, then embed
      patches = gather_tokens(patches, ids_keep)
      patch_pos = jnp.take(patch_pos[0], ids_keep, axis=0)
    x = PatchEmbed(self.patch_size, self.width, self.dtype,
                   name='patch_embed')(patches)
    x = x + patch_pos.astype(x.dtype)
    cls = self.param('cls_token', logical(token_init, (None, None, 'embed')),
                     (1, 1, self.width))
    cls = jnp.broadcast_to(cls + pos[:, :1], (b, 1, self.width)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    x = constrain(x, ('batch', 'length', 'embed'))
    x, layers = Transformer(
        self.depth, self.num_heads, self.mlp_ratio, self.norm_eps,
        self.drop_path, self.scan, self.remat, self.dtype,
        remat_policy=self.remat_policy, attention=self.attention,
        name='transformer',
    )(x, train=train)
    if self.final_norm:
      x = layer_norm('norm', self.norm_eps, self.dtype)(x)
    return {'tokens': x, 'layers': layers}
