"""The CPU step's faster formulations (docs/performance.md) compute what the
plain ones compute: heads-major attention normalised after the weighted sum,
q, k and v as one matmul, and GELU through erf."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
