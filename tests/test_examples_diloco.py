"""examples/diloco_charlm.py at a toy size: syncs, bytes and loss counted.

Slow (the transformer's compilation takes about a minute on 2 cores); the
DiLoCo semantics themselves are covered fast by tests/test_diloco.py.
"""

import os
import sys

import numpy as np
import pytest

import gsparse_jax as gs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import diloco_charlm  # noqa: E402


@pytest.mark.slow
@pytest.mark.optax_promotion  # adamw raises a float to its int32 count
def test_tiny_run_counts_one_round_per_sync_and_its_bytes():
  run = diloco_charlm.train("diloco H=2 top1%+2bit", steps=4, eval_every=2,
                            batch=2, dim=16, layers=1)
  d = run["parameters"]
  assert run["rounds"] == 2  # 4 steps, a sync every 2
  wire = gs.quantized_top_k(diloco_charlm.RATIO, bits=2).wire(d, "float32")
  assert run["bytes"] == 2 * sum(c.bytes for c in wire)
  assert run["curve"]["step"] == [0, 2, 4]
  assert run["curve"]["bytes"] == [0.0, run["bytes"] / 2, run["bytes"]]
  # Two syncs of four AdamW steps move the anchor downhill.
  assert np.all(np.isfinite(run["curve"]["loss"]))
  assert run["curve"]["loss"][-1] < run["curve"]["loss"][0]
