"""Quantized weight formats (FP8 for prefill, INT4 for decode); importing registers them."""
