"""reg_top_k: a NumPy reference of RegTop-k + EF in every mapping context."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsparse_jax as gs
from gsparse_jax._src import reg_top_k as reg_top_k_lib
import references
import runners

WORKERS = 8  # one per device of the test mesh
STEPS = 5
MU = 4.0
RATIO = 0.25


def reg_top_k_reference(grads, k, mu):
  """RegTop-k + EF (docs/algorithms.md), float64, every worker in a loop.

  Args:
    grads: ``[steps, workers, d]``.
    k: values per worker per step.
    mu: the regularization scale.

  Returns:
    A dict: ``outputs [steps, d]`` (mean of what was sent), ``memory
    [workers, d]``, ``aggregate_sum [d]`` (last step's S), ``last_sent`` and
    ``last_chosen`` (``[workers, d]``: last step's values, mask), and
    diagnostics:
    ``ratios`` (every ``S/s`` used on a previously sent entry),
    ``partial_sends`` (entries sent by some workers but not all, per step),
    ``differs_from_top_k`` (steps where some worker's choice differs from
    Top-k's) and ``min_gap`` (smallest relative gap between the k-th and
    (k+1)-th score: float32 rounding, ~1e-6, must not flip the choice).
  """
  steps, workers, d = grads.shape
  memory = np.zeros((workers, d))
  last_sent = np.zeros((workers, d))
  was_sent = np.zeros((workers, d), bool)
  total = np.zeros(d)
  outputs, ratios, partial, differs, gaps = [], [], [], [], []
  for t in range(steps):
    sent_now = np.zeros((workers, d))
    chosen_now = np.zeros((workers, d), bool)
    for i in range(workers):
      a = memory[i] + grads[t, i]
      sent_before = was_sent[i] & (last_sent[i] != 0)
      ratio = np.where(sent_before,
                       total / np.where(sent_before, last_sent[i], 1.0), 1e8)
      ratios.extend(ratio[sent_before])
      score = np.abs(a) * np.abs(np.tanh(ratio / mu))
      order = np.argsort(-score, kind="stable")
      chosen = order[:k]
      if k < d:
        gaps.append((score[order[k - 1]] - score[order[k]])
                    / max(score[order[k - 1]], 1e-30))
      top_k = np.argsort(-np.abs(a), kind="stable")[:k]
      differs.append(set(chosen) != set(top_k))
      sent_now[i, chosen] = a[chosen]
      chosen_now[i, chosen] = True
      memory[i] = a - sent_now[i]
    counts = chosen_now.sum(0)
    partial.append(int(np.sum((counts > 0) & (counts < workers))))
    total = sent_now.sum(0)
    last_sent, was_sent = sent_now, chosen_now
    outputs.append(total / workers)
  return dict(outputs=np.stack(outputs), memory=memory, aggregate_sum=total,
              last_sent=last_sent, last_chosen=was_sent,
              ratios=np.asarray(ratios), partial_sends=partial,
              differs_from_top_k=differs, min_gap=min(gaps, default=1.0))


def _crafted_grads(d=16, seed=0, steps=STEPS, workers=WORKERS):
  """Gradients with a cancelling entry and entries only some workers have.

  Entry 0: large, +6 on half the workers and -6 on the other half (it
  cancels in the aggregate, so its ratio S/s is near 0 or negative);
  entries 1-2: large on workers 0-2 only (sent by some workers); the rest:
  unit noise.
  """
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(steps, workers, d))
  g[:, :, 0] += np.where(np.arange(workers) < workers // 2, 6.0, -6.0)
  g[:, :3, 1:3] += 4.0
  return g.astype(np.float32)


def _split(flat):
  """The [..., 20] flat vector as the pytree of `_params` (leaf order a, b)."""
  return {"a": flat[..., :12], "b": flat[..., 12:]}


def _params():
  return {"a": jnp.zeros((12,)), "b": jnp.zeros((8,))}


def _leaves_flat(tree):
  return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["b"])], -1)


def test_reference_data_exercises_the_regularization():
  """The crafted data hits every case the reference must cover, and the
  library's RegTop-k on it leaves Top-k's path where the reference does."""
  flat = _crafted_grads(d=20)
  k = gs.reg_top_k(RATIO).budget(20)
  ref = reg_top_k_reference(flat.astype(np.float64), k=k, mu=MU)
  assert (ref["ratios"] < 0).any()  # a cancelled contribution
  assert (ref["ratios"] > 1).any()  # one reinforced by the others
  assert max(ref["partial_sends"]) > 0  # sent by some workers only
  differs = np.reshape(ref["differs_from_top_k"], (STEPS, WORKERS)).any(1)
  assert not differs[0] and differs[1:].any()  # step 0 is Top-k
  assert ref["min_gap"] > 1e-4

  tx = gs.sparsify(gs.reg_top_k(RATIO, mu=MU, method="sort"),
                   axis_name=runners.AXIS)
  outputs, _ = runners.run_steps(tx, jnp.zeros(20), jnp.asarray(flat), "vmap")
  got = outputs[:, 0]
  np.testing.assert_allclose(got, ref["outputs"], rtol=1e-5, atol=1e-5)
  top_k_outputs = references.feedback_run(
      flat.astype(np.float64),
      references.per_worker(references.top_k_select(k))).outputs
  # Identical choices (hence memories) up to the first step where some
  # worker's RegTop-k choice differs from Top-k's; there the means part.
  first = int(np.argmax(differs))
  np.testing.assert_allclose(got[:first], top_k_outputs[:first], rtol=1e-5,
                             atol=1e-5)
  assert np.abs(got[first] - top_k_outputs[first]).max() > 0.1


@pytest.mark.parametrize("granularity,context", [
    ("global", "vmap"), ("global", "shard_map"), ("global", "pmap"),
    ("layer", "vmap"), ("layer", "shard_map")])
def test_matches_numpy_reference(granularity, context, mesh):
  compressor = gs.reg_top_k(RATIO, mu=MU, method="sort")
  tx = gs.sparsify(compressor, feedback="ef", axis_name=runners.AXIS,
                   granularity=granularity)
  flat = _crafted_grads(d=20)
  outputs, state = runners.run_steps(tx, _params(), _split(jnp.asarray(flat)),
                                     context, mesh)
  got = _leaves_flat(outputs)  # [steps, workers, 20]

  if granularity == "global":
    refs = [(slice(0, 20), reg_top_k_reference(flat.astype(np.float64),
                                               compressor.budget(20), MU))]
  else:  # one budget and one RegTop-k state per leaf
    refs = [(part, reg_top_k_reference(
        flat[..., part].astype(np.float64),
        compressor.budget(part.stop - part.start), MU))
            for part in (slice(0, 12), slice(12, 20))]
  for segment, (part, ref) in enumerate(refs):
    assert ref["min_gap"] > 1e-4
    for worker in range(WORKERS):
      np.testing.assert_allclose(got[:, worker, part], ref["outputs"],
                                 rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        runners.worker_rows(state.memory[segment], WORKERS), ref["memory"],
        rtol=1e-5, atol=1e-5)
    # Every worker holds, where it sent last, the aggregate SUM S it
    # received (not the mean) and what it sent.
    comp = state.compressor_state[segment]
    rows = lambda x: runners.worker_rows(x, WORKERS)
    for worker, (idx, values, sums) in enumerate(zip(
        rows(comp.sent_indices), rows(comp.sent_values),
        rows(comp.aggregate_sum))):
      assert set(idx.tolist()) == set(
          np.nonzero(ref["last_chosen"][worker])[0].tolist())
      np.testing.assert_allclose(values, ref["last_sent"][worker][idx],
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(sums, ref["aggregate_sum"][idx], rtol=1e-5,
                                 atol=1e-5)


def test_one_worker_ratio_is_one_on_sent_entries():
  """axis_name=None: S/s = 1 where sent, so those entries get tanh(1/mu)."""
  mu = 1.0
  compressor = gs.reg_top_k(0.3, mu=mu)
  tx = gs.sparsify(compressor)
  grads = np.random.default_rng(4).normal(size=(STEPS, 1, 10))
  ref = reg_top_k_reference(grads, compressor.budget(10), mu)
  assert ref["min_gap"] > 1e-4
  np.testing.assert_allclose(ref["ratios"], 1.0)
  assert any(ref["differs_from_top_k"])  # tanh(1) < 1 changes the choice

  state = tx.init(jnp.zeros(10))
  update = jax.jit(tx.update)
  for t in range(STEPS):
    out, state = update(jnp.asarray(grads[t, 0], jnp.float32), state)
    np.testing.assert_allclose(out, ref["outputs"][t], rtol=1e-5, atol=1e-6)
  comp = jax.tree.map(lambda x: x[0], state.compressor_state[0])
  np.testing.assert_allclose(reg_top_k_lib.posterior_ratio(comp), 1.0,
                             rtol=1e-6)
  assert set(np.asarray(comp.sent_indices).tolist()) == set(
      np.nonzero(np.asarray(out))[0].tolist())


def test_tiny_mu_selects_exactly_top_k():
  """mu -> 0 makes |tanh(r/mu)| = 1 for every r != 0: Top-k's choice.

  (A huge mu does not: it scales every previously sent entry's score by
  about |S/s|/mu while unsent entries keep tanh(1e8/mu) = 1.)
  """
  grads = jnp.asarray(np.random.default_rng(5).normal(size=(STEPS, WORKERS,
                                                             30)),
                      jnp.float32)
  run = lambda c: runners.run_steps(
      gs.sparsify(c, axis_name=runners.AXIS), jnp.zeros(30), grads,
      "vmap")[0]
  reg = run(gs.reg_top_k(0.2, mu=1e-30, method="sort"))
  top = run(gs.top_k(0.2, method="sort"))
  np.testing.assert_array_equal(reg != 0, top != 0)
  np.testing.assert_allclose(reg, top, rtol=1e-6, atol=1e-6)

  # Contrast: a huge mu demotes what was sent last step, unlike Top-k.
  huge = run(gs.reg_top_k(0.2, mu=1e6, method="sort"))
  np.testing.assert_array_equal(huge[0], top[0])  # step 0: no history
  assert (np.asarray(huge[1:]) != 0).tolist() != (
      np.asarray(top[1:]) != 0).tolist()


def test_exact_cancellation_scores_zero():
  """An entry whose contributions cancelled exactly (S = 0) is not resent."""
  c = gs.reg_top_k(0.5, mu=1e-30)
  state = reg_top_k_lib.RegTopKState(
      sent_indices=jnp.array([0], jnp.int32),
      sent_values=jnp.array([5.0]),
      aggregate_sum=jnp.array([0.0]))
  np.testing.assert_array_equal(c.scores(jnp.array([10.0, 1.0]), state),
                                [0.0, 1.0])
  p = gs.compress(c, jnp.array([10.0, 1.0]), state, jax.random.key(0))
  assert p.indices.tolist() == [1] and p.values.tolist() == [1.0]


def test_sent_zero_counts_as_unsent():
  """A sent value of 0 carried nothing: ratio 1e8, never 0/0 = NaN."""
  state = reg_top_k_lib.RegTopKState(
      sent_indices=jnp.array([0, 2], jnp.int32),  # 2 = padding (size)
      sent_values=jnp.array([0.0, 0.0]),
      aggregate_sum=jnp.array([0.0, 3.0]))
  np.testing.assert_array_equal(reg_top_k_lib.posterior_ratio(state),
                                [1e8, 1e8])
  c = gs.reg_top_k(1.0, mu=1.0)
  scores = c.scores(jnp.array([2.0, -3.0]), state)
  np.testing.assert_array_equal(scores, [2.0, 3.0])


def test_state_init_abstract_and_stable_types_bfloat16():
  """init takes abstract params; state types are unchanged by update."""
  params = {"w": jnp.zeros((6,), jnp.bfloat16)}
  tx = optax.chain(gs.sparsify(gs.reg_top_k(0.5)), optax.sgd(0.1))
  abstract = jax.eval_shape(tx.init, jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params))
  state = tx.init(params)
  grads = {"w": jnp.linspace(-1.0, 1.0, 6).astype(jnp.bfloat16)}
  out, new_state = jax.jit(tx.update)(grads, state, params)
  types = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert types(abstract) == types(state) == types(new_state)
  assert out["w"].dtype == jnp.bfloat16
  comp = new_state[0].compressor_state[0]
  assert comp.sent_values.dtype == comp.aggregate_sum.dtype == jnp.float32
  assert comp.sent_indices.shape == (1, 3)


@pytest.mark.parametrize("kwargs,name", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"),
    (dict(ratio=0.1, mu=0.0), "mu"), (dict(ratio=0.1, mu=-1.0), "mu"),
    (dict(ratio=0.1, mu=float("inf")), "mu"), (dict(ratio=0.1, mu=True), "mu"),
    (dict(ratio=0.1, method="fast"), "method")])
def test_validation_names_the_argument(kwargs, name):
  ratio = kwargs.pop("ratio")
  with pytest.raises(ValueError, match=f"`{name}`"):
    gs.reg_top_k(ratio, **kwargs)
