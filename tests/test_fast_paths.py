"""The step's faster formulations (docs/performance.md) compute what the
plain ones compute: heads-major attention on CPU, the token-major layout
and padded odd lengths that cuDNN gets on GPU, q, k and v as one matmul,
a softmax whose backward keeps only its output, GELU through erf, and
drop path drawn once for the whole stack."""

import contextlib
import functools
import io

import flax.linen as nn
import jax
import jax.ad_checkpoint  # jax.ad_checkpoint.print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax import convert
from mimjax.models import vit


def _reference_attention(q, k, v):
  """jax.nn.dot_product_attention on the (B, N, H, d) layout it expects."""
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  return jax.nn.dot_product_attention(q, k, v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize('shape', [(2, 3, 17, 8), (1, 2, 50, 64)])
def test_attention_and_its_gradient_match_jax(shape):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, cotangent = (jax.random.normal(key, shape) * 2 for key in keys)
  for fn in (vit.attend,):
    np.testing.assert_allclose(fn(q, k, v), _reference_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *x, fn=fn: (fn(*x) * cotangent).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *x: (_reference_attention(*x) *
                                    cotangent).sum(), argnums=(0, 1, 2))(
                                        q, k, v)
    for got, want in zip(grads, expected):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_keeps_one_array_of_scores_for_its_backward():
  """Only the probabilities: autodiff of jax.nn.softmax would also keep the
  exponentials (and their sums), a second (B, H, N, N) array."""
  q = jnp.ones((2, 3, 5, 4))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    jax.ad_checkpoint.print_saved_residuals(vit.attend, q, q, q)
  assert printed.getvalue().count('f32[2,3,5,5]') == 1, printed.getvalue()


def test_softmax_gradient_is_jax_softmax_gradient():
  x = jax.random.normal(jax.random.key(5), (3, 4, 9)) * 3
  cotangent = jax.random.normal(jax.random.key(6), x.shape)
  np.testing.assert_allclose(vit.softmax(x), jax.nn.softmax(x), rtol=1e-6)
  got, want = (jax.vjp(fn, x)[1](cotangent)[0]
               for fn in (vit.softmax, jax.nn.softmax))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Σ_k dx = 0 in exact arithmetic: what keeps the key bias's gradient zero.
  np.testing.assert_allclose(got.sum(-1), 0, atol=1e-6)


def test_odd_lengths_padded_for_cudnn_are_masked_out():
  keys = jax.random.split(jax.random.key(1), 4)
  shape = (2, 197, 4, 8)  # (B, N, heads, head_dim), as cuDNN takes them
  q, k, v, cotangent = (jax.random.normal(key, shape) for key in keys)
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
  padded = lambda q, k, v: vit.cudnn_attention(q, k, v, implementation='xla')
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5,
                             atol=1e-5)
  for fn_grads in zip(*(jax.grad(lambda *x, fn=fn: (fn(*x) * cotangent).sum(),
                                 argnums=(0, 1, 2))(q, k, v)
                        for fn in (padded, plain))):
    np.testing.assert_allclose(*fn_grads, rtol=1e-4, atol=1e-5)


def test_gpu_layout_computes_the_cpu_layout(monkeypatch):
  """attention='cudnn' (token-major, an odd length padded) gives the
  heads-major result with the same parameters; its kernel is swapped for
  XLA's, which runs the same padding here."""
  x = jax.random.normal(jax.random.key(2), (2, 9, 16))
  attention = vit.Attention(num_heads=4)
  params = attention.init(jax.random.key(3), x)
  want = attention.apply(params, x)
  monkeypatch.setattr(vit, 'cudnn_attention', functools.partial(
      vit.cudnn_attention, implementation='xla'))
  np.testing.assert_allclose(attention.clone(attention='cudnn').apply(
      params, x), want, rtol=1e-5, atol=1e-5)


def test_attention_is_stable_for_large_scores():
  q = jnp.full((1, 1, 4, 8), 100.0)
  out = vit.attend(q, q, q)
  grads = jax.grad(lambda q: vit.attend(q, q, q).sum())(q)
  assert np.isfinite(out).all() and np.isfinite(grads).all()


def test_mlp_gelu_is_the_exact_gelu():
  x = jax.random.normal(jax.random.key(3), (2, 7, 8)) * 4
  mlp = vit.Mlp(hidden=16)
  params = nn.meta.unbox(mlp.init(jax.random.key(4), x)['params'])
  hidden = x @ params['fc1']['kernel'] + params['fc1']['bias']
  want = (jax.nn.gelu(hidden, approximate=False) @ params['fc2']['kernel'] +
          params['fc2']['bias'])
  np.testing.assert_allclose(mlp.apply({'params': params}, x), want,
                             rtol=1e-5, atol=1e-5)


def test_drop_path_is_drawn_once_for_the_stack():
  """Stochastic depth's factors are drawn for the whole stack at once (one
  RNG loop on CPU, not two per branch): 0 or 1/keep, unbiased, never
  dropping the first block (rate 0); a dropped branch adds nothing, even
  where it is not finite; and the scanned and the unrolled transformer
  draw the same factors, so they train alike."""
  scales = vit.drop_path_scales(jax.random.key(0), jnp.array([0.0, 0.5]),
                                4096)
  assert scales.shape == (2, 2, 4096)
  np.testing.assert_array_equal(scales[0], 1.0)
  assert set(np.unique(scales[1]).tolist()) == {0.0, 2.0}
  assert abs(float(scales[1].mean()) - 1.0) < 0.05
  dropped = vit.drop_path(jnp.full((3, 2, 4), jnp.inf),
                          jnp.array([0.0, 2.0, 0.0]))
  np.testing.assert_array_equal(dropped[::2], 0.0)

  x = jax.random.normal(jax.random.key(1), (8, 5, 16))
  config = dict(depth=3, num_heads=2, drop_path=0.5)
  unrolled, scanned = (vit.Transformer(**config, scan=scan)
                       for scan in (False, True))
  params = nn.meta.unbox(unrolled.init(jax.random.key(2), x, train=False))
  train = lambda model, p: model.apply(
      p, x, train=True, rngs={'dropout': jax.random.key(3)})[0]
  out = train(unrolled, params)
  np.testing.assert_allclose(
      train(scanned, {'params': convert.stack_blocks(params['params'])}),
      out, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, unrolled.apply(params, x, train=False)[0])
