"""Quantized weight formats (FP8 prefill, INT4 decode, INT8 LM head); importing registers them.

    fp8      engine.quant.fp8   e4m3 weights, one fp32 scale per output channel; activations
                                quantized per token inside the kernels (kernels.fp8_linear)
    int4     engine.quant.int4  asymmetric groups of 128 (64) along K, bf16 scales and zeros,
                                round-to-nearest; packed for the backend (kernels.int4_linear)
    int8     engine.quant.int8  symmetric int8 per output channel (the decode LM head on CPUs)

Calibrated quantizers need no format of their own: activation-aware scaling (AWQ for
int4, engine.quant.awq; SmoothQuant for fp8, engine.quant.smooth) rewrites the
full-precision checkpoint (engine.quant.scaling folds the scales), and AWQ's clipping and
GPTQ's rounding (engine.quant.gptq) leave `Int4Groups` / `Fp8Channels`, which the formats
serve as they are.
"""

from pathlib import Path

from engine.quant import fp8, int4, int8  # noqa: F401  (each registers its format)

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
"""Prose shipped for every calibration (the quantizers' statistics, the FP8 KV cache's
scales, engine.kv_scales); never the held-out text quality is measured on."""
