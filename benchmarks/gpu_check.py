"""One GPU: mimjax's MAE pre-training step against the HF PyTorch peer.

  bash benchmarks/gpu_check.sh                # ViT-L/16 MAE, batch 256, on one H100/H200
  bash benchmarks/gpu_check.sh --batch=128    # any flag below
  bash benchmarks/gpu_check.sh --tiny         # the same code, tiny, on CPU (seconds)
  bash benchmarks/gpu_check.sh --profile=2    # and where 2 more steps spend their time
  bash benchmarks/gpu_check.sh --no-peer --variant='--batch=512' \
      --variant='XLA_FLAGS=--xla_gpu_enable_triton_gemm=false'
                                              # then each variant, in its own process

The model is the reference ViT-L/16 MAE (mask ratio 0.75, decoder 512 wide,
8 deep, 16 heads, norm-pix loss) at 224 px, computing in bfloat16 on float32
parameters, built directly from mimjax.models / mim / masking / objectives,
trained by mimjax.training.state.make_train_step (jit, state donated) with
mimjax's AdamW (mimjax.training.optim: the reference decay mask, b2 0.95).
The peer is HF transformers' ViTMAEForPreTraining at the same shapes
(sdpa attention, eager unless --peer_compile) under
torch.autocast(bfloat16) with torch.optim.AdamW (fused on CUDA).

Timing rule, both sides: `--warmup` untimed steps, then `--steps` steps,
each timed to completion (block_until_ready / cuda.synchronize); img/s is
the batch over the median step. Model FLOPs are analytic (matmuls only:
patch embedding, encoder on the visible tokens, decoder on all, the
prediction head; forward x3 for a training step), identical for both;
MFU is against the dense bf16 peak of H100/H200 (989 TFLOP/s). Targets:
mimjax MFU >= 50% and >= 1.5x the peer's img/s; each line says PASS or
FAIL (n/a where there is no known peak or no peer). Also printed: the GPU,
the versions, the compile time, whether the compiled step calls cuDNN's
fused attention (n/a on CPU) and peak device memory.

Each side runs in its own process (JAX's allocator would otherwise keep
its memory from torch, and each peak is its own).

Needs: jax (CUDA build), flax, optax, numpy; torch and transformers for the
peer (without them the peer is skipped with a line saying so). It never
imports tensorflow, tensorflow_datasets, clu or ml_collections: the mimjax
modules above need none of them (checked at run time), so no wheel has to
be carried; mimjax is read from this checkout, it need not be installed.
Exit status 0 when the measurements ran (1 when mimjax's could not;
--strict: 3 when a target fails).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from timing import median_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETED = ('H100', 'H200')  # the chips the targets are for
MFU_TARGET, RATIO_TARGET = 0.50, 1.5
NOT_IMPORTED = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections')
GiB = 1 << 30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tiny', action='store_true',
                 default=bool(os.environ.get('GPU_CHECK_TINY')),
                 help='ViT-mu/4 at 32 px, batch 4, 3 steps: the same code on '
                 'CPU in seconds (or env GPU_CHECK_TINY=1)')
  p.add_argument('--size', help="ViT preset (default 'L'; tiny 'mu')")
  p.add_argument('--patch', type=int)
  p.add_argument('--image', type=int)
  p.add_argument('--batch', type=int)
  p.add_argument('--steps', type=int, help='timed steps (default 10)')
  p.add_argument('--warmup', type=int, help='untimed steps (default 2)')
  p.add_argument('--decoder', help='WIDTHxDEPTHxHEADS (default 512x8x16)')
  p.add_argument('--mask_ratio', type=float, default=0.75)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--remat', action='store_true')
  p.add_argument('--remat_policy', default='nothing_saveable')
  p.add_argument('--peer', action=argparse.BooleanOptionalAction,
                 default=True, help='also time the HF PyTorch peer')
  p.add_argument('--peer_compile', action='store_true',
                 help='torch.compile the peer')
  p.add_argument('--profile', type=int, default=0, metavar='N',
                 help='also trace N more mimjax steps with jax.profiler and '
                 'print where their time goes (trace_summary.py)')
  p.add_argument('--top', type=int, default=12,
                 help='operation kinds printed per timeline line')
  p.add_argument('--timeout', type=int, default=420,
                 help='seconds for both sides together')
  p.add_argument('--strict', action='store_true',
                 help='exit status 3 when a target fails')
  p.add_argument('--variant', action='append', default=[], metavar='SPEC',
                 help="then time mimjax again with SPEC, in its own process "
                 "(repeatable): '--flag=value' arguments of this script and "
                 "NAME=value environment variables, XLA_FLAGS added to the "
                 "inherited ones; e.g. --variant='--batch=512' --variant="
                 "'XLA_FLAGS=--xla_gpu_enable_triton_gemm=false'")
  p.add_argument('--variant_timeout', type=int, default=240,
                 help='seconds for each variant')
  p.add_argument('--part', choices=('all', 'mimjax', 'peer'), default='all',
                 help=argparse.SUPPRESS)
  p.add_argument('--result', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  tiny = dict(size='mu', patch=4, image=32, batch=4, steps=3, warmup=1,
              decoder='32x1x4')
  full = dict(size='L', patch=16, image=224, batch=256, steps=10, warmup=2,
              decoder='512x8x16')
  for key, value in (tiny if args.tiny else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.dec_width, args.dec_depth, args.dec_heads = (
      int(x) for x in args.decoder.lower().split('x'))
  return args


# ------------------------------------------------------------- shared


def model_flops(args) -> float:
  """Forward FLOPs of one image (mimjax.flops; it imports jax, which takes no
  device until used)."""
  sys.path.insert(0, REPO)
  from mimjax import flops  # pylint: disable=g-import-not-at-top
  return flops.mae_flops(args.size, args.patch, args.image, args.mask_ratio,
                         args.dec_width, args.dec_depth)['forward']


def peak_for(name: str):
  sys.path.insert(0, REPO)
  from mimjax import flops  # pylint: disable=g-import-not-at-top
  return flops.peak_tflops(name)


def throughput(who: str, args, times, flops_per_image, device_name) -> dict:
  """Prints the img/s and MFU lines; returns the figures."""
  median = statistics.median(times)
  ips = args.batch / median
  achieved = 3 * flops_per_image * ips
  print(f'{who}: {ips:.1f} img/s (median of {len(times)} steps, '
        f'{median * 1e3:.1f} ms/step, batch {args.batch})', flush=True)
  peak = peak_for(device_name)
  mfu = achieved / (peak * 1e12) if peak else None
  print(f'{who}: model FLOPs {3 * flops_per_image:.3g} per image (forward '
        f'x3), {achieved / 1e12:.2f} TFLOP/s, MFU ' +
        (f'{100 * mfu:.1f}% of {peak:g} TFLOP/s' if mfu is not None else
         f'n/a (no dense bf16 peak known for {device_name})'), flush=True)
  return dict(img_per_s=ips, ms_per_step=median * 1e3, mfu=mfu,
              tflops=achieved / 1e12, device=device_name)


def size(nbytes) -> str:
  if not nbytes:
    return 'n/a'
  return (f'{nbytes / GiB:.2f} GiB' if nbytes >= GiB / 10 else
          f'{nbytes / (1 << 20):.2f} MiB')


def describe(args) -> str:
  return (f'ViT-{args.size}/{args.patch} MAE (mask {args.mask_ratio}, '
          f'decoder {args.decoder}, norm_pix), {args.image}px, batch '
          f'{args.batch}, {args.dtype} compute')


# ------------------------------------------------------------- mimjax


def run_mimjax(args) -> dict:
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mimjax import masking, mim, objectives, sharding  # pylint: disable=g-import-not-at-top
  from mimjax.models import Decoder, Encoder, vit  # pylint: disable=g-import-not-at-top
  from mimjax.training import optim  # pylint: disable=g-import-not-at-top
  from mimjax.training import state as state_lib  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  name = device.device_kind if device.platform == 'gpu' else device.platform
  print(f'mimjax: device {name} ({device.platform}, {jax.device_count()} '
        f'present, 1 used); jax {jax.__version__}, jaxlib {_jaxlib()}, '
        f'flax {flax.__version__}, optax {optax.__version__}'
        f'{_cuda_versions(device.platform)}', flush=True)
  pulled = sorted({m.split('.')[0] for m in sys.modules} & set(NOT_IMPORTED))
  print('mimjax: imports ' + (f'PULLED IN {", ".join(pulled)}' if pulled else
                              'no tensorflow, tfds, clu or ml_collections'),
        flush=True)

  dtype = jnp.dtype(args.dtype)
  shape = vit.preset(args.size)
  pixels = args.patch * args.patch * 3
  attention, why = vit.resolve_attention('auto', dtype, device.platform)
  print(f'mimjax: attention: {attention} ({why})', flush=True)
  encoder = Encoder(patch_size=args.patch, **shape, dtype=dtype,
                    remat=args.remat, remat_policy=args.remat_policy,
                    attention=attention)
  decoder = Decoder(out_dim=pixels, width=args.dec_width,
                    depth=args.dec_depth, num_heads=args.dec_heads,
                    dtype=dtype, remat=args.remat,
                    remat_policy=args.remat_policy, attention=attention)
  model = mim.MIM(encoder, decoder, masking.random(args.mask_ratio),
                  objectives.mae(norm_pix=True))
  mesh = sharding.make_mesh((1, 1, 1), devices=[device],
                            model_size=args.size)
  rules = sharding.rules_from(None)
  sample = jnp.zeros((1, args.image, args.image, 3), jnp.float32)
  init_variables = lambda key: model.init({'params': key, 'mask': key},
                                          sample)
  abstract = nn.meta.unbox(
      jax.eval_shape(init_variables, jax.random.key(0)))['params']
  tx = optim.adamw(optax.constant_schedule(1.5e-4 * args.batch / 256),
                   abstract, 0.05, b2=0.95)

  def loss_fn(params, extra, batch, rng):  # as trainers.pretrain_recipe's
    k_mask, k_drop = jax.random.split(rng)
    loss, aux = model.apply({'params': params}, batch['image'], train=True,
                            rngs={'mask': k_mask, 'dropout': k_drop})
    metrics = {k: v for k, v in aux.items()
               if isinstance(v, jax.Array) and v.ndim == 0}
    return loss, (metrics, extra)

  state, shardings = state_lib.create(init_variables, tx, 0, mesh, rules)
  leaves = jax.tree.leaves(state.params)
  fp32 = all(x.dtype == jnp.float32 for x in leaves)
  count = sum(x.size for x in leaves)
  print(f'mimjax: {describe(args)}, {count / 1e6:.1f}M parameters, all '
        f'float32: {"yes" if fp32 else "NO"}; AdamW via '
        'training.state.make_train_step', flush=True)
  images = np.random.default_rng(0).uniform(
      size=(args.batch, args.image, args.image, 3)).astype(np.float32)
  batch = {'image': jax.device_put(images, sharding.batch_sharding(mesh))}
  step = state_lib.make_train_step(loss_fn, tx, shardings, mesh, rules)
  start = time.perf_counter()
  with sharding.active(mesh, rules):
    lowered = step.jitted.lower(state, batch)
    traced = time.perf_counter() - start
    compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  print(f'mimjax: compile {compile_s:.1f} s (trace and lower '
        f'{traced:.1f} s)', flush=True)
  cudnn = cudnn_attention(device.platform, compiled, lowered)
  print(f'mimjax: cuDNN attention: {cudnn}', flush=True)
  if device.platform == 'gpu':
    attention_parity(args, dtype)

  holder = {'state': state}

  def one_step():
    holder['state'], metrics = compiled(holder['state'], batch)
    return holder['state'], metrics

  _, times, _ = median_step(lambda: jax.block_until_ready(one_step()),
                            args.warmup, args.steps)
  loss = float(jax.device_get(one_step()[1]['loss']))
  result = throughput('mimjax', args, times,
                      model_flops(args), name)
  stats = device.memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  temp = getattr(compiled.memory_analysis(), 'temp_size_in_bytes', None)
  print(f'mimjax: peak memory {size(peak)} (device.memory_stats), XLA '
        f'temp {size(temp)}; loss after {args.warmup + args.steps + 1} '
        f'steps {loss:.4f}', flush=True)
  if args.profile:
    profile(one_step, args.profile, args.top, device.platform != 'cpu')
  return dict(result, compile_s=compile_s, cudnn=cudnn, peak_bytes=peak,
              params_fp32=fp32, pulled=pulled, loss=loss, jax=jax.__version__)


def profile(one_step, steps: int, top: int, device: bool) -> None:
  """Traces `steps` steps and prints each timeline line's top kinds."""
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import trace_summary  # pylint: disable=g-import-not-at-top
  trace_dir = tempfile.mkdtemp(prefix='gpu_check_profile_')
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    jax.block_until_ready(one_step())
  jax.profiler.stop_trace()
  print(f'mimjax: profile of {steps} steps ({trace_dir}):', flush=True)
  trace_summary.report(trace_summary.lines(trace_dir, steps, device), top,
                       prefix='mimjax:   ')


def _jaxlib() -> str:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return '?'


def _cuda_versions(platform: str) -> str:
  """', cuDNN X, CUDA runtime Y' as jax's CUDA plugin reports them."""
  if platform != 'gpu':
    return ''
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    return (f', cuDNN {cuda_versions.cudnn_get_version()}, CUDA runtime '
            f'{cuda_versions.cuda_runtime_get_version()}')
  except Exception:  # pylint: disable=broad-except
    return ''


def cudnn_attention(platform: str, compiled, lowered) -> str:
  """Whether the compiled step calls cuDNN's fused attention (fmha)."""
  if platform != 'gpu':
    return f'n/a ({platform})'
  import re  # pylint: disable=g-import-not-at-top
  found = []
  for what in (compiled, lowered):
    try:
      found = re.findall(r'__cudnn\$fmha\w*', what.as_text())
    except Exception:  # pylint: disable=broad-except
      continue
    if found:
      break
  if not found:
    return 'no (no __cudnn$fmha custom call in the step: XLA attention)'
  kinds = ', '.join(f'{k} x{found.count(k)}' for k in sorted(set(found)))
  return f'yes ({kinds})'


def attention_parity(args, dtype) -> None:
  """Prints how far vit.gpu_attention (cuDNN where it runs) at the step's
  encoder and decoder shapes lies from float32 XLA attention, forward and
  gradient, as the largest error over the largest reference value."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mimjax.models import vit  # pylint: disable=g-import-not-at-top
  width, _, heads = vit.PRESETS[args.size]
  patches = (args.image // args.patch) ** 2
  visible = 1 + patches - int(patches * args.mask_ratio)
  batch = min(args.batch, 32)
  for name, shape in (
      ('encoder', (batch, visible, heads, width // heads)),
      ('decoder', (batch, 1 + patches, args.dec_heads,
                   args.dec_width // args.dec_heads))):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cot = (jax.random.normal(key, shape) for key in keys)

    def loss(fn, cast, *x):
      return (fn(*(y.astype(cast) for y in x)).astype(jnp.float32) * cot).sum()

    fast = jax.jit(jax.value_and_grad(
        lambda *x: loss(vit.gpu_attention, dtype, *x), argnums=(0, 1, 2)))
    slow = jax.jit(jax.value_and_grad(
        lambda *x: loss(lambda *y: jax.nn.dot_product_attention(
            *y, implementation='xla'), jnp.float32, *x), argnums=(0, 1, 2)))
    used = 'cuDNN' if '__cudnn$fmha' in fast.lower(q, k, v).as_text() else (
        'XLA')
    (_, got), (_, want) = fast(q, k, v), slow(q, k, v)
    out_err = _relative(jax.jit(vit.gpu_attention)(
        *(x.astype(dtype) for x in (q, k, v))),
                        jax.nn.dot_product_attention(q, k, v))
    grad_err = max(_relative(g, w) for g, w in zip(got, want))
    print(f'mimjax: attention {name} {shape} {dtype.name} via {used} vs '
          f'float32 XLA: output {out_err:.1e}, gradients {grad_err:.1e} '
          '(max error / max value)', flush=True)


def _relative(got, want) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  got, want = (np.asarray(x, np.float32) for x in (got, want))
  return float(np.abs(got - want).max() / np.abs(want).max())


# ------------------------------------------------------------- the peer


def run_peer(args) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    why = f'torch/transformers not importable ({e})'
    print(f'peer: skipped: {why}', flush=True)
    return dict(skipped=why)
  cuda = torch.cuda.is_available()
  dev = torch.device('cuda' if cuda else 'cpu')
  name = torch.cuda.get_device_name(0) if cuda else 'cpu'
  print(f'peer: device {name}; torch {torch.__version__}, transformers '
        f'{transformers.__version__}', flush=True)
  shape = dict(zip(('width', 'depth', 'heads'), _preset(args.size)))
  config = transformers.ViTMAEConfig(
      hidden_size=shape['width'], num_hidden_layers=shape['depth'],
      num_attention_heads=shape['heads'],
      intermediate_size=4 * shape['width'],
      decoder_hidden_size=args.dec_width,
      decoder_num_hidden_layers=args.dec_depth,
      decoder_num_attention_heads=args.dec_heads,
      decoder_intermediate_size=4 * args.dec_width, image_size=args.image,
      patch_size=args.patch, mask_ratio=args.mask_ratio, norm_pix_loss=True,
      layer_norm_eps=1e-6)
  torch.manual_seed(0)
  model = transformers.ViTMAEForPreTraining(config).to(dev).train()
  attn = getattr(model.config, '_attn_implementation', '?')
  opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4 * args.batch / 256,
                          betas=(0.9, 0.95), weight_decay=0.05,
                          **({'fused': True} if cuda else {}))
  forward = torch.compile(model) if args.peer_compile else model
  amp = getattr(torch, args.dtype)
  print(f'peer: HF ViTMAEForPreTraining ({attn} attention, '
        f'{"torch.compile" if args.peer_compile else "eager"}), '
        f'{describe(args)} via torch.autocast, float32 parameters, '
        f'torch.optim.AdamW{" (fused)" if cuda else ""}', flush=True)
  images = torch.rand(args.batch, 3, args.image, args.image, device=dev)

  def step():
    with torch.autocast(device_type=dev.type, dtype=amp):
      loss = forward(pixel_values=images).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  sync(step())
  first = time.perf_counter() - start
  print(f'peer: first step {first:.1f} s', flush=True)
  _, times, _ = median_step(lambda: sync(step()), max(args.warmup - 1, 0),
                            args.steps)
  result = throughput('peer', args, times,
                      model_flops(args),
                      name)
  peak = torch.cuda.max_memory_allocated() if cuda else None
  print(f'peer: peak memory {size(peak)}' +
        (' (torch.cuda.max_memory_allocated)' if cuda else ''), flush=True)
  return dict(result, first_step_s=first, peak_bytes=peak, attn=attn,
              torch=torch.__version__)


def _preset(size: str):
  """(width, depth, heads) of a mimjax ViT preset, read from the source
  (importing mimjax.models.vit would import jax into the peer's process)."""
  import ast  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, 'mimjax', 'models', 'vit.py')
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if (isinstance(node, ast.Assign) and
        getattr(node.targets[0], 'id', None) == 'PRESETS'):
      return ast.literal_eval(node.value)[size]
  raise ValueError(f'no PRESETS in {path}')


# ------------------------------------------------------------- driver


def child(argv, part: str, timeout: float, env=None):
  """Runs one side in its own process; its result dict (or the failure)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'result.json')
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f'--part={part}',
           f'--result={out}']
    try:
      rc = subprocess.run(cmd, timeout=timeout, check=False,
                          env=env).returncode
    except subprocess.TimeoutExpired:
      return dict(failed=f'timed out after {timeout:.0f} s')
    if rc or not os.path.exists(out):
      return dict(failed=f'exit status {rc}')
    with open(out) as f:
      return json.load(f)


def variant_run(spec: str) -> tuple[list[str], dict]:
  """--variant's SPEC -> (extra arguments, the child's environment)."""
  extra, env = [], dict(os.environ)
  for item in shlex.split(spec):
    name, eq, value = item.partition('=')
    if item.startswith('--'):
      extra.append(item)
    elif eq and name.isidentifier():
      env[name] = (f'{env.get(name, "")} {value}'.strip()
                   if name == 'XLA_FLAGS' else value)
    else:
      sys.exit(f'gpu_check: --variant item {item!r} is neither --flag=value '
               'nor NAME=value')
  return extra, env


def verdict(ok) -> str:
  return 'n/a' if ok is None else ('PASS' if ok else 'FAIL')


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.part != 'all':
    result = run_mimjax(args) if args.part == 'mimjax' else run_peer(args)
    with open(args.result, 'w') as f:
      json.dump(result, f)
    return 0
  for spec in args.variant:  # a bad one fails now, not after the first run
    parse_args([*argv, *variant_run(spec)[0]])
  print(f'gpu_check: {describe(args)}; {args.warmup} warm-up + '
        f'{args.steps} timed steps per side', flush=True)
  deadline = time.time() + args.timeout
  ours = child(argv, 'mimjax', args.timeout * (0.7 if args.peer else 1))
  if args.peer:
    peer = child(argv, 'peer', max(deadline - time.time(), 60))
  else:
    peer = dict(skipped='--no_peer')
  print('gpu_check: summary', flush=True)
  if 'failed' in ours:
    print(f'  mimjax: FAILED ({ours["failed"]})')
    print(f'  targets: MFU >= {MFU_TARGET:.0%}: FAIL; mimjax/PyTorch >= '
          f'{RATIO_TARGET}x: FAIL')
    return 1
  mfu = ours['mfu']
  print(f'  mimjax: {ours["img_per_s"]:.1f} img/s, MFU ' +
        (f'{100 * mfu:.1f}%' if mfu is not None else 'n/a') +
        f', compile {ours["compile_s"]:.1f} s, cuDNN attention '
        f'{ours["cudnn"].split(" ")[0]}, on {ours["device"]}')
  ratio = None
  if 'img_per_s' in peer:
    ratio = ours['img_per_s'] / peer['img_per_s']
    peer_mfu = peer['mfu']
    print(f'  peer (HF PyTorch): {peer["img_per_s"]:.1f} img/s, MFU ' +
          (f'{100 * peer_mfu:.1f}%' if peer_mfu is not None else 'n/a') +
          f', on {peer["device"]}')
    print(f'  mimjax/PyTorch: {ratio:.2f}x')
  else:
    why = peer.get('skipped') or f'FAILED ({peer.get("failed")})'
    print(f'  peer (HF PyTorch): skipped: {why}')
  # The targets are for H100/H200 (a known peak); elsewhere: n/a.
  targeted = any(chip in ours['device'] for chip in TARGETED)
  mfu_ok = None if mfu is None else mfu >= MFU_TARGET
  ratio_ok = None if ratio is None or not targeted else ratio >= RATIO_TARGET
  why = '' if targeted else ' (the targets are for H100/H200)'
  print(f'  target MFU >= {MFU_TARGET:.0%}: ' +
        (f'{100 * mfu:.1f}% ' if mfu is not None else '') + verdict(mfu_ok) +
        why)
  print(f'  target mimjax/PyTorch >= {RATIO_TARGET}x: ' +
        (f'{ratio:.2f}x ' if ratio is not None else '') + verdict(ratio_ok) +
        why, flush=True)
  for spec in args.variant:
    extra, env = variant_run(spec)
    print(f'gpu_check: variant {spec!r}', flush=True)
    other = child([*argv, *extra], 'mimjax', args.variant_timeout, env)
    if 'failed' in other:
      print(f'  variant {spec!r}: FAILED ({other["failed"]})', flush=True)
      continue
    print(f'  variant {spec!r}: {other["img_per_s"]:.1f} img/s, MFU ' +
          (f'{100 * other["mfu"]:.1f}%' if other['mfu'] is not None else
           'n/a') + f', compile {other["compile_s"]:.1f} s; '
          f'{other["img_per_s"] / ours["img_per_s"]:.2f}x the first run',
          flush=True)
  if 'failed' in peer:
    return 1
  if args.strict and (mfu_ok is False or ratio_ok is False):
    return 3
  return 0


if __name__ == '__main__':
  sys.exit(main())
