"""Choosing exit thresholds (and, later, latency profiles and quantization scales) for a package."""
