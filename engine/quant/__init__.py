"""Quantized weight formats (FP8 prefill, INT4 decode, INT8 LM head); importing registers them.

    fp8      engine.quant.fp8   e4m3 weights, one fp32 scale per output channel; activations
                                quantized per token inside the kernels (kernels.fp8_linear)
    int4     engine.quant.int4  asymmetric groups of 128 (64) along K, bf16 scales and zeros,
                                round-to-nearest; packed for the backend (kernels.int4_linear)
    int8     engine.quant.int8  symmetric int8 per output channel (the decode LM head on CPUs)

Activation-aware scaling (AWQ, engine.quant.awq) rewrites full-precision weights before
they reach the `int4` format, so it needs no format of its own.
"""

from engine.quant import fp8, int4, int8  # noqa: F401  (each registers its format)
