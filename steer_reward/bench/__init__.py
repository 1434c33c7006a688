"""``steer-reward bench``: time TRL's reward-model path, padded micro-batches and steer-reward's fast path on one
workload, in one run, against the machine's measured GEMM throughput (DESIGN.md, Performance)."""
