"""The search: ``python -m search.run`` (study driver + Ray pool) and ``python -m search.export``.

Rooms: ``engine/`` (the loop and the Ray pool), ``storage/`` (where a study lives), ``training/`` (proxy trainings,
base weights, data), ``latency/`` (timing), ``front/`` (Pareto front, confirmation, report, export), ``strategy/``
(the samplers); the entry points, the checks and the settings are here at the top (README: "Code map").

Library use, for pieces that need no Ray::

    from search import check_data, ProxySchedule, TrainJob, run_training, LatencySettings, measure_latency
    info = check_data(None, "runs/.data")            # the built-in shapes-v3 set, generated on first use
"""

from .errors import SearchError
from .latency import LatencyResult, LatencySettings, measure_latency
from .training.data import DataInfo, check_data, default_dataset
from .training.proxy import ProxySchedule, TrainJob, TrainResult, run_training

__all__ = ["DataInfo", "LatencyResult", "LatencySettings", "ProxySchedule", "SearchError", "TrainJob", "TrainResult",
           "check_data", "default_dataset", "measure_latency", "run_training"]
