"""The default update's compiled HLO: no full-size copies, no conditional.

Guards the fast path without timing anything: on a transformer-shaped
pytree of 57 leaves, the compiled `sparsify(dense())` + sgd step (default
global granularity, default ``nonfinite="skip"``) holds no copy or
concatenate of the gradient's full (concatenated) size and no conditional
with array results -- the floor reads the gradient and writes the update
leaf by leaf. (The non-finite check's exact count is a conditional with a
scalar result.)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsparse_jax as gs

D = 16


def _transformer_like():
  """Embedding + 8 blocks of 4 matrices and 3 vectors: 57 leaves."""
  tree = {"emb": jnp.ones((64, D))}
  for b in range(8):
    tree[f"block{b}"] = {
        "qkv": jnp.ones((D, 3 * D)), "o": jnp.ones((D, D)),
        "up": jnp.ones((D, 4 * D)), "down": jnp.ones((4 * D, D)),
        "ln1": jnp.ones((D,)), "ln2": jnp.ones((D,)),
        "bias": jnp.ones((D,))}
  return tree


def _compiled_step(tx, params):
  """The compiled ``update + apply_updates`` step, params and state
  donated, with ``params`` as the gradient."""
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params).compile()


def _full_size_ops(tx, params):
  """(opcode -> count) of copies and concatenates whose result is the
  gradient's full size, and of conditionals that return more than scalars
  (a conditional materializes its results), over every computation of the
  compiled step."""
  total = sum(x.size for x in jax.tree.leaves(params))
  text = _compiled_step(tx, params).as_text()
  counts = {"copy": 0, "concatenate": 0, "conditional": 0}
  for line in text.splitlines():
    match = re.search(r"= (\S+) (copy|concatenate)\(", line)
    if match and re.search(rf"\[{total}\]", match.group(1)):
      counts[match.group(2)] += 1
    match = re.search(r"= (.*?) conditional\(", line)
    if match and re.search(r"\[\d", match.group(1)):
      counts["conditional"] += 1
  return total, counts


def test_tree_is_model_shaped():
  assert len(jax.tree.leaves(_transformer_like())) == 57


def test_default_dense_update_has_no_full_size_copy_or_conditional():
  params = _transformer_like()
  tx = optax.chain(gs.sparsify(gs.dense(), feedback="none"), optax.sgd(0.1))
  total, counts = _full_size_ops(tx, params)
  assert total == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert counts == {"copy": 0, "concatenate": 0, "conditional": 0}, counts


def _temp_gradient_sizes(tx, params):
  """The compiled step's temporary buffers, in gradient sizes."""
  compiled = _compiled_step(tx, params)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return compiled.memory_analysis().temp_size_in_bytes / total


def test_default_top_k_ef_update_is_near_the_floor():
  """Top-k + EF, default global granularity and nonfinite="skip": the only
  full-size concatenate is ``e + g`` written (into the donated memory) once,
  no full-size copy or conditional, and one gradient-sized temporary (the
  mean's scatter base) plus the selection's small buffers. The step before
  this design held 3.06 gradient sizes of temporaries and a copy of the
  memory."""
  params = _transformer_like()
  tx = optax.chain(gs.sparsify(gs.top_k(0.01)), optax.sgd(0.1))
  _, counts = _full_size_ops(tx, params)
  assert counts == {"copy": 0, "concatenate": 1, "conditional": 0}, counts
  assert _temp_gradient_sizes(tx, params) < 1.25


def test_the_check_would_see_a_conditional():
  """The counter is not blind: a `lax.cond` around the update is found."""
  params = _transformer_like()
  inner = optax.chain(gs.sparsify(gs.dense(), feedback="none",
                                  nonfinite="ignore"), optax.sgd(0.1))
  tx = optax.GradientTransformation(
      inner.init,
      lambda g, s, p=None: jax.lax.cond(
          jnp.all(jnp.isfinite(g["emb"])), lambda: inner.update(g, s, p),
          lambda: (jax.tree.map(jnp.zeros_like, g), s)))
  _, counts = _full_size_ops(tx, params)
  assert counts["conditional"] >= 1


def _per_worker_copies(tx, params):
  """Copies of per-worker state arrays (``[1, n]``: a worker memory) in the
  compiled step, over every computation."""
  text = _compiled_step(tx, params).as_text()
  return sum(1 for line in text.splitlines()
             if re.search(r"= f32\[1,\d+\]\S* copy\(", line))


@pytest.mark.parametrize("compressor, granularity", [
    (gs.cast(), "global"), (gs.sign(), "layer")])
def test_memory_kept_by_select_is_written_in_place(compressor, granularity):
  """Compressors whose skipped step keeps the memory by a select (their
  payload cannot stand for nothing): the select is written into the
  donated memory's buffer, not into a temporary copied there (one full
  copy of the memory per step before)."""
  tx = optax.chain(gs.sparsify(compressor, granularity=granularity),
                   optax.sgd(0.1))
  assert _per_worker_copies(tx, _transformer_like()) == 0


def test_the_copy_counter_sees_a_memory_copy():
  """Not blind: selecting on the local view of the memory, as before,
  leaves one copy per memory."""
  params = _transformer_like()
  base = gs.sparsify(gs.cast())

  def update(g, s, p=None):
    out, new = base.update(g, s, p)
    # A select on the local [size] view of the stored [1, size] memory.
    memory = tuple(
        jax.tree.map(lambda n, o: jnp.where(jnp.isfinite(n[0, 0]), n[0],
                                            o[0])[None], m_new, m_old)
        for m_new, m_old in zip(new.memory, s.memory))
    return out, new._replace(memory=memory)

  tx = optax.chain(optax.GradientTransformation(base.init, update),
                   optax.sgd(0.1))
  assert _per_worker_copies(tx, params) >= 1
