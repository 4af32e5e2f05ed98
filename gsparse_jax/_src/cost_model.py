"""`gs.cost_model`: the communication time of a training step, projected.

Two ideas, one namespace:

- the alpha-beta network model (`gsparse_jax._src.alpha_beta`): `Network`,
  the ring schedules of an all-reduce and an all-gather,
  `collective_seconds`, `calibrate` (fits a `Network` to timed
  collectives), `TwoLevelNetwork` and the hierarchical dense all-reduce;
- projections (`gsparse_jax._src.projection`): `project_compressor` prices
  the collectives any compressor declares (`Compressor.wire`, the figures
  `comm_stats` counts) on a `Network` and adds the measured selection time;
  `project_compressors` and `best_layout` compare several,
  `project_two_level` projects slices on fast links joined by slow ones.

Example:
  >>> import gsparse_jax as gs
  >>> net = gs.cost_model.network_from_gbit(100.0, latency_s=5e-6)
  >>> cost = gs.cost_model.project_compressor(gs.top_k(0.001), 1e9, 64, net)
  >>> round(cost.speedup_over_dense, 1)  # selection not counted
  15.5
"""

# pylint: disable=unused-import
from gsparse_jax._src.alpha_beta import all_gather_seconds
from gsparse_jax._src.alpha_beta import calibrate
from gsparse_jax._src.alpha_beta import collective_seconds
from gsparse_jax._src.alpha_beta import COLLECTIVES
from gsparse_jax._src.alpha_beta import DEFAULT_LATENCY_S
from gsparse_jax._src.alpha_beta import hierarchical_all_reduce_seconds
from gsparse_jax._src.alpha_beta import link_bytes
from gsparse_jax._src.alpha_beta import Network
from gsparse_jax._src.alpha_beta import network_from_gbit
from gsparse_jax._src.alpha_beta import ring_all_reduce_seconds
from gsparse_jax._src.alpha_beta import ring_schedule
from gsparse_jax._src.alpha_beta import Sample
from gsparse_jax._src.alpha_beta import TOPOLOGIES
from gsparse_jax._src.alpha_beta import TwoLevelNetwork
from gsparse_jax._src.projection import best_layout
from gsparse_jax._src.projection import project_compressor
from gsparse_jax._src.projection import project_compressors
from gsparse_jax._src.projection import project_two_level
from gsparse_jax._src.projection import StepCost
from gsparse_jax._src.projection import TwoLevelCost

__all__ = (
    "all_gather_seconds", "best_layout", "calibrate", "collective_seconds",
    "COLLECTIVES", "DEFAULT_LATENCY_S", "hierarchical_all_reduce_seconds",
    "link_bytes", "Network", "network_from_gbit", "project_compressor",
    "project_compressors", "project_two_level", "ring_all_reduce_seconds",
    "ring_schedule", "Sample", "StepCost", "TOPOLOGIES", "TwoLevelCost",
    "TwoLevelNetwork",
)
