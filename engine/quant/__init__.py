"""Quantized weight formats (FP8 for prefill, INT4 for decode); importing registers them.

    fp8      engine.quant.fp8   e4m3 weights, one fp32 scale per output channel; activations
                                quantized per token inside the kernels (kernels.fp8_linear)
    int4     engine.quant.int4  asymmetric groups of 128 (64) along K, bf16 scales and zeros,
                                round-to-nearest; packed for the backend (kernels.int4_linear)

Activation-aware scaling (AWQ, engine.quant.awq) rewrites full-precision weights before
they reach the `int4` format, so it needs no format of its own.
"""

from engine.quant import fp8, int4  # noqa: F401  (each registers its format)
