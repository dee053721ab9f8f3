"""tests/test_cluster.py again, every cluster in the mesh topology (one exchange per sync among
all nodes): the same bits as one process, every fault a failover, a second root, keys, shipped
shares and what a worker refuses, the smaller wires. Tests of the plan alone and of the star's
benchmarks are not repeated."""
import test_cluster
from test_cluster import *  # noqa: F401,F403

TOPOLOGY = "mesh"

for name in ("test_plan_predicts_a_rate_limited_link", "test_netns_mesh_measures_cluster_and_ceiling",
             "test_plan_command_and_figures", "test_shares_follow_speed_within_memory",
             "test_plan_slices_whole_k_quant_blocks", "test_plan_predicts_from_speeds_and_link",
             "test_plan_expects_the_busiest_node_of_a_moe_layer"):
    assert hasattr(test_cluster, name), name
    del globals()[name]
