"""Evaluation utilities (metrics, benchmarks) for compressor_plugin."""
