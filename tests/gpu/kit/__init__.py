"""The one-shot GPU verification kit: one module per stage, run by ``tests/gpu/gpu_check.py``."""
