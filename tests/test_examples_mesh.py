"""examples/two_level_mesh.py: both meshes train, and count bytes per axis."""

import jax
import numpy as np
import pytest

import gsparse_jax as gs
import two_level_mesh

ONE_D, TWO_LEVEL = two_level_mesh.MESHES
STEPS = 3
# The MLP: 64 -> 128 -> 128 -> 10, biases included.
PARAMS = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10


def _train(mesh_name, compressor):
  return two_level_mesh.train(mesh_name, compressor, steps=STEPS,
                              batch_per_device=4, seed=0, lr=3e-3)


@pytest.mark.optax_promotion  # optax.adam's bias correction
def test_dense_is_the_same_mean_over_all_devices_on_both_meshes():
  flat, two_level = _train(ONE_D, gs.dense()), _train(TWO_LEVEL, gs.dense())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               two_level["params"], flat["params"])
  assert flat["inner_dense_bytes_per_step"] == 0
  assert two_level["inner_dense_bytes_per_step"] == PARAMS * 4


@pytest.mark.optax_promotion  # optax.adam's bias correction
def test_two_level_top_k_sends_k_pairs_across_slices_only():
  result = _train(TWO_LEVEL, gs.top_k(0.01))
  assert result["workers"] == two_level_mesh.SLICES
  k = round(0.01 * PARAMS)
  assert result["compressed_bytes_per_step"] == k * (4 + 4)
  assert result["dense_bytes_per_step"] == PARAMS * 4
  assert result["inner_dense_bytes_per_step"] == PARAMS * 4
