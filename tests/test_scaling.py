"""mimjax.tools.scaling: the HLO collective parser, the FLOP model, the command."""

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mimjax import build
from mimjax import flops
from mimjax.tools import scaling

HERE = os.path.dirname(os.path.abspath(__file__))

# A hand-written module with one of each case the parser must handle.
HLO = """\
HloModule jit_step, entry_computation_layout={(f32[8,32]{1,0})->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_computation (p: f32[8,32]) -> f32[8,32] {
  %p = f32[8,32]{1,0} parameter(0)
  ROOT %n = f32[8,32]{1,0} negate(%p)
}

%body (t: (s32[], f32[10])) -> (s32[], f32[10]) {
  %t = (s32[], f32[10]{0}) parameter(0)
  %x = f32[10]{0} get-tuple-element(%t), index=1
  %ar.loop = f32[10]{0} all-reduce(%x), channel_id=9, replica_groups=[2,4]<=[8], to_apply=%add
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %out = (s32[], f32[10]{0}) tuple(%i, %ar.loop)
}

%cond (t: (s32[], f32[10])) -> pred[] {
  %t = (s32[], f32[10]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%wrapped_all_to_all (w: bf16[8,16]) -> bf16[8,16] {
  %w = bf16[8,16]{1,0} parameter(0)
  ROOT %a2a = bf16[8,16]{1,0} all-to-all(%w), channel_id=7, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

ENTRY %main.1 (arg: f32[8,32]) -> f32[] {
  %arg = f32[8,32]{1,0} parameter(0)
  %f = f32[8,32]{1,0} fusion(%arg), kind=kLoop, calls=%fused_computation
  %ar = (f32[1024]{0}, bf16[16,16]{1,0}, /*index=2*/f32[]) all-reduce(%f, %f, %f), channel_id=1, replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add
  %ag = f32[64,32]{1,0} all-gather(%f), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={0}, use_global_device_ids=true
  %rs = f32[2,32]{1,0} reduce-scatter(%f), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %ags = (f32[8,32]{1,0}, f32[16,32]{1,0}) all-gather-start(%f), channel_id=4, replica_groups=[4,2]<=[8], dimensions={0}
  %agd = f32[16,32]{1,0} all-gather-done(%ags)
  %cps = (f32[8,32]{1,0}, f32[8,32]{1,0}, u32[], u32[]) collective-permute-start(%f), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8,32]{1,0} collective-permute-done(%cps)
  %as = ((bf16[8,16]{1,0}), bf16[8,16]{1,0}) async-start(%h), calls=%wrapped_all_to_all
  %ad = bf16[8,16]{1,0} async-done(%as), calls=%wrapped_all_to_all
  %init = (s32[], f32[10]{0}) tuple(%c0, %v)
  %w = (s32[], f32[10]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[] constant(0)
}
"""


def test_array_bytes_and_tuples():
  assert scaling.array_bytes('f32[8,32]{1,0}') == 8 * 32 * 4
  assert scaling.array_bytes('(bf16[4]{0}, /*index=1*/s32[], pred[2])') == 8 + 4 + 2
  assert scaling.array_bytes('f32[128,256]{1,0:T(8,128)}') == 128 * 256 * 4
  assert scaling.tuple_elements('((f32[2]{0}, f32[3]{0}), f32[6]{0})') == [
      '(f32[2]{0}, f32[3]{0})', 'f32[6]{0}']
  assert scaling.tuple_elements('f32[6]{0}') == ['f32[6]{0}']


def test_collective_bytes_of_a_handwritten_module():
  r = scaling.collective_bytes(HLO, num_devices=8)
  assert r['all-reduce']['ops'] == 1 + 3  # the combined one, the loop's 3x
  assert r['all-reduce']['bytes'] == (1024 * 4 + 16 * 16 * 2 + 4) + 3 * 40
  assert r['all-reduce']['groups'] == {8: [1, 4612], 4: [3, 120]}
  # the gathered result; the -start's (operand, result) tuple: the result
  assert r['all-gather']['ops'] == 2
  assert r['all-gather']['bytes'] == 64 * 32 * 4 + 16 * 32 * 4
  assert r['all-gather']['groups'] == {4: [1, 8192], 2: [1, 2048]}
  # the unscattered operand: result x group size
  assert r['reduce-scatter'] == {'ops': 1, 'bytes': 2 * 32 * 4 * 4,
                                 'groups': {4: [1, 1024]}}
  # wrapped in async-start: counted once, not again for async-done
  assert r['all-to-all'] == {'ops': 1, 'bytes': 8 * 16 * 2,
                             'groups': {8: [1, 256]}}
  assert r['collective-permute'] == {'ops': 1, 'bytes': 8 * 32 * 4,
                                     'groups': {None: [1, 1024]}}
  assert not r['unknown_trip_count']
  unknown = scaling.collective_bytes(
      HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', ''))
  assert unknown['unknown_trip_count']
  assert unknown['all-reduce']['ops'] == 2


def _dot_flops(jaxpr) -> int:
  """2 × output elements × contracted size of every dot and convolution."""
  total = 0
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          total += _dot_flops(sub)
    if eqn.primitive.name == 'dot_general':
      (lhs, _), _ = eqn.params['dimension_numbers']
      shape = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          shape[d] for d in lhs)
    elif eqn.primitive.name == 'conv_general_dilated':
      kernel = eqn.invars[1].aval.shape  # HWIO after flax's layout
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          kernel[:-1])
  return total


@pytest.mark.parametrize('size', ['mu', 'B'])
def test_flop_model_counts_the_models_matmuls(size):
  """The forward FLOPs of the model equal the matmuls and the patch
  convolution of the real pre-training forward pass (traced, not run)."""
  sys.path.insert(0, HERE)
  from tiny_config import tiny_config  # pylint: disable=g-import-not-at-top
  config = (tiny_config(None) if size == 'mu' else scaling.recipe(size))
  model = build.mim_model(config)
  image = config.pretrain.data.image_size
  images = jax.ShapeDtypeStruct((1, image, image, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda rng: model.init({'params': rng, 'mask': rng},
                             jnp.zeros((1, image, image, 3))),
      jax.random.key(0))
  jaxpr = jax.make_jaxpr(
      lambda v, x: model.apply(v, x, train=True,
                               rngs={'mask': jax.random.key(1),
                                     'dropout': jax.random.key(2)}))(
                                         variables, images)
  flops = scaling.recipe_flops(config)
  assert _dot_flops(jaxpr.jaxpr) == flops['forward']
  assert flops['train'] == 3 * flops['forward']


def test_flop_model_of_vit_b_by_hand():
  # The 49 kept patches embedded, 12 blocks on 50 tokens at 768, 8 decoder
  # blocks on 197 at 512.
  f = flops.mae_flops('B', 16)
  block = lambda n, d: 24 * n * d * d + 4 * n * n * d
  assert f['encoder'] == 2 * 49 * 768 * 768 + 12 * block(50, 768)
  assert f['decoder'] == (2 * 50 * 768 * 512 + 8 * block(197, 512)
                          + 2 * 197 * 512 * 768)
  assert scaling.recipe_flops(scaling.recipe('B'))['steps'] == 800 * 312


def test_table_command():
  out = subprocess.run(
      [sys.executable, '-m', 'mimjax.tools.scaling', '--table'],
      capture_output=True, text=True, timeout=120, cwd=os.path.dirname(HERE))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == scaling.tables()
  # Quiet by default: no library INFO logs (absl's 'I1128 12:00:00...').
  assert not re.search(r'^I\d{4} ', out.stderr, re.M), out.stderr
  assert '| ViT-L | TPU v4 | 64 | 64 |' in out.stdout


def test_collectives_command_on_four_devices():
  """Data x FSDP on 4 simulated devices: weights are gathered over the fsdp
  pairs, gradients reduced; the data-parallel gradient all-reduce alone is
  at least 4 bytes per parameter."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
         'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  out = subprocess.run(
      [sys.executable, '-m', 'mimjax.tools.scaling', '--devices=4',
       f'--config={HERE}/tiny_config.py', '--config.mesh=(2,2,1)'],
      capture_output=True, text=True, timeout=300, env=env,
      cwd=os.path.dirname(HERE))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[0].startswith(
      "pretrain step compiled for 4 devices, mesh {'data': 2, 'fsdp': 2, "
      "'tensor': 1}, "), lines
  params = int(lines[0].split(', ')[-2].split()[0].replace(',', ''))
  figures = {}
  for line in lines[2:]:
    words = line.split()
    if words[0] in scaling.KINDS:
      figures[words[0]] = int(words[3].replace(',', ''))
  assert sorted(figures) == sorted(scaling.KINDS)
  assert figures['all-gather'] > 0
  assert figures['all-reduce'] >= 4 * params / 2  # fsdp halves each shard
  assert '    over 2 devices:' in out.stdout
