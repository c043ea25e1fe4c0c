"""Tooling around the core, not needed to serve: benchmarks, the GPU run, plan inspection, the
primitive self-check, the driverless compile check and its static performance model."""
