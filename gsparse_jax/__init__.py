"""gsparse_jax: gradient sparsification for JAX, as optax transformations."""

from gsparse_jax._src import cost_model

from gsparse_jax._src.accumulate import multi_steps
from gsparse_jax._src.accumulate import MultiStepsState
from gsparse_jax._src.aggregate import aggregate
from gsparse_jax._src.approximate import approx_top_k
from gsparse_jax._src.arc_top_k import arc_top_k
from gsparse_jax._src.cast import cast
from gsparse_jax._src.cli.tasks import Task
from gsparse_jax._src.compressors import compress
from gsparse_jax._src.compressors import Compressor
from gsparse_jax._src.compressors import Received
from gsparse_jax._src.compressors import SelectContext
from gsparse_jax._src.compressors import dense
from gsparse_jax._src.compressors import rand_k
from gsparse_jax._src.compressors import top_k
from gsparse_jax._src.data_parallel import data_parallel
from gsparse_jax._src.data_parallel import DataParallel
from gsparse_jax._src.diloco import diloco
from gsparse_jax._src.diloco import DiLoCoState
from gsparse_jax._src.distributed import local_grad
from gsparse_jax._src.distributed import local_value_and_grad
from gsparse_jax._src.distributed import state_partition_specs
from gsparse_jax._src.nnx_helpers import nnx_data_parallel
from gsparse_jax._src.nnx_grad import nnx_local_value_and_grad
from gsparse_jax._src.nnx_helpers import nnx_partition_specs
from gsparse_jax._src.nnx_helpers import nnx_shard
from gsparse_jax._src.payload import Payload
from gsparse_jax._src.power_sgd import power_sgd
from gsparse_jax._src.qsgd import qsgd
from gsparse_jax._src.quantized_top_k import quantized_top_k
from gsparse_jax._src.reg_top_k import reg_top_k
from gsparse_jax._src.registry import compressor_from_ratio
from gsparse_jax._src.registry import compressor_names
from gsparse_jax._src.registry import REGISTRY as COMPRESSORS
from gsparse_jax._src.reg_top_k import RegTopKState
from gsparse_jax._src.segments import Segment
from gsparse_jax._src.segments import segment_plan
from gsparse_jax._src.segments import SegmentPlan
from gsparse_jax._src.segments import small_or_vector_leaves
from gsparse_jax._src.sign import sign
from gsparse_jax._src.stats import comm_stats
from gsparse_jax._src.stats import CommStats
from gsparse_jax._src.threshold_compressors import calibrate_threshold
from gsparse_jax._src.threshold_compressors import gaussian_k
from gsparse_jax._src.threshold_compressors import hard_threshold
from gsparse_jax._src.transform import sparsify
from gsparse_jax._src.transform import SparsifyState
from gsparse_jax._src.workers import Workers

__version__ = "0.1.0"

__all__ = (
    "Compressor",
    "CommStats",
    "DataParallel",
    "DiLoCoState",
    "MultiStepsState",
    "Payload",
    "Received",
    "RegTopKState",
    "Segment",
    "SegmentPlan",
    "SelectContext",
    "Task",
    "SparsifyState",
    "aggregate",
    "approx_top_k",
    "arc_top_k",
    "calibrate_threshold",
    "cast",
    "COMPRESSORS",
    "comm_stats",
    "compress",
    "compressor_from_ratio",
    "compressor_names",
    "cost_model",
    "data_parallel",
    "dense",
    "diloco",
    "gaussian_k",
    "hard_threshold",
    "local_grad",
    "local_value_and_grad",
    "multi_steps",
    "nnx_data_parallel",
    "nnx_local_value_and_grad",
    "nnx_partition_specs",
    "nnx_shard",
    "power_sgd",
    "qsgd",
    "quantized_top_k",
    "rand_k",
    "reg_top_k",
    "segment_plan",
    "sign",
    "small_or_vector_leaves",
    "sparsify",
    "state_partition_specs",
    "top_k",
    "Workers",
)
