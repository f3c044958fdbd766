"""Collective bytes of the compiled pre-training step, and a FLOP model.

Why this module is long: the HLO byte count (parsing, loops, replica
groups) and the tables built on the FLOP model (`mimjax.flops`) are one
command, and read best together.

  python -m mimjax.tools.scaling --table
  python -m mimjax.tools.scaling --config=configs/mae_imagenet.py:L \
      --devices=8 --config.mesh='(1,8,1)' --config.pretrain.batch_size=8

`--table` prints the FLOP model of MAE pre-training on ImageNet-1k
(`configs/mae_imagenet.py`) and, from it, per-chip step times and hours for
the whole schedule at an assumed MFU, and the bandwidth per chip that the
weights' and gradients' collectives need to hide behind a step: arithmetic,
nothing is compiled or run (docs/scaling.md).

With `--config`, the pre-training step is compiled as `memcheck` compiles it
(`memory.compile_step`; `--devices=N` simulates N CPU devices) and the
collectives in its optimized HLO are summed per kind. What is counted:

  * every all-reduce, all-gather, reduce-scatter, all-to-all and
    collective-permute instruction of the compiled module (the synchronous
    op, or the `-start` half of an asynchronous pair; `-done` is not
    counted again; an op wrapped in `async-start` is counted once, in the
    computation it wraps);
  * once per execution on one device: an op inside a `while` body counts
    as many times as XLA's `known_trip_count` says (once, and reported as
    such, when XLA does not know it); an op in a conditional branch counts
    as if every branch ran;
  * its bytes are those of the whole buffer the op works on, per device:
    the result of an all-reduce, all-to-all or collective-permute (the
    same shapes as its operands), the gathered result of an all-gather,
    and the unscattered operand of a reduce-scatter (its result times the
    size of its replica group). A tuple-shaped (combined) op counts every
    element.

This is the size of what the op reduces or assembles, not the bytes a
device puts on the wire: on a ring of n devices those are about
2(n-1)/n of it for an all-reduce and (n-1)/n for an all-gather or a
reduce-scatter. The ops and shapes are those of the backend that compiled
the step: the CPU backend, for instance, writes a gradient reduce-scatter
as an all-reduce followed by a slice, a pattern XLA's GPU and TPU pipelines
turn into a reduce-scatter.
"""

from __future__ import annotations

import collections
import math
import re
import sys


from mimjax.tools import quiet_logs, simulate_devices  # pylint: disable=g-import-not-at-top


if __name__ == '__main__':
  simulate_devices(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
from mimjax import errors, flops

# ---------------------------------------------------------------- HLO bytes

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
         'collective-permute')

DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
    's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
    'c128': 16, 's4': 0.5, 'u4': 0.5, 's2': 0.25, 'u2': 0.25,
}
_ARRAY = re.compile(r'\b([a-z]\w*?)\[([\d,]*)\]')
_INSTRUCTION = re.compile(
    r'^\s+(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+'
    r'(?P<op>[a-z][\w\-]*)\(')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s')
_CALLEES = re.compile(
    r'\b(body|condition|calls|to_apply|true_computation|false_computation|'
    r'branch_computations)=\{?([^,}\s]+(?:,\s*%[\w.\-]+)*)\}?')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def array_bytes(type_text: str) -> int:
  """Bytes of every array in an HLO type: `f32[8,16]{1,0}`, or a tuple of
  them (token and opaque elements count 0)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype not in DTYPE_BYTES:
      if dtype.startswith('f8') or dtype.startswith('f4'):
        size = 1 if dtype.startswith('f8') else 0.5
      else:
        continue
    else:
      size = DTYPE_BYTES[dtype]
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return int(total)


def tuple_elements(type_text: str) -> list[str]:
  """The top-level elements of a tuple type (the type itself if not one)."""
  text = re.sub(r'/\*.*?\*/', '', type_text).strip()
  if not text.startswith('('):
    return [text]
  elements, depth, start = [], 0, 1
  for i, char in enumerate(text):
    if char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
      if depth == 0:
        elements.append(text[start:i])
        break
    elif char == ',' and depth == 1:
      elements.append(text[start:i])
      start = i + 1
  return [e.strip() for e in elements if e.strip()]


def group_size(line: str, num_devices: int | None = None) -> int | None:
  """Devices in one replica group of a collective, from its attributes."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{('[^}]*)\}", line)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
    axes = re.findall(r"'([^']+)'", mesh.group(2))
    return math.prod(int(sizes[a]) for a in axes)
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if iota:
    return int(iota.group(2))
  listed = re.search(r'replica_groups=\{\{([\d,]*)\}', line)
  if listed:
    return len(listed.group(1).split(','))
  if re.search(r'replica_groups=\{\}', line):
    return num_devices
  return None


def _computations(hlo_text: str):
  """{name: [instruction lines]} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      header = _HEADER.match(line)
      if header and not line.startswith('HloModule'):
        current = header.group('name')
        computations[current] = []
        if line.startswith('ENTRY'):
          entry = current
        continue
    if line.startswith('}'):
      current = None
    elif current is not None and line.strip():
      computations[current].append(line)
  return computations, entry


def _executions(computations, entry):
  """How often each computation runs per execution of the entry, and
  whether some while loop had no known trip count."""
  calls = collections.defaultdict(list)
  unknown = False
  for name, lines in computations.items():
    for line in lines:
      found = _INSTRUCTION.match(line)
      if not found:
        continue
      op = found.group('op')
      if op.endswith('-done') or op == 'async-update':
        continue  # its computation is counted from the -start
      trips = 1
      if op == 'while':
        count = _TRIP_COUNT.search(line)
        trips = int(count.group(1)) if count else 1
        unknown |= count is None
      for attr, names in _CALLEES.findall(line):
        for callee in re.findall(r'%?([\w.\-]+)', names):
          calls[name].append((callee, trips if attr == 'body' else 1))
  runs = collections.Counter()

  def visit(name, times):
    runs[name] += times
    for callee, factor in calls.get(name, ()):
      if callee in computations:
        visit(callee, times * factor)

  visit(entry, 1)
  return runs, unknown


def collective_bytes(hlo_text: str, num_devices: int | None = None) -> dict:
  """Collectives of a compiled HLO module, per kind, per execution on one
  device: {kind: {'ops', 'bytes', 'groups': {group size: [ops, bytes]}}},
  and 'unknown_trip_count' (see the module docstring for what is counted)."""
  computations, entry = _computations(hlo_text)
  if entry is None:
    raise errors.Invalid('no ENTRY computation in the HLO text')
  runs, unknown = _executions(computations, entry)
  result = {kind: {'ops': 0, 'bytes': 0, 'groups': {}} for kind in KINDS}
  for name, lines in computations.items():
    if not runs[name]:
      continue
    for line in lines:
      found = _INSTRUCTION.match(line)
      if not found:
        continue
      op, type_text = found.group('op'), found.group('type')
      kind = op[:-len('-start')] if op.endswith('-start') else op
      if kind not in KINDS:
        continue
      group = group_size(line, num_devices)
      if op.endswith('-start') and kind == 'all-gather':
        type_text = tuple_elements(type_text)[-1]  # (operands, results)
      elif op.endswith('-start') and kind == 'collective-permute':
        type_text = tuple_elements(type_text)[0]  # (operand, result, ...)
      size = array_bytes(type_text)
      if kind == 'reduce-scatter':
        size *= group or 1
      entry_ = result[kind]
      entry_['ops'] += runs[name]
      entry_['bytes'] += runs[name] * size
      per_group = entry_['groups'].setdefault(group, [0, 0])
      per_group[0] += runs[name]
      per_group[1] += runs[name] * size
  result['unknown_trip_count'] = unknown
  return result


def step_collectives(config) -> dict:
  """Compiles the config's pre-training step and sums its collectives."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mimjax.tools import memory  # pylint: disable=import-outside-toplevel
  compiled, state, mesh = memory.compile_step(config)
  return {
      'devices': jax.device_count(),
      'mesh': dict(mesh.shape),
      'num_params': sum(int(np.prod(x.shape))
                        for x in jax.tree.leaves(state.params)),
      'batch_size': config.pretrain.batch_size,
      'collectives': collective_bytes(compiled.as_text(), jax.device_count()),
  }


def format_collectives(r: dict) -> str:
  lines = [f"pretrain step compiled for {r['devices']} devices, mesh "
           f"{r['mesh']}, {r['num_params']:,} parameters, "
           f"{r['batch_size']} images per step",
           'collectives per step, per device (bytes of the buffer each op '
           'reduces or assembles):']
  c = r['collectives']
  for kind in KINDS:
    lines.append(f"  {kind:<19}{c[kind]['ops']:>5} ops {c[kind]['bytes']:>15,} B"
                 f"  ({c[kind]['bytes'] / 1e6:,.1f} MB)")
    for group, (ops, size) in sorted(c[kind]['groups'].items(),
                                     key=lambda kv: (kv[0] or 0)):
      where = f'over {group} devices' if group else 'group size unknown'
      lines.append(f'    {where}: {ops} ops, {size:,} B')
  if c['unknown_trip_count']:
    lines.append('  note: a while loop has no known trip count; its '
                 'collectives are counted once')
  return '\n'.join(lines)


# ---------------------------------------------------------------- FLOP model

IMAGENET_TRAIN = 1_281_167
# The chips of the tables, with their dense bf16 peaks (mimjax.flops).
PEAK_TFLOPS = {chip: flops.peak_tflops(chip)
               for chip in ('TPU v4', 'TPU v5p', 'H100')}
MFUS = (0.4, 0.5)  # the assumed model FLOPs utilisation
PODS = (64, 256)
SIZES = ('B', 'L', 'H')


def recipe(size: str):
  """The MAE ImageNet recipe of a size (configs/mae_imagenet.py)."""
  from configs import mae_imagenet  # pylint: disable=import-outside-toplevel
  return mae_imagenet.get_config(size)


def recipe_flops(config) -> dict:
  c = config.pretrain
  per_image = flops.mae_flops(config.model.size, config.model.patch_size,
                              c.data.image_size, c.mask_ratio,
                              c.decoder.width, c.decoder.depth)
  steps = c.epochs * (IMAGENET_TRAIN // c.batch_size)  # trainers.stage_steps
  return dict(per_image, batch_size=c.batch_size, epochs=c.epochs,
              steps=steps, step=per_image['train'] * c.batch_size)


def flop_table(sizes=SIZES) -> str:
  rows = ['| model | tokens (encoder / decoder) | encoder forward | '
          'decoder forward | training, per image | per step | steps | '
          'whole schedule |',
          '|---|---|---|---|---|---|---|---|']
  for size in sizes:
    config = recipe(size)
    f = recipe_flops(config)
    rows.append(
        f"| ViT-{size}/{config.model.patch_size} | {f['encoder_tokens']} / "
        f"{f['decoder_tokens']} | {f['encoder'] / 1e9:.1f} GFLOP | "
        f"{f['decoder'] / 1e9:.1f} GFLOP | {f['train'] / 1e9:.1f} GFLOP | "
        f"{f['step'] / 1e15:.2f} PFLOP | {f['steps']:,} | "
        f"{f['step'] * f['steps'] / 1e18:,.0f} EFLOP |")
  return '\n'.join(rows)


def time_table(sizes=SIZES, chips=PODS, peaks=None, mfus=MFUS) -> str:
  peaks = peaks or PEAK_TFLOPS
  head = (['model', 'chip', 'chips', 'images per chip']
          + [f'step time, {m:.0%} MFU' for m in mfus]
          + [f'hours, {m:.0%} MFU' for m in mfus])
  rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for size in sizes:
    f = recipe_flops(recipe(size))
    for chip, peak in peaks.items():
      for n in chips:
        times = [f['step'] / n / (peak * 1e12 * m) for m in mfus]
        cells = ([f'ViT-{size}', chip, str(n), f"{f['batch_size'] // n}"]
                 + [f'{t * 1e3:.1f} ms' for t in times]
                 + [f"{t * f['steps'] / 3600:.2f} h" for t in times])
        rows.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def parameter_counts(config) -> dict[str, int]:
  """Parameters of the pre-training model per top-level module (encoder,
  decoder), from shapes only."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mimjax import build  # pylint: disable=import-outside-toplevel
  model = build.mim_model(config)
  size = config.pretrain.data.image_size
  variables = jax.eval_shape(
      lambda rng: model.init({'params': rng, 'mask': rng},
                             jnp.zeros((1, size, size, 3))),
      jax.random.key(0))
  return {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
          for name, tree in nn.meta.unbox(variables['params']).items()}


def parameter_count(config) -> int:
  return sum(parameter_counts(config).values())


def ring_bytes(num_params: int, data: int, fsdp: int,
               bytes_per_param: int = 4) -> float:
  """Bytes one device sends per step for the weights and gradients, on
  rings: with fsdp > 1 an all-gather of the weights (once per step, as
  measured without remat) and a reduce-scatter of the gradients over
  `fsdp`, then an all-reduce of the gradient shards over `data`; with
  fsdp = 1 one all-reduce over `data`. float32 weights and gradients."""
  full = bytes_per_param * num_params
  sent = 2 * (data - 1) / data * full / fsdp
  if fsdp > 1:
    sent += 2 * (fsdp - 1) / fsdp * full
  return sent


def wire_table(sizes=SIZES, chips=PODS, peaks=None, mfu=MFUS[0]) -> str:
  from mimjax import sharding  # pylint: disable=import-outside-toplevel
  peaks = peaks or PEAK_TFLOPS
  head = (['model', 'chips', 'default mesh', 'sent per device per step']
          + [f'GB/s, {chip}' for chip in peaks])
  rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for size in sizes:
    config = recipe(size)
    f = recipe_flops(config)
    params = parameter_count(config)
    for n in chips:
      (data, fsdp, tensor), _ = sharding.mesh_shapes(None, None, n, 1, size)
      assert tensor == 1
      sent = ring_bytes(params, data, fsdp)
      cells = [f'ViT-{size}', str(n), f'({data},{fsdp},{tensor})',
               f'{sent / 1e9:.2f} GB']
      for peak in peaks.values():
        step = f['step'] / n / (peak * 1e12 * mfu)
        cells.append(f'{sent / step / 1e9:.0f}')
      rows.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def tables() -> str:
  return '\n\n'.join([flop_table(), time_table(), wire_table()])


# ---------------------------------------------------------------- command


def main(argv):
  del argv
  quiet_logs()
  if FLAGS.table:
    print(tables())
    return
  if FLAGS.config is None:
    raise app.UsageError('--config (or --table) is required')
  try:
    r = step_collectives(FLAGS.config)
  except ValueError as e:
    print(f'scaling: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(format_collectives(r))


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Recipe file.',
                                  lock_config=True)
  flags.DEFINE_integer('devices', None,
                       'Simulated CPU devices (default: real).')
  flags.DEFINE_bool('table', False,
                    'Print the FLOP model and projected times; compile '
                    'nothing.')
  FLAGS = flags.FLAGS
  app.run(main)
