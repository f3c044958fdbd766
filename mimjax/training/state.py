"""Train state, created directly sharded on the mesh, and the jitted step."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mimjax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data, so it checkpoints as a plain array
  extra: Any = None  # e.g. BatchNorm statistics of the linear probe

  def step_rng(self) -> jax.Array:
    """A key for this step: a pure function of (seed, step), so resumes match."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _init_fn(init_variables, tx, seed):
  def init(key):
    variables = init_variables(key)
    params = variables['params']
    extra = {k: v for k, v in variables.items() if k != 'params'} or None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed + 1)),
                      extra=extra)
  return init


def abstract(init_variables, tx, seed: int, mesh, rules):
  """(ShapeDtypeStructs of the TrainState with their shardings, shardings)."""
  with sharding.active(mesh, rules):
    boxed = jax.eval_shape(_init_fn(init_variables, tx, seed),
                           jax.random.key(seed))
    shardings = sharding.tree_shardings(boxed, mesh, rules)
  return sharding.shaped(nn.meta.unbox(boxed), shardings), shardings


def create(init_variables: Callable[[jax.Array], dict],
           tx: optax.GradientTransformation, seed: int, mesh, rules,
           params_override=None):
  """Initialises a TrainState on the mesh; returns (state, state_shardings).

  `init_variables(key)` returns flax variables with logically partitioned
  parameters; nothing is materialised whole on one device.
  `params_override`, a (partial) tree of arrays, replaces those parameters
  (e.g. a pre-trained encoder) inside the same jitted initialisation.
  """
  init = _init_fn(init_variables, tx, seed)
  _, shardings = abstract(init_variables, tx, seed, mesh, rules)

  def init_unboxed(key, override):
    state = nn.meta.unbox(init(key))
    if override is not None:
      params = merge(state.params, override)
      state = state.replace(params=params, opt_state=tx.init(params))
    return state

  with sharding.active(mesh, rules):
    state = jax.jit(init_unboxed, out_shardings=shardings)(
        jax.random.key(seed), params_override)
  return state, shardings


def merge(params, override):
  """`params` with the leaves that `override` has replaced (same dtypes)."""
  if not isinstance(override, dict):
    return jnp.asarray(override, params.dtype)
  return {k: merge(v, override[k]) if k in override else v
          for k, v in params.items()}


def update_if_finite(tx, grads, state: TrainState, extra, finite):
  """(params, opt_state, extra) after the optimizer's step, or the old ones
  when the step produced a non-finite loss or gradient.

  A lax.cond rather than a select per leaf: selecting between the updated
  and the old state lets XLA recompute each Adam moment inside the
  parameter's update while overwriting the donated moment in place, so it
  copies every moment first (docs/performance.md).
  """
  def apply(params, opt_state, extra):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, extra

  def keep(params, opt_state, extra):
    del extra
    return params, opt_state, state.extra

  return jax.lax.cond(finite, apply, keep, state.params, state.opt_state,
                      extra)


def compiler_options(mesh) -> dict | None:
  """XLA options for the train step. On CPU, XLA hands the matmuls to
  YNNPACK / Eigen, and LLVM's optimisation level 1 over the remaining loops
  gives the same step time as the default level 3 in a quarter less compile
  time (docs/performance.md)."""
  if mesh.devices.flat[0].platform == 'cpu':
    return {'xla_backend_optimization_level': 1}
  return None


def _micro_batches(batch, accumulate: int, mesh):
  """Each (B, ...) leaf as (accumulate, B / accumulate, ...). Micro-batch i
  holds rows i, i + accumulate, ...: each device keeps its own rows, and
  every micro-batch is split over the batch axes like the batch."""
  split = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

  def one(x):
    x = x.reshape(x.shape[0] // accumulate, accumulate, *x.shape[1:])
    return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), split)
  return jax.tree.map(one, batch)


def make_train_step(loss_fn, tx, shardings, mesh, rules, accumulate: int = 1):
  """jit(step) with explicit shardings; the state buffer is donated.

  loss_fn(params, extra, batch, rng) -> (loss, (metrics, new_extra)).
  accumulate=k: one update from k micro-batches of B / k, one after another
  (a lax.scan), with the gradients, loss and metrics averaged over them;
  micro-batch i draws from fold_in(step_rng, i), and `extra` passes from
  each micro-batch to the next.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(state, batch):
    rng = state.step_rng()

    def micro_step(carry, xs):
      extra, grad_sum = carry
      i, micro = xs
      (loss, (metrics, extra)), grads = grad_fn(
          state.params, extra, micro, jax.random.fold_in(rng, i))
      return (extra, jax.tree.map(jnp.add, grad_sum, grads)), (loss, metrics)

    zeros = jax.lax.with_sharding_constraint(
        jax.tree.map(jnp.zeros_like, state.params), shardings.params)
    (extra, grad_sum), (losses, metrics) = jax.lax.scan(
        micro_step, (state.extra, zeros),
        (jnp.arange(accumulate), _micro_batches(batch, accumulate, mesh)))
    mean = lambda x: jnp.mean(x, axis=0)
    grads = jax.tree.map(lambda g: g / accumulate, grad_sum)
    return (mean(losses), (jax.tree.map(mean, metrics), extra)), grads

  def step(state: TrainState, batch):
    if accumulate == 1:
      (loss, (metrics, extra)), grads = grad_fn(
          state.params, state.extra, batch, state.step_rng())
    else:
      (loss, (metrics, extra)), grads = accumulated(state, batch)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state, extra = update_if_finite(tx, grads, state, extra,
                                                finite)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, extra=extra)
    metrics = {**metrics, 'loss': loss, 'grad_norm': grad_norm,
               'finite': finite}
    return new_state, metrics

  batch_sharding = sharding.batch_sharding(mesh)
  jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, sharding.replicated(mesh)),
                   donate_argnums=0, compiler_options=compiler_options(mesh))

  def run(state, batch):
    with sharding.active(mesh, rules):
      return jitted(state, batch)
  run.jitted = jitted
  return run
