"""Temporary: per-device memory of the MAE train step on the real GPU."""
import json, os, sys, time
import jax, jax.numpy as jnp, optax
from mimjax import masking, mim, objectives
from mimjax.models import Decoder, Encoder, vit
out = open(os.path.join(os.environ.get('OUT', '/tmp'), 'mem.jsonl'), 'a')
print(jax.__version__, jax.devices(), flush=True)
for size in sys.argv[1].split(','):
  patch = 14 if size == 'H' else 16
  for remat in (False, True):
    res = {}
    for bs in (32, 64):
      dt = jnp.bfloat16
      enc = Encoder(patch_size=patch, **vit.preset(size), scan=True, remat=remat, dtype=dt)
      dec = Decoder(out_dim=patch * patch * 3, width=512, depth=8, num_heads=16, scan=True, remat=remat, dtype=dt)
      m = mim.MIM(enc, dec, masking.random(0.75), objectives.get('mae', norm_pix=True))
      img = jax.ShapeDtypeStruct((bs, 224, 224, 3), jnp.float32)
      p = jax.eval_shape(lambda: m.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, jnp.zeros((1, 224, 224, 3))))['params']
      tx = optax.adamw(1e-4, b2=0.95, weight_decay=0.05)
      o = jax.eval_shape(tx.init, p)
      def step(p, o, x, r):
        loss, g = jax.value_and_grad(lambda p: m.apply({'params': p}, x, train=True, rngs={'mask': r})[0])(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
      t = time.time()
      c = jax.jit(step, donate_argnums=(0, 1)).lower(p, o, img, jax.random.key(0)).compile()
      ma = c.memory_analysis()
      res[bs] = dict(temp=ma.temp_size_in_bytes, arg=ma.argument_size_in_bytes, compile_s=round(time.time() - t, 1))
    per = (res[64]['temp'] - res[32]['temp']) / 32
    r = dict(size=size, remat=remat, per_sample_MB=per / 1e6, fixed_temp_MB=(res[32]['temp'] - 32 * per) / 1e6, arg_MB=res[32]['arg'] / 1e6, temp64_GB=res[64]['temp'] / 1e9, compile_s=[res[32]['compile_s'], res[64]['compile_s']])
    print(json.dumps(r), flush=True); out.write(json.dumps(r) + '\n'); out.flush()
