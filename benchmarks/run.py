"""`make bench`: throughput as ratios against peers run in the same process.

1. Gather of kept tokens: take_along_axis vs a one-hot einsum.
2. MAE train step (encoder on 25% of tokens + decoder) vs a supervised ViT
   step on all tokens: the paper's 3x+ speed-up claim, measured here.
On a GPU/TPU it also prints model-FLOPs utilisation of the MAE step.

  python benchmarks/run.py [--size=B --patch=16 --image=224 --batch=64]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from mimjax import masking, mim, objectives
from mimjax.models import Classifier, Decoder, Encoder, vit

PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'TPU v4': 275.0,
               'TPU v5e': 197.0, 'TPU v5p': 459.0}  # dense bf16


def timeit(fn, *args, repeats=5):
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def bench_gather(batch, tokens, width, keep):
  x = jax.random.normal(jax.random.key(0), (batch, tokens, width))
  ids = jnp.argsort(jax.random.uniform(jax.random.key(1), (batch, tokens)),
                    axis=1)[:, :keep]
  take = jax.jit(vit.gather_tokens)
  onehot = jax.jit(lambda x, i: jnp.einsum(
      'bkl,bld->bkd', jax.nn.one_hot(i, x.shape[1], dtype=x.dtype), x))
  t_take, t_onehot = timeit(take, x, ids), timeit(onehot, x, ids)
  print(f'gather ({batch}x{tokens}x{width} keep {keep}): take_along_axis '
        f'{t_take * 1e3:.3f} ms, one-hot einsum {t_onehot * 1e3:.3f} ms, '
        f'ratio einsum/take {t_onehot / t_take:.2f}')


def train_step(apply_loss, params):
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, rng):
    loss, grads = jax.value_and_grad(apply_loss)(params, images, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step, opt_state


def encoder_flops(width, depth, tokens, mlp_ratio=4.0):
  """Forward matmul FLOPs of ViT blocks on `tokens` tokens (x3 for training)."""
  per_token = depth * (2 * 4 * width * width + 2 * 2 * width * width * mlp_ratio)
  attention = depth * 2 * 2 * tokens * tokens * width
  return per_token * tokens + attention


def bench_steps(size, patch, image, batch, dtype, dec_width, dec_depth):
  shape = vit.preset(size)
  encoder = Encoder(patch_size=patch, **shape, dtype=dtype)
  decoder = Decoder(out_dim=patch * patch * 3, width=dec_width,
                    depth=dec_depth, num_heads=max(dec_width // 32, 1),
                    dtype=dtype)
  model = mim.MIM(encoder, decoder, masking.random(0.75), objectives.mae())
  images = jax.random.normal(jax.random.key(0), (batch, image, image, 3))
  rng = jax.random.key(1)
  params = model.init({'params': rng, 'mask': rng}, images[:1])['params']
  mae_loss = lambda p, x, r: model.apply({'params': p}, x, train=True,
                                         rngs={'mask': r, 'dropout': r})[0]
  mae_step, mae_opt = train_step(mae_loss, params)
  t_mae = timeit(lambda: mae_step(params, mae_opt, images, rng))

  clf = Classifier(encoder, 1000)
  clf_params = clf.init({'params': rng}, images[:1])['params']
  labels = jnp.zeros((batch,), jnp.int32)
  clf_loss = lambda p, x, r: optax.softmax_cross_entropy_with_integer_labels(
      clf.apply({'params': p}, x, train=True, rngs={'dropout': r})[0],
      labels).mean()
  clf_step, clf_opt = train_step(clf_loss, clf_params)
  t_clf = timeit(lambda: clf_step(clf_params, clf_opt, images, rng))
  print(f'ViT-{size}/{patch} {image}px batch {batch} {jnp.dtype(dtype).name} '
        f'(decoder {dec_width}x{dec_depth}): '
        f'MAE step {t_mae * 1e3:.1f} ms ({batch / t_mae:.1f} img/s), '
        f'supervised step {t_clf * 1e3:.1f} ms; MAE/supervised speed-up '
        f'{t_clf / t_mae:.2f}x')
  tokens = (image // patch) ** 2
  keep = int(tokens * 0.25) + 1
  flops = 3 * batch * (encoder_flops(shape['width'], shape['depth'], keep) +
                       encoder_flops(dec_width, dec_depth, tokens + 1))
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
  if peak:
    print(f'MAE step model FLOPs utilisation on {kind}: '
          f'{100 * flops / t_mae / (peak * 1e12):.1f}%')
  else:
    print(f'device {kind}: {flops / t_mae / 1e12:.3f} TFLOP/s achieved '
          '(no peak known, no MFU)')


def main():
  parser = argparse.ArgumentParser()
  on_cpu = jax.default_backend() == 'cpu'
  parser.add_argument('--size', default='mu' if on_cpu else 'B')
  parser.add_argument('--patch', type=int, default=4 if on_cpu else 16)
  parser.add_argument('--image', type=int, default=32 if on_cpu else 224)
  parser.add_argument('--batch', type=int, default=64 if on_cpu else 256)
  parser.add_argument('--decoder_width', type=int, default=64 if on_cpu else 512)
  parser.add_argument('--decoder_depth', type=int, default=2 if on_cpu else 8)
  args = parser.parse_args()
  dtype = jnp.float32 if on_cpu else jnp.bfloat16
  bench_gather(args.batch, (args.image // args.patch) ** 2,
               vit.preset(args.size)['width'],
               (args.image // args.patch) ** 2 // 4)
  bench_steps(args.size, args.patch, args.image, args.batch, dtype,
              args.decoder_width, args.decoder_depth)


if __name__ == '__main__':
  main()
