"""The search loop: the driver (ask, time, train, tell), the rung ladder, latency feasibility, confirmation, and
the Ray pool it hands work to."""
