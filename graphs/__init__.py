"""CUDA-graph runtime: capture per batch bucket, re-plan and replay."""
