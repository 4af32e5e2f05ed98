"""gsparse_jax: gradient sparsification for JAX, as optax transformations."""

from gsparse_jax._src.aggregate import aggregate
from gsparse_jax._src.compressors import Compressor
from gsparse_jax._src.compressors import dense
from gsparse_jax._src.compressors import rand_k
from gsparse_jax._src.compressors import top_k
from gsparse_jax._src.distributed import local_grad
from gsparse_jax._src.distributed import local_value_and_grad
from gsparse_jax._src.distributed import state_partition_specs
from gsparse_jax._src.payload import Payload
from gsparse_jax._src.stats import comm_stats
from gsparse_jax._src.stats import CommStats
from gsparse_jax._src.transform import compress
from gsparse_jax._src.transform import sparsify
from gsparse_jax._src.transform import SparsifyState

__version__ = "0.1.0"

__all__ = (
    "Compressor",
    "CommStats",
    "Payload",
    "SparsifyState",
    "aggregate",
    "comm_stats",
    "compress",
    "dense",
    "local_grad",
    "local_value_and_grad",
    "rand_k",
    "sparsify",
    "state_partition_specs",
    "top_k",
)
