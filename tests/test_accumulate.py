"""`gs.multi_steps`: accumulate k micro-gradients, compress and send once.

The collectives are counted at run time: `jax.lax`'s collectives are wrapped
so that each execution also runs a `jax.debug.callback` that bumps a host
counter (a callback inside an untaken `lax.cond` branch never runs).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
import references

AXIS = "data"
WORKERS = 8
D = 12
K_SENT = 3  # values each worker sends per optimizer step
EVERY = 3  # micro-batches per optimizer step
OPT_STEPS = 2


def _micro_grads(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(EVERY * OPT_STEPS, WORKERS, D)).astype(np.float32)


def _specs(tx, params):
  """Partition specs of the state of ``tx``. `gs.state_partition_specs`
  refuses optax.MultiSteps around sparsify; to measure what it would do,
  its accumulator is made per worker by hand and the rest replicated."""
  abstract = jax.eval_shape(tx.init, params)
  if not isinstance(abstract, optax.MultiStepsState):
    return gs.state_partition_specs(abstract, AXIS)
  replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
  return optax.MultiStepsState(
      mini_step=P(), gradient_step=P(),
      inner_opt_state=gs.state_partition_specs(abstract.inner_opt_state, AXIS),
      acc_grads=jax.tree.map(lambda _: P(AXIS), abstract.acc_grads),
      skip_state=replicated(abstract.skip_state))


def _run(tx, grads_seq, context, mesh):
  """Steps ``tx`` over ``[steps, workers, D]`` gradients; outputs per step."""
  params = jnp.zeros(D)
  update = lambda g, s: tx.update(g, s, params)
  if context == "vmap":
    state = jax.vmap(lambda _: tx.init(params))(jnp.arange(WORKERS))
    step = jax.jit(jax.vmap(update, axis_name=AXIS))
  else:
    specs = _specs(tx, params)
    state = jax.jit(jax.shard_map(lambda: tx.init(params), mesh=mesh,
                                  in_specs=(), out_specs=specs))()

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(AXIS), specs),
                       out_specs=(P(AXIS), specs))
    def step(grads, state):
      out, state = update(grads[0], state)
      return out[None], state

  outputs = []
  for grads in grads_seq:
    if context == "shard_map":
      grads = jax.device_put(grads, NamedSharding(mesh, P(AXIS)))
    out, state = step(grads, state)
    outputs.append(np.asarray(jax.block_until_ready(out)))
  return np.stack(outputs), state


def _top_k_ef(every_k):
  return gs.multi_steps(gs.sparsify(gs.top_k(k=K_SENT), axis_name=AXIS),
                        every_k)


@pytest.mark.parametrize("context", ["vmap", "shard_map"])
def test_equals_numpy_mean_of_micro_gradients_then_top_k_with_ef(context,
                                                                  mesh):
  grads = _micro_grads()
  outputs, _ = _run(_top_k_ef(EVERY), grads, context, mesh)
  # Reference: average each worker's k micro-gradients, then Top-k + EF.
  means = grads.astype(np.float64).reshape(OPT_STEPS, EVERY, WORKERS,
                                           D).mean(1)
  expected = references.feedback_run(
      means, references.per_worker(references.top_k_select(K_SENT))).outputs
  for t in range(EVERY * OPT_STEPS):
    for worker in range(WORKERS):
      if (t + 1) % EVERY:
        np.testing.assert_array_equal(outputs[t, worker], 0.0)
      else:
        np.testing.assert_allclose(outputs[t, worker],
                                   expected[(t + 1) // EVERY - 1],
                                   rtol=1e-5, atol=1e-6)


def test_every_k_steps_one_is_the_inner_transformation():
  grads = _micro_grads()
  inner = gs.sparsify(gs.top_k(k=K_SENT), axis_name=AXIS)
  plain, _ = _run(inner, grads, "vmap", None)
  wrapped, _ = _run(gs.multi_steps(inner, 1), grads, "vmap", None)
  np.testing.assert_array_equal(wrapped, plain)


@pytest.fixture
def collective_count(monkeypatch):
  """A host counter of executed collectives (every call of every device)."""
  count = {"runs": 0}

  def bump():
    count["runs"] += 1

  for name in ("psum", "pmean", "pmax", "pmin", "all_gather", "psum_scatter",
               "all_to_all", "ppermute"):
    original = getattr(jax.lax, name)

    def counted(*args, _original=original, **kwargs):
      jax.debug.callback(bump)
      return _original(*args, **kwargs)

    monkeypatch.setattr(jax.lax, name, counted)
  return count


def _count_runs(count, tx, grads, mesh):
  """(collectives executed, outputs) of a shard_map run."""
  before = count["runs"]
  outputs, _ = _run(tx, grads, "shard_map", mesh)
  jax.effects_barrier()
  return count["runs"] - before, outputs


@pytest.mark.optax_promotion  # optax (adam, MultiSteps) is not strict-clean
def test_collectives_run_once_per_optimizer_step(collective_count, mesh):
  """multi_steps over k*m micro-batches runs exactly the collectives of m
  plain steps; optax.MultiSteps, same result, runs those of k*m steps."""
  grads = _micro_grads()
  inner = lambda: optax.chain(gs.sparsify(gs.top_k(k=K_SENT),
                                          axis_name=AXIS), optax.sgd(0.1))
  plain, _ = _count_runs(collective_count, inner(), grads[:OPT_STEPS], mesh)
  per_step = plain / OPT_STEPS
  assert per_step > 0
  ours, our_updates = _count_runs(
      collective_count, gs.multi_steps(inner(), EVERY), grads, mesh)
  assert ours == per_step * OPT_STEPS
  theirs, their_updates = _count_runs(
      collective_count,
      optax.MultiSteps(inner(), EVERY).gradient_transformation(), grads, mesh)
  assert theirs == per_step * EVERY * OPT_STEPS
  np.testing.assert_allclose(their_updates, our_updates, rtol=1e-5,
                             atol=1e-7)


def test_accumulator_is_per_worker_under_shard_map(mesh):
  grads = _micro_grads()
  _, state = _run(_top_k_ef(EVERY), grads[:EVERY - 1], "shard_map", mesh)
  assert state.mini_step == EVERY - 1
  np.testing.assert_allclose(state.micro_grads, grads[:EVERY - 1].sum(0),
                             rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_every_k_steps_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match="every_k_steps"):
    gs.multi_steps(optax.sgd(0.1), bad)


def test_state_partition_specs_shard_the_accumulators():
  """`gs.state_partition_specs` knows `multi_steps`' per-worker accumulators,
  with and without parameter specs."""
  tx = gs.multi_steps(optax.chain(gs.sparsify(gs.top_k(0.5), axis_name=AXIS),
                                  optax.sgd(0.1)), 2)
  params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
  abstract = jax.eval_shape(tx.init, params)
  specs = gs.state_partition_specs(abstract, AXIS)
  assert specs.micro_grads == {"w": P(AXIS), "b": P(AXIS)}
  assert specs.mini_step == P()
  assert specs.inner_state[0].memory == (P(AXIS),)
  specs = gs.state_partition_specs(abstract, AXIS,
                                   {"w": P(None, "model"), "b": P()})
  assert specs.micro_grads == {"w": P(AXIS, None, "model"), "b": P(AXIS)}
