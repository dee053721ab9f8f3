"""Several machines, one model: the root (root.py) and the worker's service (worker.py); who does
what is ../plan.py. The net layer (glmcpu.net) moves the arrays and knows nothing of models."""
from ..plan import make_plan, weigh  # noqa: F401
from .root import Cluster, ClusterError, WorkerLost  # noqa: F401
from .worker import WorkerService, available_gb, measure_bandwidth  # noqa: F401
