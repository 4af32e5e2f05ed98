"""Test setup: 8 CPU devices, configured before JAX initializes a backend.

The repository's root conftest.py sets the same option first (so the doctests
in gsparse_jax/ see it too); repeating it here keeps `pytest tests/...` run
from any directory correct.
"""

import pathlib
import sys

import jax
import pytest

# The example scripts import their shared module `common` from examples/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "examples"))

jax.config.update("jax_num_cpu_devices", 8)
# The whole suite runs with strict dtype promotion: gsparse_jax must never
# rely on implicit promotion (e.g. int + float, bf16 + f32).
jax.config.update("jax_numpy_dtype_promotion", "strict")

NUM_DEVICES = 8


@pytest.fixture(autouse=True)
def _optax_promotion(request):
  """Tests marked ``optax_promotion`` run with standard promotion.

  optax's own transformations are not clean under strict promotion (``sgd``
  multiplies integer leaves by Python floats, ``adam``'s bias correction
  raises a float to an int32 count, ``MultiSteps`` divides by one); those
  tests check gsparse_jax's behaviour in such chains, and gsparse_jax's
  strictness is checked by every other test.
  """
  if request.node.get_closest_marker("optax_promotion"):
    with jax.numpy_dtype_promotion("standard"):
      yield
  else:
    yield


@pytest.fixture(scope="session")
def mesh():
  """A ("data",) mesh over the 8 CPU devices."""
  return jax.make_mesh((NUM_DEVICES,), ("data",))
