"""Tensor parallelism's plumbing: the process group, collectives that cost nothing at world size 1, and the
follower processes with the watchdog that notices when one dies. It knows nothing of models or engines."""
