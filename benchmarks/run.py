"""`make bench`: mimjax's real train steps, timed, next to a PyTorch peer.

For each configuration (ViT-B/16 MAE pre-training, ViT-B/16 fine-tuning and,
off CPU, ViT-L/16 MAE pre-training), built from configs/mae_imagenet.py and
trained by the recipe's own step (`trainers.*_recipe`, `state.create`,
`state.make_train_step`: sharded, donated), it reports

  * steady-state img/s: batch / median step time after warm-up steps;
  * compile time of the unrolled (model.scan=False) and the scanned
    (model.scan=True) step, lowering timed apart;
  * memory: the compiled step's temp + arguments + outputs (less the donated
    buffers that outputs alias), and the device's live peak where it has one;
  * model FLOPs per step (`mimjax.flops`, analytic) next to XLA's count,
    achieved TFLOP/s, and MFU where the chip's dense bf16 peak is known;
  * the tf.data input pipeline's img/s on generated JPEGs, with a warning
    when it could not keep up with the step;
  * the same step in PyTorch (HF transformers ViTMAEForPreTraining or
    ViTForImageClassification + AdamW), same shapes and batch, when torch and
    transformers import, and the ratio mimjax/PyTorch. The fine-tuning peer
    does less work than the recipe (PEER_SKIPS: no mixup/cutmix, drop
    path, label smoothing or layer decay).
    The two take turns (`timing.taking_turns`: rounds of one untimed and two
    timed steps each), so that both are timed in the same minutes of a
    machine whose speed drifts; the ratio's range over the rounds is printed
    with it.

  python benchmarks/run.py [--batch=N] [--steps=N] [--quick] [--out=FILE.json]

--quick runs the same code at tiny sizes (ViT-mu, patch 4, 32px, batch 8):
a smoke test of the benchmark, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # configs/ and mimjax/ from this checkout

if __name__ == '__main__':
  from mimjax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_tunables()  # both frameworks' steps run under it
  # The PyTorch peer shares the accelerator: JAX takes memory as it needs it
  # rather than 75% of the device up front.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TF's start-up notes

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np  # pylint: disable=g-import-not-at-top

from mimjax import flops  # pylint: disable=g-import-not-at-top,wrong-import-position
from timing import taking_turns  # pylint: disable=g-import-not-at-top,wrong-import-position

FAKE_NUM_TRAIN = 1_000_000  # sizes the LR schedule only
NUM_CLASSES = 1000
# What of the fine-tuning recipe the peer does not do, as the config values
# that turn it off in mimjax.
PEER_SKIPS = {'finetune.mixup': 0.0, 'finetune.cutmix': 0.0,
              'finetune.drop_path': 0.0, 'finetune.label_smoothing': 0.0,
              'finetune.layer_decay': 1.0}
GIB = 2.0**30


# ------------------------------------------------------------ configurations


@dataclasses.dataclass(frozen=True)
class Bench:
  """One configuration: a recipe of configs/mae_imagenet.py and a stage."""
  name: str
  size: str  # mae_imagenet.get_config's argument: 'B' or 'L'
  kind: str  # 'pretrain' or 'finetune'


def benches(on_cpu: bool) -> list[Bench]:
  out = [Bench('ViT-B/16 MAE pre-train', 'B', 'pretrain'),
         Bench('ViT-B/16 fine-tune', 'B', 'finetune')]
  if not on_cpu:
    out.append(Bench('ViT-L/16 MAE pre-train', 'L', 'pretrain'))
  return out


def make_config(bench: Bench, batch: int, dtype: str, quick: bool,
                scan: bool | None = None):
  """The reference recipe, at the benchmark's batch and dtype (scan None:
  as the recipe says); --quick only shrinks the sizes."""
  from configs import mae_imagenet  # pylint: disable=g-import-not-at-top
  c = mae_imagenet.get_config(bench.size)
  c.model.dtype = dtype
  if scan is not None:
    c.model.scan = scan
  c.pretrain.knn_every = c.pretrain.recon_every = 0  # no evaluators
  c.pretrain.batch_size = c.finetune.batch_size = batch
  if quick:
    c.model.size = {'B': 'mu', 'L': 'nano'}[bench.size]
    c.model.patch_size = 4
    c.data.image_size = c.pretrain.data.image_size = 32
    c.pretrain.decoder.update(dict(width=64, depth=2, num_heads=4))
  return c


def shape_of(config, kind: str) -> dict:
  """What the step computes, as plain numbers (for FLOPs, the peer, JSON)."""
  from mimjax.models import vit  # pylint: disable=g-import-not-at-top
  enc = vit.preset(config.model.size)
  dec = config.pretrain.decoder
  image = (config.pretrain.data if kind == 'pretrain' else
           config.data).image_size
  shape = dict(width=enc['width'], depth=enc['depth'],
               heads=enc['num_heads'], patch=config.model.patch_size,
               image=image)
  if kind == 'pretrain':
    shape.update(decoder_width=dec.width, decoder_depth=dec.depth,
                 decoder_heads=dec.num_heads,
                 mask_ratio=config.pretrain.mask_ratio,
                 norm_pix=bool(config.pretrain.objective_kwargs.get(
                     'norm_pix', False)))
  else:
    shape.update(num_classes=NUM_CLASSES)
  return shape


def model_flops(config, kind: str) -> int:
  """Model FLOPs of one training image (mimjax.flops)."""
  if kind == 'pretrain':
    c = config.pretrain
    return flops.mae_flops(config.model.size, config.model.patch_size,
                           c.data.image_size, c.mask_ratio, c.decoder.width,
                           c.decoder.depth)['train']
  return flops.classifier_flops(config.model.size, config.model.patch_size,
                                config.data.image_size, NUM_CLASSES)['train']


def describe(bench: Bench, s: dict, batch: int) -> str:
  what = f'{s["image"]}px, ViT {s["width"]}x{s["depth"]}, patch {s["patch"]}'
  if bench.kind == 'pretrain':
    what += (f', mask {s["mask_ratio"]}, decoder {s["decoder_width"]}x'
             f'{s["decoder_depth"]}' + (', norm_pix' if s['norm_pix'] else ''))
  else:
    what += f', {s["num_classes"]} classes'
  return f'{bench.name} ({what}), batch {batch}'


# ------------------------------------------------------------ the mimjax step


def _cost_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def _memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return dict(compiled_gib=None)
  parts = {k: getattr(m, f'{k}_size_in_bytes', 0) or 0
           for k in ('temp', 'argument', 'output', 'alias')}
  total = parts['temp'] + parts['argument'] + parts['output'] - parts['alias']
  return dict(compiled_gib=total / GIB,
              **{f'{k}_gib': v / GIB for k, v in parts.items()})


def _live_peak_gib() -> float | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  peak = (stats or {}).get('peak_bytes_in_use')
  return peak / GIB if peak else None


def _recipe(bench: Bench, config, mesh):
  from mimjax.training import trainers  # pylint: disable=g-import-not-at-top
  if bench.kind == 'pretrain':
    return trainers.pretrain_recipe(config, mesh, FAKE_NUM_TRAIN)
  return trainers.finetune_recipe(config, mesh, FAKE_NUM_TRAIN, NUM_CLASSES)


def step_dtype() -> str:
  """fp32 on CPU, bf16 compute (fp32 master weights) on accelerators."""
  return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'


def _random_batch(mesh, batch: int, size: int) -> dict:
  """This process's share of a global batch of random images and labels."""
  from mimjax import sharding  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  local = batch // jax.process_count()
  return sharding.global_batch({
      'image': rng.standard_normal((local, size, size, 3), np.float32),
      'label': rng.integers(0, NUM_CLASSES, (local,), np.int32)}, mesh)


def _stepper(holder: dict):
  """A blocking call of one step: holder's 'compiled' step on its 'state'
  and 'batch'; the new state and the metrics go back into holder."""
  def step():
    holder['state'], holder['metrics'] = holder['compiled'](holder['state'],
                                                            holder['batch'])
    jax.block_until_ready((holder['state'], holder['metrics']))
  return step


def recipe_step(kind: str, batch: int, quick: bool,
                scan: bool | None = None, compile_trace_dir: str = ''):
  """The recipe's train step on random images, compiled (scan None: as
  the recipe says; the compilation traced into `compile_trace_dir` if
  given): (its Bench, dtype, step: a blocking call of one step, holder:
  its compiled step, compile seconds, whether it is scanned, state and
  last metrics). For profile_step.py."""
  from mimjax import build, sharding  # pylint: disable=g-import-not-at-top
  from mimjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  bench = next(b for b in benches(on_cpu=True) if b.kind == kind)
  dtype = step_dtype()
  config = make_config(bench, batch, dtype, quick, scan)
  mesh, rules = build.setup(config)
  recipe = _recipe(bench, config, mesh)
  state, shardings = state_lib.create(recipe.init_variables, recipe.tx,
                                      config.seed, mesh, rules)
  train_step = state_lib.make_train_step(recipe.loss_fn, recipe.tx, shardings,
                                         mesh, rules, recipe.accumulate)
  images = _random_batch(mesh, batch, recipe.image_size)
  jax.block_until_ready((state, images))  # not computed during the compile
  with sharding.active(mesh, rules):
    lowered = train_step.jitted.lower(state, images)
    with (jax.profiler.trace(compile_trace_dir) if compile_trace_dir
          else contextlib.nullcontext()):
      start = time.perf_counter()
      compiled = lowered.compile()
      compile_s = time.perf_counter() - start
  holder = {'state': state, 'compiled': compiled, 'batch': images,
            'compile_s': compile_s, 'scan': config.model.scan}
  return bench, dtype, _stepper(holder), holder


def warm_up_compiler(kind: str) -> None:
  """Compiles a tiny step once, so that the next compile timed carries none
  of the process's first compilation."""
  recipe_step(kind, 4, True)


def build_mimjax(bench: Bench, args, dtype: str):
  """Compiles the step unrolled and scanned, and readies the one the recipe
  uses (model.scan) for timing. Returns (numbers, the shape of what is run,
  step: a blocking call of one train step, finish: its numbers after the
  timing, freeing it)."""
  from mimjax import build, sharding  # pylint: disable=g-import-not-at-top
  from mimjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mimjax.training import state as state_lib  # pylint: disable=g-import-not-at-top

  timed_scan = bool(make_config(bench, args.batch, dtype,
                                args.quick).model.scan)
  out = {}
  for scan in (not timed_scan, timed_scan):  # the timed one last
    config = make_config(bench, args.batch, dtype, args.quick, scan)
    config_lib.validate(config, jax.device_count(), sharding.topology()[1])
    mesh, rules = build.setup(config)
    recipe = _recipe(bench, config, mesh)
    abstract_state, shardings = state_lib.abstract(
        recipe.init_variables, recipe.tx, config.seed, mesh, rules)
    run = state_lib.make_train_step(recipe.loss_fn, recipe.tx, shardings,
                                    mesh, rules, recipe.accumulate)
    size = recipe.image_size
    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = {
        'image': jax.ShapeDtypeStruct((args.batch, size, size, 3), np.float32,
                                      sharding=batch_sharding),
        'label': jax.ShapeDtypeStruct((args.batch,), np.int32,
                                      sharding=batch_sharding)}
    with sharding.active(mesh, rules):
      start = time.perf_counter()
      lowered = run.jitted.lower(abstract_state, abstract_batch)
      lowered_at = time.perf_counter()
      compiled = lowered.compile()
      done = time.perf_counter()
    which = 'scanned' if scan else 'unrolled'
    out[f'lower_{which}_s'] = lowered_at - start
    out[f'compile_{which}_s'] = done - lowered_at
    del lowered
    if scan != timed_scan:
      del compiled, recipe, run
      gc.collect()

  out['timed'] = 'scanned' if timed_scan else 'unrolled'
  out.update(_memory(compiled))
  out['xla_flops_per_step'] = _cost_flops(compiled)
  state, _ = state_lib.create(recipe.init_variables, recipe.tx, config.seed,
                              mesh, rules)
  holder = {'state': state, 'compiled': compiled,
            'batch': _random_batch(mesh, args.batch, size)}
  del state, compiled, recipe, run
  step = _stepper(holder)

  def finish():
    numbers = dict(loss=float(holder['metrics']['loss']),
                   live_peak_gib=_live_peak_gib())
    holder.clear()
    gc.collect()
    return numbers

  return out, shape_of(config, bench.kind), step, finish


# ------------------------------------------------------------ the input pipeline


def _write_jpegs(root: str, count: int, side: int):
  """`count` photo-like JPEGs (smooth colour fields plus grain) in two
  class folders."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = os.path.join(root, f'class{i % 2}')
    os.makedirs(folder, exist_ok=True)
    low = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(low).resize((side, side),
                                                   Image.BILINEAR), np.float32)
    image += rng.normal(0, 12, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f'{i:04d}.jpg'), quality=90)


def bench_pipeline(data_config, mode: str, batch: int, quick: bool,
                   cache: dict) -> dict:
  """img/s of the real training pipeline (`data.train_batches`: JPEG decode,
  random-resized crop, flip, and for fine-tuning RandAugment and erasing)
  over a folder of generated JPEGs; the first batch is not timed."""
  key = (mode, data_config.image_size, batch)
  if key in cache:
    return cache[key]
  try:
    from mimjax import data as data_lib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    cache[key] = dict(input_img_per_s=None,
                      input_note=f'skipped: {type(e).__name__}: {e}')
    return cache[key]
  side, count, num_batches = (64, 64, 8) if quick else (256, 64, 20)
  with tempfile.TemporaryDirectory(prefix='mimjax_bench_') as root:
    _write_jpegs(root, count, side)
    dc = data_config.copy_and_resolve_references()
    dc.name = f'folder:{root}'
    batches = data_lib.train_batches(dc, mode, batch, seed=0)
    next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(batches)
    elapsed = time.perf_counter() - start
    del batches
  cache[key] = dict(
      input_img_per_s=num_batches * batch / elapsed,
      input_note=(f'{mode} pipeline, {count} {side}x{side} JPEGs -> '
                  f'{data_config.image_size}px'))
  return cache[key]


# ------------------------------------------------------------ the PyTorch peer


def import_peer():
  """(torch, transformers) or (None, why not). Imported before TensorFlow:
  a CUDA build of torch brings triton, which must load before TF does."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    try:
      import triton  # pylint: disable=g-import-not-at-top,unused-import
    except Exception:  # pylint: disable=broad-except
      pass
    import transformers  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return None, f'{type(e).__name__}: {e}'
  return (torch, transformers), None


def build_peer(peer, kind: str, s: dict, batch: int):
  """The same step in PyTorch: HF ViT(MAE) + AdamW, fp32 on CPU, bf16
  autocast on CUDA. Returns (step: a blocking call of one step, what it is,
  free: drops the model)."""
  torch, transformers = peer
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  torch.manual_seed(0)
  common = dict(hidden_size=s['width'], num_hidden_layers=s['depth'],
                num_attention_heads=s['heads'],
                intermediate_size=4 * s['width'], image_size=s['image'],
                patch_size=s['patch'], layer_norm_eps=1e-6,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  if kind == 'pretrain':
    config = transformers.ViTMAEConfig(
        **common, decoder_hidden_size=s['decoder_width'],
        decoder_num_hidden_layers=s['decoder_depth'],
        decoder_num_attention_heads=s['decoder_heads'],
        decoder_intermediate_size=4 * s['decoder_width'],
        mask_ratio=s['mask_ratio'], norm_pix_loss=s['norm_pix'])
    model = transformers.ViTMAEForPreTraining(config)
    labels = None
  else:
    config = transformers.ViTConfig(**common, num_labels=s['num_classes'])
    model = transformers.ViTForImageClassification(config)
    labels = torch.randint(0, s['num_classes'], (batch,), device=device)
  model.to(device).train()
  held = dict(model=model, images=torch.randn(
      batch, 3, s['image'], s['image'], device=device), opt=torch.optim.AdamW(
          model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05))
  del model

  def step():
    held['opt'].zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
      kwargs = {} if labels is None else {'labels': labels}
      loss = held['model'](pixel_values=held['images'], **kwargs).loss
    loss.backward()
    held['opt'].step()
    if cuda:
      torch.cuda.synchronize()

  def free():
    held.clear()
    gc.collect()
    if cuda:
      torch.cuda.empty_cache()

  note = (f'HF {type(config).__name__[:-6]} + AdamW on {device.type}, '
          + ('bf16 autocast' if cuda else 'fp32')
          + ('' if kind == 'pretrain' else
             f", without the recipe's {peer_skips()}"))
  return step, note, free


def peer_skips() -> str:
  """PEER_SKIPS in words: 'mixup, cutmix, ... and layer decay'."""
  names = [path.split('.')[-1].replace('_', ' ') for path in PEER_SKIPS]
  return f'{", ".join(names[:-1])} and {names[-1]}'


def peer_unavailable(peer, why: str | None) -> str | None:
  """Why the peer cannot run here (None: it can)."""
  if peer is None:
    return f'torch/transformers not importable ({why})'
  backend = jax.default_backend()
  if backend == 'tpu':
    return 'no PyTorch peer on TPU'
  if backend != 'cpu' and not peer[0].cuda.is_available():
    return f'torch sees no CUDA device; a CPU peer is no match for {backend}'
  return None


# ------------------------------------------------------------ report


def _versions(peer) -> dict:
  def dist(*names):
    for name in names:
      try:
        return importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        pass
    return None
  import flax  # pylint: disable=g-import-not-at-top
  return dict(jax=jax.__version__, jaxlib=dist('jaxlib'),
              flax=flax.__version__,
              torch=peer[0].__version__ if peer else dist('torch'),
              transformers=peer[1].__version__ if peer else
              dist('transformers'),
              tensorflow=dist('tensorflow', 'tensorflow-cpu'))


# The x86 vector extensions XLA's and PyTorch's CPU matmuls choose kernels by.
CPU_ISA = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')


def host_cpu() -> dict:
  """The host CPU's model, the cores this process may use, and which of
  CPU_ISA it has: CPU runs on different hosts do not compare."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          model = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
          break
  except OSError:
    pass
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
           else os.cpu_count())
  return dict(model=model, cores=cores,
              isa=[name for name in CPU_ISA if name in flags])


def _finite(tree):
  """The record with non-finite floats as None (strict JSON)."""
  if isinstance(tree, dict):
    return {k: _finite(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_finite(v) for v in tree]
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


def _gib(x) -> str:
  """GiB, or MiB below one GiB."""
  if x is None:
    return 'n/a'
  return f'{x:.2f} GiB' if x >= 1 else f'{x * 1024:.1f} MiB'


def _host(host: dict) -> str:
  return (f'{host["sys_s_per_step"]:.2f} s system time, '
          f'{host["page_faults_per_step"]:,} page faults per step')


def _flop(x) -> str:
  if x is None:
    return 'n/a'
  for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6)):
    if x >= scale:
      return f'{x / scale:.3g} {unit}FLOP'
  return f'{x:.3g} FLOP'


def _spread(ratios: list[float]) -> str:
  """The per-round ratios' range, mean and standard deviation."""
  std = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
  return (f'{len(ratios)} rounds of turns: {min(ratios):.2f}x to '
          f'{max(ratios):.2f}x, mean {statistics.mean(ratios):.2f}x '
          f'± {std:.2f}')


def report(bench: Bench, r: dict, batch: int, peak: float | None,
           say) -> None:
  say('')
  say(describe(bench, r['shape'], batch))
  say(f'  step      {r["img_per_s"]:.1f} img/s  (median of '
      f'{len(r["step_s_all"])} steps {1e3 * r["step_s"]:.1f} ms, '
      f'{r["timed"]})')
  say(f'  host      {_host(r["host"])}')
  say(f'  compile   unrolled {r["compile_unrolled_s"]:.1f} s (+ lower '
      f'{r["lower_unrolled_s"]:.1f} s) | scanned {r["compile_scanned_s"]:.1f}'
      f' s (+ lower {r["lower_scanned_s"]:.1f} s)')
  live = r['live_peak_gib']
  say(f'  memory    {_gib(r["compiled_gib"])} compiled step (temp '
      f'{_gib(r.get("temp_gib"))} + args {_gib(r.get("argument_gib"))} + out '
      f'{_gib(r.get("output_gib"))} - donated {_gib(r.get("alias_gib"))})'
      + (f'; live peak {_gib(live)} (process so far)' if live else ''))
  mfu = (f'MFU {100 * r["mfu"]:.1f}%' if r['mfu'] is not None else
         'MFU: no peak known' + ('' if peak else
                                 f' for {r["device_kind"]}'))
  say(f'  FLOPs     {_flop(r["model_flops_per_step"])} per step (analytic; '
      f'XLA counts {_flop(r["xla_flops_per_step"])}), '
      f'{r["achieved_tflops"]:.3g} TFLOP/s achieved, {mfu}')
  if r['input_img_per_s'] is None:
    say(f'  input     {r["input_note"]}')
  else:
    say(f'  input     {r["input_img_per_s"]:.1f} img/s tf.data '
        f'({r["input_note"]}) vs step {r["img_per_s"]:.1f} img/s')
    if r['input_img_per_s'] < r['img_per_s']:
      say(f'  WARNING   the input pipeline ({r["input_img_per_s"]:.1f} img/s)'
          f' is slower than the step ({r["img_per_s"]:.1f} img/s): training '
          'would starve on this host')
  if r['peer_img_per_s'] is None:
    say(f'  peer      PyTorch peer skipped: {r["peer_note"]}')
  else:
    say(f'  peer      {r["peer_note"]}: {r["peer_img_per_s"]:.1f} img/s '
        f'(median {1e3 * r["peer_step_s"]:.1f} ms; {_host(r["peer_host"])})')
    say(f'  ratio mimjax/PyTorch: {r["ratio"]:.2f}x (mimjax '
        f'{r["img_per_s"]:.1f} img/s, PyTorch {r["peer_img_per_s"]:.1f} '
        f'img/s; {_spread(r["round_ratios"])})')
    say('  switch    the untimed first step of each turn: mimjax median '
        f'{1e3 * statistics.median(r["switch_step_s_all"]):.1f} ms, PyTorch '
        f'{1e3 * statistics.median(r["peer_switch_step_s_all"]):.1f} ms')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=None,
                      help='global batch (default: 16 on CPU, 256 elsewhere;'
                      ' 8 with --quick)')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps, at least 5 (default 10; 5 --quick)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes: a smoke run of this script')
  parser.add_argument('--out', default='', help='write a JSON record here')
  args = parser.parse_args(argv)

  # The peer first: torch must load before TensorFlow (see import_peer).
  peer, peer_why = import_peer()
  backend = jax.default_backend()
  on_cpu = backend == 'cpu'
  if args.batch is None:
    args.batch = 8 if args.quick else (16 if on_cpu else 256)
  if args.steps is None:
    args.steps = 5 if args.quick else 10
  if args.steps < 5:
    parser.error('--steps must be at least 5')
  dtype = step_dtype()
  devices = jax.devices()
  kind, count = devices[0].device_kind, len(devices)
  peak = flops.peak_tflops(kind)
  versions = _versions(peer)
  no_peer = peer_unavailable(peer, peer_why)
  lead = jax.process_index() == 0
  say = print if lead else (lambda *_, **__: None)

  say(f'mimjax bench{" --quick (tiny sizes, a smoke run)" if args.quick else ""}:'
      f' {count} x {kind} ({backend}), {dtype}, batch {args.batch}, '
      f'{args.warmup} warm-up + {args.steps} timed steps'
      + ('' if no_peer else ', taking turns with the peer in rounds of 1 '
         'untimed + 2 timed'))
  say('  ' + ', '.join(f'{k} {v}' for k, v in versions.items() if v)
      + (f'; peak {peak:g} TFLOP/s per chip (dense bf16)' if peak else
         '; no peak known'))
  cpu = host_cpu()
  say(f'  host CPU {cpu["model"]}, {cpu["cores"]} cores; ' + ', '.join(
      name if name in cpu['isa'] else f'no {name}' for name in CPU_ISA))
  for name in ('XLA_FLAGS', 'GLIBC_TUNABLES'):
    if os.environ.get(name):
      say(f'  {name}={os.environ[name]}')
  try:
    from mimjax.training import trainers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    # trainers imports mimjax.data (the fine-tuning loss uses its
    # mixup_cutmix), and with it TensorFlow.
    sys.exit(f'mimjax.training.trainers does not import ({type(e).__name__}:'
             f' {e}); it needs tensorflow and tensorflow_datasets '
             '(via mimjax.data)')

  record = dict(
      timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      quick=args.quick, versions=versions,
      device=dict(backend=backend, kind=kind, count=count,
                  peak_tflops_per_chip=peak),
      host_cpu=cpu,
      batch=args.batch, dtype=dtype, warmup=args.warmup, steps=args.steps,
      xla_flags=os.environ.get('XLA_FLAGS') or None,
      glibc_tunables=os.environ.get('GLIBC_TUNABLES') or None,
      peer_skipped=no_peer,
      configurations=[])
  pipelines, results = {}, []
  for bench in benches(on_cpu):
    say(f'timing {bench.name}: mimjax'
        + ('' if no_peer else ' and the PyTorch peer, taking turns'),
        flush=True)
    numbers, shape, step, finish = build_mimjax(bench, args, dtype)
    r = dict(name=bench.name, kind=bench.kind, batch=args.batch, dtype=dtype,
             shape=shape, device_kind=kind, **numbers)
    r.update(peer_img_per_s=None, peer_step_s=None, peer_step_s_all=None,
             peer_host=None, peer_switch_step_s_all=None, peer_note=no_peer,
             ratio=None, round_ratios=None)
    steps, free_peer = {'mimjax': step}, None
    if not no_peer:
      try:
        peer_step, r['peer_note'], free_peer = build_peer(
            peer, bench.kind, shape, args.batch)
        peer_step()  # fails here, not halfway through the turns
        steps['peer'] = peer_step
      except Exception as e:  # pylint: disable=broad-except
        r['peer_note'] = f'failed: {type(e).__name__}: {str(e)[:200]}'
    try:
      timed, rounds = taking_turns(steps, args.warmup, args.steps)
    except Exception as e:  # pylint: disable=broad-except
      if 'peer' not in steps:
        raise
      r['peer_note'] = f'failed: {type(e).__name__}: {str(e)[:200]}'
      del steps['peer']  # and mimjax alone; its own error would raise again
      timed, rounds = taking_turns(steps, args.warmup, args.steps)
    if free_peer:
      free_peer()
    r.update(finish())
    median, times, host, switches = timed['mimjax']
    r.update(step_s=median, step_s_all=times, img_per_s=args.batch / median,
             host=host, switch_step_s_all=switches or None)
    if 'peer' in timed:
      median, times, host, switches = timed['peer']
      r.update(peer_img_per_s=args.batch / median, peer_step_s=median,
               peer_step_s_all=times, peer_host=host,
               peer_switch_step_s_all=switches)
      r['ratio'] = r['img_per_s'] / r['peer_img_per_s']
      r['round_ratios'] = [t['peer'] / t['mimjax'] for t in rounds]
    config = make_config(bench, args.batch, dtype, args.quick)
    r['model_flops_per_step'] = float(args.batch *
                                      model_flops(config, bench.kind))
    r['achieved_tflops'] = r['model_flops_per_step'] / r['step_s'] / 1e12
    r['mfu'] = (r['achieved_tflops'] / (peak * count) if peak else None)
    try:
      r.update(bench_pipeline(
          config.pretrain.data if bench.kind == 'pretrain' else config.data,
          bench.kind, args.batch, args.quick, pipelines))
    except Exception as e:  # pylint: disable=broad-except
      r.update(input_img_per_s=None,
               input_note=f'failed: {type(e).__name__}: {str(e)[:200]}')
    results.append((bench, r))
  for bench, r in results:
    report(bench, r, args.batch, peak, say)
    record['configurations'].append(r)

  if args.out and lead:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(_finite(record), f, indent=1, allow_nan=False, default=str)
    say(f'\nJSON record: {args.out}')
  return record


if __name__ == '__main__':
  main()
