"""`popo eval`: the benchmark suite, the metrics, one eval run, and synthetic tasks' held-out sets."""
