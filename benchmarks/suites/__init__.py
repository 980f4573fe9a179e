"""Evaluation suites: geneval, preference, aesthetic, fid (benchmarks.suites.registry builds them by name).

Each suite (benchmarks.suites.base.Suite) scores images already on disk; the runner
(benchmarks.runner) generates them and logs one MLflow run per (checkpoint, sampling
settings, seed, images per prompt, prompt set) holding every suite's metrics.
"""
