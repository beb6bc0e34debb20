"""Linear layers and the registry of weight formats they can hold.

A `LinearFormat` turns a full-precision weight into whatever its kernel multiplies
(dense activations-dtype weights, FP8 with per-channel scales, packed INT4 groups) and
applies it. A weight a calibrated quantizer already rounded (`engine.quant.gptq`) arrives
as a `QuantizedWeight` of that format instead, and only that format takes it. The model
only ever builds `Linear(weight, bias, format)` and calls it, so a new format slots in by
registering here, never by touching the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from kernels.backend import KernelBackend
from kernels.fp8_linear import Fp8Rows
from kernels.pending_norm import PendingNorm


class QuantizedWeight(ABC):
    """A weight already in a format's quantized form, standing in for its full-precision
    tensor in a checkpoint. Merged projections (q/k/v, gate/up) concatenate along the
    output dimension, like the tensors they replace."""

    format: ClassVar[str]

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """[out_features, in_features]."""

    @classmethod
    @abstractmethod
    def cat(cls, parts: list[Any]) -> Any:
        """The parts stacked along the output dimension."""


def cat_weights(parts: list[Any]) -> Any:
    """Stack full-precision tensors, or quantized weights of one format, along dim 0."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0)
    kinds = {type(p) for p in parts}
    if len(kinds) == 1 and issubclass(next(iter(kinds)), QuantizedWeight):
        return parts[0].cat(parts)
    names = sorted(getattr(p, "format", "full precision") for p in parts)
    raise ValueError(f"cannot merge projections held as {', '.join(names)}; quantize all alike")


class LinearFormat(ABC):
    """One way of storing and multiplying a projection weight."""

    name: ClassVar[str]
    scheme: ClassVar[str]
    """Quantization scheme recorded in KV fingerprints when this format computes prefill."""

    @abstractmethod
    def prepare(
        self, weight: torch.Tensor, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> Any:
        """Convert a full-precision [out, in] weight into the stored form `ops` multiplies."""

    def prepare_quantized(
        self, weight: QuantizedWeight, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> Any:
        """The stored form of a weight already quantized in this format."""
        raise ValueError(f"the {self.name} format has no ahead-of-time quantized weights")

    @abstractmethod
    def apply(
        self, ops: KernelBackend, stored: Any, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype."""

    def prepare_gated(
        self,
        weight: torch.Tensor | QuantizedWeight,
        dtype: torch.dtype,
        device: str,
        ops: KernelBackend,
    ) -> Any | None:
        """The stored form of a [gate ‖ up] weight for `apply_gated`, which returns
        silu(gate) * up in one kernel; None where this format has no such kernel on `ops`
        (the projection then runs `apply` and `ops.silu_and_mul`)."""
        return None

    def apply_gated(
        self, ops: KernelBackend, stored: Any, x: torch.Tensor | PendingNorm
    ) -> torch.Tensor:
        """x [T, in] -> silu(gate) * up, [T, out / 2], from `prepare_gated`'s stored form."""
        raise NotImplementedError(f"the {self.name} format has no fused SiLU-and-mul")

    def takes_fp8_rows(self, ops: KernelBackend) -> bool:
        """Whether `apply_fp8_rows` exists: inputs quantized per token by the op that
        produced them (an RMSNorm, a SiLU-and-mul) rather than by a pass of their own."""
        return False

    def apply_fp8_rows(
        self, ops: KernelBackend, stored: Any, x: Fp8Rows, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`apply` to the rows `x` holds quantized."""
        raise NotImplementedError(f"the {self.name} format takes no pre-quantized rows")

    def takes_pending_norm(self, ops: KernelBackend) -> bool:
        """Whether, on `ops`, `apply_normed` and `apply_add_norm` exist: an RMSNorm split
        between this format's GEMMs (`kernels.pending_norm`)."""
        return False

    def apply_normed(
        self, ops: KernelBackend, stored: Any, x: PendingNorm, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`apply` to the rows `x` stands for."""
        raise NotImplementedError(f"the {self.name} format takes no pending norm")

    def apply_add_norm(
        self,
        ops: KernelBackend,
        stored: Any,
        x: torch.Tensor,
        residual: torch.Tensor,
        gamma: torch.Tensor,
        eps: float,
    ) -> tuple[PendingNorm, torch.Tensor]:
        """`ops.rms_norm(apply(x), gamma, eps, residual)` with the norm left pending."""
        raise NotImplementedError(f"the {self.name} format takes no pending norm")


class DenseFormat(LinearFormat):
    """Weights kept in the activation dtype; the reference every other format is measured by."""

    name = "dense"
    scheme = "none"

    def prepare(
        self, weight: torch.Tensor, dtype: torch.dtype, device: str, ops: KernelBackend
    ) -> torch.Tensor:
        return weight.to(device=device, dtype=dtype).contiguous()

    def apply(
        self,
        ops: KernelBackend,
        stored: torch.Tensor,
        x: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return ops.dense_linear(x, stored, bias)


def check_activation_dtype(fmt: LinearFormat, dtype: torch.dtype, ops: KernelBackend) -> None:
    """Quantized formats refuse, at load, an activation dtype their backend cannot take."""
    if dtype not in ops.quantized_activation_dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in ops.quantized_activation_dtypes)
        raise ValueError(
            f"the {ops.name} backend's {fmt.name} kernels take {allowed} activations, not "
            f"{str(dtype).removeprefix('torch.')}; change dtype or the kernel backend"
        )


_FORMATS: dict[str, Callable[[], LinearFormat]] = {"dense": DenseFormat}


def register_format(name: str, factory: Callable[[], LinearFormat]) -> None:
    _FORMATS[name] = factory


def linear_format(name: str) -> LinearFormat:
    """The format called `name`, naming the supported choices when it is unknown."""
    if name not in _FORMATS:
        # Quantized formats register themselves on import.
        import engine.quant  # noqa: F401

    try:
        return _FORMATS[name]()
    except KeyError:
        raise ValueError(
            f"unknown linear format {name!r}; choose one of {', '.join(sorted(_FORMATS))}"
        ) from None


class Linear:
    """A projection: `y = x @ W.T + b` with W held in `fmt`'s stored form.

    With `batch_invariant`, every row is multiplied on its own (M = 1): a GEMM's kernel and
    reduction order change with M, so a row's bits would otherwise depend on how many
    other rows share the call. It costs one pass over the weight per row.

    A `gated` projection is an MLP's merged [gate ‖ up] and returns silu(gate) * up: in its
    GEMM's epilogue where the format has that kernel on the backend (`prepare_gated`),
    else through `ops.silu_and_mul`, rounded at the same points either way.

    `add_norm` is this projection followed by the residual add and RMSNorm of the next one's
    input; where the format can, the norm is left pending (`kernels.pending_norm`) and the
    projection called with it finishes it in its own epilogue, so no norm kernel runs.

    Where the next projection `takes_fp8`, `add_norm(..., fp8_out=True)`'s RMSNorm and a
    gated projection's SiLU-and-mul (`quantized`) quantize their output per token as they
    write it (`kernels.fp8_linear.Fp8Rows`): the FP8 GEMM after them skips its quantization
    pass and reads one byte an element instead of two. The numbers are the unfused pair's.
    """

    def __init__(
        self,
        weight: torch.Tensor | QuantizedWeight,
        bias: torch.Tensor | None,
        fmt: LinearFormat,
        ops: KernelBackend,
        dtype: torch.dtype,
        device: str,
        batch_invariant: bool = False,
        gated: bool = False,
    ) -> None:
        if isinstance(weight, QuantizedWeight) and weight.format != fmt.name:
            raise ValueError(
                f"this weight was quantized as {weight.format} ahead of time; it can only be "
                f"served with linear={weight.format!r}, not {fmt.name!r}"
            )
        self.out_features, self.in_features = weight.shape
        self.batch_invariant = batch_invariant
        self.fmt = fmt
        self.ops = ops
        self.gated = gated
        self.takes_pending = fmt.takes_pending_norm(ops) and not batch_invariant
        """Whether a `PendingNorm` input is finished in this GEMM (else materialized first)."""
        self.adds_norm = self.takes_pending and bias is None and not gated
        """Whether `add_norm` leaves its norm pending."""
        self.takes_fp8 = fmt.takes_fp8_rows(ops) and not batch_invariant
        """Whether the op producing this projection's input should quantize it (`Fp8Rows`)."""
        stored = fmt.prepare_gated(weight, dtype, device, ops) if gated and bias is None else None
        self.fused_gate = stored is not None
        """Whether the SiLU-and-mul runs in the GEMM's epilogue (the rows are then reordered)."""
        if stored is not None:
            self.stored = stored
        elif isinstance(weight, QuantizedWeight):
            self.stored = fmt.prepare_quantized(weight, dtype, device, ops)
        else:
            self.stored = fmt.prepare(weight, dtype, device, ops)
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor | PendingNorm | Fp8Rows) -> torch.Tensor:
        y = self._project(x)
        return self.ops.silu_and_mul(y) if self.gated and not self.fused_gate else y

    def quantized(self, x: torch.Tensor | PendingNorm | Fp8Rows) -> Fp8Rows:
        """A gated projection's silu(gate) * up, quantized per token as it is written, for
        an FP8 projection after it (one that `takes_fp8`)."""
        assert self.gated and not self.fused_gate, "only a SiLU-and-mul quantizes its output"
        y = self._project(x)
        return Fp8Rows(*self.ops.silu_and_mul_fp8(y), y.dtype)

    def _project(self, x: torch.Tensor | PendingNorm | Fp8Rows) -> torch.Tensor:
        """The projection alone, row by row where `batch_invariant`."""
        if isinstance(x, PendingNorm) and not self.takes_pending:
            x = x.materialize()
        assert not isinstance(x, Fp8Rows) or self.takes_fp8, "pre-quantized rows: FP8 only"
        if self.batch_invariant and isinstance(x, torch.Tensor) and x.shape[0] > 1:
            return torch.cat([self._apply(r) for r in x.split(1)])
        return self._apply(x)

    def add_norm(
        self,
        x: torch.Tensor | Fp8Rows,
        residual: torch.Tensor,
        gamma: torch.Tensor,
        eps: float,
        fp8_out: bool = False,
    ) -> tuple[torch.Tensor | PendingNorm | Fp8Rows, torch.Tensor]:
        """`ops.rms_norm(self(x), gamma, eps, residual)`: the normed rows (pending where
        `adds_norm`, quantized with `fp8_out`) and the residual sum s."""
        if fp8_out:
            q, scale, s = self.ops.rms_norm_fp8(self(x), gamma, eps, residual)
            return Fp8Rows(q, scale, s.dtype), s
        if self.adds_norm:
            assert isinstance(x, torch.Tensor)
            return self.fmt.apply_add_norm(self.ops, self.stored, x, residual, gamma, eps)
        return self.ops.rms_norm(self(x), gamma, eps, residual)

    def _apply(self, x: torch.Tensor | PendingNorm | Fp8Rows) -> torch.Tensor:
        """The projection alone (a gated one's [gate ‖ up], unless its SiLU is fused)."""
        if self.fused_gate:
            assert not isinstance(x, Fp8Rows)
            return self.fmt.apply_gated(self.ops, self.stored, x)
        if isinstance(x, Fp8Rows):
            return self.fmt.apply_fp8_rows(self.ops, self.stored, x, self.bias)
        if isinstance(x, PendingNorm):
            return self.fmt.apply_normed(self.ops, self.stored, x, self.bias)
        return self.fmt.apply(self.ops, self.stored, x, self.bias)
