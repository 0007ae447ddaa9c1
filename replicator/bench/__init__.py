"""Benchmarks you can run on a host: `replicator bench cpu` and `replicator bench copy-frequency`."""
