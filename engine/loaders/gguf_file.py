"""A GGUF file's metadata and tensor table, read without touching the tensor data.

`gguf.GGUFReader` turns every element of every metadata array into a numpy object, which
takes seconds on a 49k-token vocabulary; this reader walks the header once with `struct`
and memory-maps the data section, so opening the default model costs milliseconds.

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count x  (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims] (fastest first), u32 ggml_type,
                    u64 offset from the data section)
    padding to `general.alignment` (32) | data section

Strings are u64 length + UTF-8 bytes; arrays are u32 element type + u64 count + elements.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

MetadataValue = int | float | bool | str | list[int] | list[float] | list[str]

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the data section; `shape` is in torch order (slowest first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return prod(self.shape) // block_size * type_size


class GGUFFile:
    """An open GGUF file: typed metadata accessors and tensors dequantized on request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError(f"{path} is truncated or corrupt (the file is empty)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._map[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no 'GGUF' magic bytes at its start)")
        self._pos = 24
        self.metadata: dict[str, MetadataValue] = {}
        try:
            # Every read of a cut-off header runs past the map's end (struct.error); garbage
            # there names a value type GGUF lacks (ValueError, KeyError).
            version, tensor_count, kv_count = struct.unpack_from("<IQQ", self._map, 4)
            if version in _SUPPORTED_VERSIONS:
                tensors = self._read_header(tensor_count, kv_count)
        except (struct.error, ValueError, KeyError) as e:
            raise ValueError(f"{path} is truncated or corrupt ({e})") from None
        if version not in _SUPPORTED_VERSIONS:
            raise ValueError(f"{path} is GGUF version {version}; Baton reads versions 2 and 3")
        self.tensors = {info.name: info for info in map(self._tensor_info, tensors)}
        alignment = self.get_int("general.alignment", _DEFAULT_ALIGNMENT)
        if alignment < 1:
            raise ValueError(f"{path} is truncated or corrupt (general.alignment={alignment})")
        self._data_start = -(-self._pos // alignment) * alignment
        for info in self.tensors.values():
            if self._data_start + info.offset + info.nbytes > len(self._map):
                raise ValueError(
                    f"{path} is truncated or corrupt (tensor {info.name!r} runs past its end)"
                )

    def __contains__(self, key: str) -> bool:
        return key in self.metadata

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in torch-order shape; a fresh, writable array."""
        info = self.tensors[name]
        block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
        raw = np.frombuffer(
            self._map, dtype=np.uint8, count=info.nbytes, offset=self._data_start + info.offset
        )
        rows = raw.reshape(*info.shape[:-1], info.shape[-1] // block_size * type_size)
        values = dequantize(rows, info.ggml_type)
        # F32 comes back as a read-only view of the map; everything else is already a copy.
        return values.copy() if info.ggml_type == GGMLQuantizationType.F32 else values

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.path}: metadata {key!r} must be an integer, got {value!r}")
        return value

    def get_float(self, key: str, default: float | None = None) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.path}: metadata {key!r} must be a number, got {value!r}")
        return float(value)

    def get_bool(self, key: str, default: bool | None = None) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.path}: metadata {key!r} must be a bool, got {value!r}")
        return value

    def get_str(self, key: str, default: str | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ValueError(f"{self.path}: metadata {key!r} must be a string, got {value!r}")
        return value

    def get_list(self, key: str) -> list[int] | list[float] | list[str]:
        value = self._get(key, None)
        if not isinstance(value, list):
            raise ValueError(f"{self.path}: metadata {key!r} must be an array, got {value!r}")
        return value

    def _get(self, key: str, default: MetadataValue | None) -> MetadataValue:
        if key in self.metadata:
            return self.metadata[key]
        if default is None:
            raise ValueError(f"{self.path} lacks the metadata key {key!r}")
        return default

    def _read_u32(self) -> int:
        (value,) = struct.unpack_from("<I", self._map, self._pos)
        self._pos += 4
        return int(value)

    def _read_string(self) -> str:
        (length,) = struct.unpack_from("<Q", self._map, self._pos)
        start = self._pos + 8
        self._pos = start + length
        return self._map[start : self._pos].decode("utf-8", errors="replace")

    def _read_value(self, value_type: int) -> MetadataValue:
        if value_type == GGUFValueType.STRING:
            return self._read_string()
        if value_type == GGUFValueType.ARRAY:
            element_type = self._read_u32()
            (count,) = struct.unpack_from("<Q", self._map, self._pos)
            self._pos += 8
            if element_type == GGUFValueType.STRING:
                return [self._read_string() for _ in range(count)]
            fmt = _SCALAR_FORMATS[GGUFValueType(element_type)]
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._map, self._pos))
            self._pos += count * struct.calcsize(fmt)
            return values
        fmt = _SCALAR_FORMATS[GGUFValueType(value_type)]
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        if value_type == GGUFValueType.FLOAT32:
            # An f32 1e-5 widens to 9.99999974e-06; its shortest f32 spelling is what the
            # converter wrote.
            return float(str(np.float32(value)))
        return value

    def _read_header(
        self, tensor_count: int, kv_count: int
    ) -> list[tuple[str, tuple[int, ...], int, int]]:
        """Reads the metadata into `self.metadata`; returns the tensor table as read."""
        for _ in range(kv_count):
            key = self._read_string()
            self.metadata[key] = self._read_value(self._read_u32())
        return [self._read_tensor_entry() for _ in range(tensor_count)]

    def _read_tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._read_string()
        n_dims = self._read_u32()
        dims = struct.unpack_from(f"<{n_dims}Q", self._map, self._pos)
        ggml_type, offset = struct.unpack_from("<IQ", self._map, self._pos + 8 * n_dims)
        self._pos += 8 * n_dims + 12
        return name, dims, ggml_type, offset

    def _tensor_info(self, entry: tuple[str, tuple[int, ...], int, int]) -> GGUFTensorInfo:
        name, dims, ggml_type, offset = entry
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise ValueError(
                f"{self.path}: tensor {name!r} has unknown ggml type {ggml_type}"
            ) from None
        return GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset)
