"""Small NumPy references the tests compare against, by family.

- `references.feedback`: the one error-feedback loop (every rule) and the
  reference protocol (``select_all``, ``receive_all``);
- `references.dense`, `references.sparse`, `references.quantized`,
  `references.low_rank`: each compressor family's references, in a
  ``REFERENCES`` table keyed by registry name (`gs.COMPRESSORS`);
- `references.draws`: the library's random draws, for key-driven
  compressors (the key schedule is the library's; the rest is NumPy);
- `references.training`: a small data-parallel training problem.

`compressor_reference(name, compressor, d)` finds a registry compressor's
reference; a registry entry with none is named by `missing`.
"""

from . import dense
from . import draws
from . import low_rank
from . import quantized
from . import sparse
from .dense import SUM_ROUNDING
from .feedback import Feedback
from .feedback import feedback_run
from .feedback import mean_of
from .feedback import per_worker
from .feedback import Run
from .sparse import top_k_indices
from .sparse import top_k_select
from .training import linear_regression_top_k_ef

REFERENCES = {**dense.REFERENCES, **sparse.REFERENCES,
              **quantized.REFERENCES, **low_rank.REFERENCES}


def missing(names):
  """The registry names among ``names`` that have no reference."""
  return [name for name in names if name not in REFERENCES]


def compressor_reference(name, compressor, d, segment=0):
  """``(select_all, receive_all)`` of registry compressor ``name``.

  Args:
    name: its registry name.
    compressor: the compressor (for one tensor under layer granularity,
      specialized with ``for_shape``).
    d: the vector's size.
    segment: the segment's index in `sparsify`'s plan (its PRNG key).
  """
  if name not in REFERENCES:
    raise AssertionError(
        f"no NumPy reference for registry compressor {name!r}: add one to "
        "the REFERENCES of its family in tests/references/")
  return REFERENCES[name](compressor, d, segment)
