"""tests/test_cluster_faults.py again, every cluster in the mesh topology."""
from test_cluster_faults import *  # noqa: F401,F403

TOPOLOGY = "mesh"
