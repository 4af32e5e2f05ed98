"""Bytes per step per worker for every compressor vs dense, 2..64 workers.

Every compressor of the registry (`gs.compressor_names()`) runs a few real
`sparsify` steps on one matrix-shaped parameter (``granularity="layer"``, so
PowerSGD sees a matrix; for the others one leaf makes layer and global
granularity the same), with the workers simulated by
`jax.vmap(axis_name=...)`; the bytes a worker contributes per step are read
from `gs.comm_stats`. The compressor declares the collectives it joins
(`Compressor.wire`), and the traffic one worker sends per step in ring
collectives follows from them:

* all-reduce (dense, aligned: shared Rand-k, ARC-Top-K; PowerSGD's two
  factors; bf16 cast): ``2 (n - 1) / n * payload`` -- flat in ``n``;
* all-gather (sparse: Top-k, RegTop-k, ...; packed sign and QSGD codes):
  ``(n - 1) * payload`` -- grows linearly with ``n``, and every worker
  receives ``n * payload`` before it decodes.

Run: python -m benchmarks.bytes --out DIR [--quick]
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

import gsparse_jax as gs
from benchmarks import _common

AXIS = "data"
STEPS = 3


def matrix_shape(size: int) -> tuple[int, int]:
  """A square-ish matrix of about ``size`` entries."""
  cols = math.isqrt(size)
  return size // cols, cols


def compressor_table(ratio: float, sample: jax.Array) -> dict:
  return {name: gs.compressor_from_ratio(name, ratio, sample)
          for name in gs.compressor_names()}


def traffic_per_worker(collectives, workers: int) -> float:
  """Bytes one worker sends per step in ring collectives."""
  return sum((workers - 1) * c.bytes if c.kind == "all_gather"
             else 2.0 * (workers - 1) / workers * c.bytes
             for c in collectives)


def measure(compressor, shape: tuple[int, int], workers: int,
            seed: int) -> dict:
  tx = gs.sparsify(compressor, axis_name=AXIS, granularity="layer")
  params = jnp.zeros(shape, jnp.float32)
  size = params.size
  state = jax.vmap(lambda _: tx.init(params))(jnp.arange(workers))
  step = jax.jit(jax.vmap(tx.update, axis_name=AXIS))
  key = jax.random.key(seed)
  for _ in range(STEPS):
    key, sub = jax.random.split(key)
    grads = jax.random.normal(sub, (workers,) + shape, jnp.float32)
    _, state = step(grads, state)
    jax.block_until_ready(state)
  stats = gs.comm_stats(state)
  payload = stats["sent_bytes"] / STEPS
  dense_payload = stats["dense_bytes"] / STEPS
  collectives = compressor.for_shape(shape).wire(size, jnp.float32)
  gathered = sum(c.bytes for c in collectives if c.kind == "all_gather")
  return {
      "layout": compressor.for_shape(shape).layout,
      "collectives": [c._asdict() for c in collectives],
      "payload_bytes": payload,
      "dense_payload_bytes": dense_payload,
      "density": stats["density"],
      "traffic_bytes": traffic_per_worker(collectives, workers),
      "dense_traffic_bytes": traffic_per_worker(
          gs.dense().wire(size, jnp.float32), workers),
      "received_before_reduce_bytes": payload - gathered
                                      + workers * gathered,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--size", type=int, default=None)
  parser.add_argument("--ratio", type=float, default=0.01)
  args = parser.parse_args(argv)
  shape = matrix_shape(args.size or (4096 if args.quick else 100_000))
  size = shape[0] * shape[1]
  worker_counts = (2, 8) if args.quick else (2, 4, 8, 16, 32, 64)
  sample = jax.random.normal(jax.random.key(99), shape)
  table = compressor_table(args.ratio, sample)

  results = {}
  for name, compressor in table.items():
    results[name] = {}
    for workers in worker_counts:
      row = measure(compressor, shape, workers, seed=workers)
      assert row["payload_bytes"] == sum(c["bytes"]
                                         for c in row["collectives"])
      row["traffic_vs_dense"] = row["traffic_bytes"] / row[
          "dense_traffic_bytes"]
      results[name][str(workers)] = row
      print(f"{name:<20} n={workers:<3} payload {row['payload_bytes']:>10.0f}"
            f" B  traffic {row['traffic_bytes']:>12.0f} B "
            f"({row['traffic_vs_dense']:.3f} of dense)")

  output = {"machine": _common.machine_description(), "size": size,
            "shape": list(shape),
            "ratio": args.ratio, "steps": STEPS, "results": results}
  _common.write_json(args.out, "bytes", output)

  def plot(ax):
    for name, rows in results.items():
      counts = [int(n) for n in rows]
      ax.plot(counts, [rows[str(n)]["traffic_bytes"] for n in counts],
              marker="o", label=name,
              linestyle="--" if any(
                  c["kind"] == "all_gather"
                  for c in rows[str(counts[0])]["collectives"]) else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("bytes sent per worker per step (ring collective)")
    ax.set_title(f"d = {size:,} ({shape[0]} x {shape[1]}), ratio "
                 f"{args.ratio}\nall-gather (dashed) "
                 "grows with workers, all-reduce does not")
    ax.legend(fontsize=7)

  _common.write_plot(args.out, "bytes", plot, figsize=(8.0, 5.5))
  return output


if __name__ == "__main__":
  main()
