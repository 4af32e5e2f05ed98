"""Bytes per step per worker for every compressor vs dense, 2..64 workers.

Each configuration runs a few real `sparsify` steps with the workers
simulated by `jax.vmap(axis_name=...)`; the payload a worker contributes per
step is read from `gs.comm_stats` (values at their dtype's size, int32
indices, ARC's sketch). From the payload and the collective its layout uses,
the traffic one worker sends per step follows:

* all-reduce (dense, aligned: shared Rand-k, ARC-Top-K), ring algorithm:
  ``2 (n - 1) / n * payload`` -- flat in ``n``;
* all-gather (sparse: Top-k, RegTop-k, hard-threshold, Gaussian-k, ...),
  ring algorithm: ``(n - 1) * payload`` -- grows linearly with ``n``, and
  every worker receives ``n * payload`` before its scatter-add.

Run: python -m benchmarks.bytes --out DIR [--quick]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import gsparse_jax as gs
from benchmarks import _common

AXIS = "data"
STEPS = 3


def compressor_table(size: int, ratio: float, sample: jax.Array) -> dict:
  threshold = gs.calibrate_threshold(sample, ratio)
  return {
      "dense": gs.dense(),
      "top_k": gs.top_k(ratio),
      "reg_top_k": gs.reg_top_k(ratio),
      "approx_top_k": gs.approx_top_k(ratio),
      "gaussian_k": gs.gaussian_k(ratio),
      "hard_threshold": gs.hard_threshold(threshold, capacity_ratio=ratio),
      "rand_k_shared": gs.rand_k(ratio, shared=True),
      "rand_k_independent": gs.rand_k(ratio, shared=False),
      "arc_top_k": gs.arc_top_k(ratio),
  }


def traffic_per_worker(layout: str, payload: float, workers: int) -> float:
  """Bytes one worker sends per step in a ring collective."""
  if layout == "sparse":
    return (workers - 1) * payload
  return 2.0 * (workers - 1) / workers * payload


def measure(compressor, size: int, workers: int, seed: int) -> dict:
  tx = gs.sparsify(compressor, axis_name=AXIS)
  params = jnp.zeros((size,), jnp.float32)
  state = jax.vmap(lambda _: tx.init(params))(jnp.arange(workers))
  step = jax.jit(jax.vmap(tx.update, axis_name=AXIS))
  key = jax.random.key(seed)
  for _ in range(STEPS):
    key, sub = jax.random.split(key)
    grads = jax.random.normal(sub, (workers, size), jnp.float32)
    _, state = step(grads, state)
    jax.block_until_ready(state)
  stats = gs.comm_stats(state)
  payload = stats["sent_bytes"] / STEPS
  dense_payload = stats["dense_bytes"] / STEPS
  return {
      "layout": compressor.layout,
      "payload_bytes": payload,
      "dense_payload_bytes": dense_payload,
      "density": stats["density"],
      "traffic_bytes": traffic_per_worker(compressor.layout, payload, workers),
      "dense_traffic_bytes": traffic_per_worker("dense", dense_payload,
                                                workers),
      "received_before_reduce_bytes": (workers * payload
                                       if compressor.layout == "sparse"
                                       else payload),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--size", type=int, default=None)
  parser.add_argument("--ratio", type=float, default=0.01)
  args = parser.parse_args(argv)
  size = args.size or (4096 if args.quick else 100_000)
  worker_counts = (2, 8) if args.quick else (2, 4, 8, 16, 32, 64)
  sample = jax.random.normal(jax.random.key(99), (size,))
  table = compressor_table(size, args.ratio, sample)

  results = {}
  for name, compressor in table.items():
    results[name] = {}
    for workers in worker_counts:
      row = measure(compressor, size, workers, seed=workers)
      row["traffic_vs_dense"] = row["traffic_bytes"] / row[
          "dense_traffic_bytes"]
      results[name][str(workers)] = row
      print(f"{name:<20} n={workers:<3} payload {row['payload_bytes']:>10.0f}"
            f" B  traffic {row['traffic_bytes']:>12.0f} B "
            f"({row['traffic_vs_dense']:.3f} of dense)")

  output = {"machine": _common.machine_description(), "size": size,
            "ratio": args.ratio, "steps": STEPS, "results": results}
  _common.write_json(args.out, "bytes", output)

  def plot(ax):
    for name, rows in results.items():
      counts = [int(n) for n in rows]
      ax.plot(counts, [rows[str(n)]["traffic_bytes"] for n in counts],
              marker="o", label=name,
              linestyle="--" if rows[str(counts[0])]["layout"] == "sparse"
              else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("bytes sent per worker per step (ring collective)")
    ax.set_title(f"d = {size:,}, ratio {args.ratio}\nall-gather (dashed) "
                 "grows with workers, all-reduce does not")
    ax.legend(fontsize=7)

  _common.write_plot(args.out, "bytes", plot, figsize=(8.0, 5.5))
  return output


if __name__ == "__main__":
  main()
