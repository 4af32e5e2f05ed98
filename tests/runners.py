"""Run a gradient transformation over 8 workers in each mapping context.

Shared by the test files: the same `tx` is stepped through a sequence of
per-worker gradients under `jax.vmap(axis_name=...)`, `jax.jit(jax.shard_map)`
and `jax.pmap`, returning every worker's outputs so tests can compare the
contexts with each other and with NumPy references.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs

AXIS = "data"
CONTEXTS = ("vmap", "shard_map", "pmap")


def run_steps(tx, params, grads_seq, context, mesh=None):
  """Steps ``tx`` through ``grads_seq`` with one worker per leading entry.

  Args:
    tx: an optax GradientTransformation (with axis_name=AXIS inside).
    params: the parameter pytree (passed to init and update).
    grads_seq: pytree whose leaves are ``[steps, workers, ...]``.
    context: one of CONTEXTS.
    mesh: a ("data",) mesh with as many devices as workers (shard_map).

  Returns:
    (outputs with leaves ``[steps, workers, ...]``, final state in the
    context's global layout).
  """
  steps = jax.tree.leaves(grads_seq)[0].shape[0]
  workers = jax.tree.leaves(grads_seq)[0].shape[1]
  update = lambda g, s: tx.update(g, s, params)

  if context == "vmap":
    state = jax.vmap(lambda _: tx.init(params))(jnp.arange(workers))
    step = jax.jit(jax.vmap(update, axis_name=AXIS))
  elif context == "pmap":
    state = jax.pmap(lambda _: tx.init(params))(jnp.arange(workers))
    step = jax.pmap(update, axis_name=AXIS)
  elif context == "shard_map":
    specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), AXIS)
    state = jax.jit(jax.shard_map(lambda: tx.init(params), mesh=mesh,
                                  in_specs=(), out_specs=specs))()

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(P(AXIS), specs), out_specs=(P(AXIS), specs))
    def step(grads, state):
      local = jax.tree.map(lambda g: g[0], grads)
      out, state = update(local, state)
      return jax.tree.map(lambda o: o[None], out), state
  else:
    raise ValueError(context)

  outputs = []
  for t in range(steps):
    grads = jax.tree.map(lambda g: g[t], grads_seq)
    if context == "shard_map":
      grads = jax.device_put(grads, NamedSharding(mesh, P(AXIS)))
    out, state = step(grads, state)
    # Block each step: 8 virtual CPU devices on 2 cores can deadlock XLA's
    # collective rendezvous when many steps are in flight.
    outputs.append(jax.block_until_ready(out))
  stacked = jax.tree.map(lambda *o: np.stack([np.asarray(x) for x in o]),
                         *outputs)
  return stacked, state


def shard_map_training_step(tx, params, mesh, grad_fn, axis=AXIS):
  """The data-parallel step a user writes by hand (README "Training under
  shard_map"): replicated params, per-worker optimizer state, the batch
  split over ``axis``.

  Args:
    tx: an optax GradientTransformation (with axis_name=axis inside).
    params: the parameter pytree (replicated).
    mesh: a mesh with ``axis``.
    grad_fn: ``(params, x, y) -> grads``, this worker's local gradients.
    axis: the mesh axis of the workers.

  Returns:
    (jitted ``step(params, opt_state, x, y) -> (params, opt_state)``, the
    initial ``opt_state`` laid out by `gs.state_partition_specs`).
  """
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), axis)
  opt_state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(),
                                    out_specs=specs))(params)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), specs, P(axis), P(axis)),
                     out_specs=(P(), specs))
  def step(params, opt_state, x, y):
    updates, opt_state = tx.update(grad_fn(params, x, y), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step, opt_state


def worker_rows(x, workers):
  """A per-worker state leaf as ``[workers, ...]`` whatever the context."""
  x = np.asarray(x)
  return x.reshape((workers,) + x.shape[-1:]) if x.ndim > 1 else x


def collectives(text):
  """(operand types of every all-reduce, number of all-gathers) in StableHLO."""
  reduces = re.findall(r'"stablehlo\.all_reduce".*?\}\) : \((tensor<[^>]*>)',
                       text, flags=re.S)
  return reduces, len(re.findall(r"all[_-]gather", text))


def compiled_collectives(hlo_text):
  """(op, element count) of each all-reduce / all-gather in compiled HLO."""
  found = []
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*\(?([a-z0-9]+)\[([0-9,]*)\][^=]*?\s"
                      r"(all-reduce|all-gather)(-start)?\(", line)
    if match:
      dims = [int(d) for d in match.group(2).split(",") if d]
      found.append((match.group(3), int(np.prod(dims)) if dims else 1))
  return found


def lowered_step_text(compressor, mesh, d=2000, feedback="ef21"):
  """StableHLO of a jitted shard_map training step over 8 workers."""
  tx = optax.chain(gs.sparsify(compressor, feedback=feedback, axis_name=AXIS,
                               nonfinite="ignore"), optax.sgd(0.1))
  params = jnp.zeros(d)
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), AXIS)
  state = jax.jit(jax.shard_map(lambda: tx.init(params), mesh=mesh,
                                in_specs=(), out_specs=specs))()

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(AXIS), specs),
                     out_specs=(P(), specs))
  def step(grads, state):
    return tx.update(grads[0], state, params)

  workers = mesh.shape[AXIS]
  grads = jax.device_put(jnp.ones((workers, d)),
                         NamedSharding(mesh, P(AXIS)))
  return step.lower(grads, state).as_text()


def normal_grads(params, steps, workers, seed=0):
  """Gaussian gradients shaped like ``params``: leaves ``[steps, workers, ...]``."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=(steps, workers) + p.shape),
                            jnp.float32), params)


def flat(tree):
  """Leaves ``[steps, workers, ...]`` concatenated in pytree-leaf order."""
  leaves = jax.tree.leaves(tree)
  lead = leaves[0].shape[:2]
  return np.concatenate([np.asarray(l).reshape(lead + (-1,)) for l in leaves],
                        axis=-1)


def assert_every_worker_matches(outputs, expected, memory, expected_memory,
                                rtol=1e-5, atol=1e-6):
  """Every worker's outputs equal the reference's, and so do the memories.

  Args:
    outputs: ``[steps, workers, d]``, what every worker's step returned.
    expected: ``[steps, d]``, the reference's outputs (the same for all).
    memory: a per-worker state leaf in the context's global layout.
    expected_memory: ``[workers, d]``, the reference's final memories.
  """
  outputs = np.asarray(outputs)
  for worker in range(outputs.shape[1]):
    np.testing.assert_allclose(outputs[:, worker], expected, rtol=rtol,
                               atol=atol)
  np.testing.assert_allclose(worker_rows(memory, outputs.shape[1]),
                             expected_memory, rtol=rtol, atol=atol)
