"""The tensor codec: ``{dtype, shape, raw little-endian row-major bytes}``.

Tensors cross every boundary in this form (protobuf ``internvl.common.v1.Tensor``, Redis values, Ray
object-store payloads), never as lists of floats. numpy has no bfloat16, so bf16 tensors are carried
as their raw 16-bit patterns; ``to_torch`` restores them exactly. The codec itself needs no torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.errors import InvalidArgument

# Wire dtype name -> (numpy dtype used to hold the bytes, item size). bf16 is held as uint16.
_NUMPY_HOLDERS: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "int8": np.dtype("<i1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
DTYPES = tuple(_NUMPY_HOLDERS)

# Largest tensor the codec accepts from the outside (a 40-tile image of a 6144-wide LLM in fp32 is
# ~252 MB; nothing legitimate is larger).
MAX_TENSOR_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class WireTensor:
    """A tensor as raw bytes plus the facts needed to rebuild it."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    def __post_init__(self):
        if self.dtype not in _NUMPY_HOLDERS:
            raise InvalidArgument(f"unsupported tensor dtype {self.dtype!r}; one of {DTYPES}")
        if any(d < 0 for d in self.shape):
            raise InvalidArgument(f"negative dimension in tensor shape {self.shape}")
        expected = self.nbytes_expected()
        if expected > MAX_TENSOR_BYTES:
            raise InvalidArgument(f"tensor of {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte bound")
        if len(self.data) != expected:
            raise InvalidArgument(
                f"tensor data is {len(self.data)} bytes but dtype {self.dtype} and shape {self.shape} "
                f"need {expected}"
            )

    def nbytes_expected(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * _NUMPY_HOLDERS[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return len(self.data)

    # -- numpy ---------------------------------------------------------------------------------
    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: str | None = None) -> WireTensor:
        """From a numpy array. A uint16 array holding bf16 bit patterns needs ``dtype="bfloat16"``."""
        name = dtype or _numpy_name(array.dtype)
        holder = _NUMPY_HOLDERS[name]
        arr = np.ascontiguousarray(array, dtype=holder)
        return cls(name, tuple(int(d) for d in arr.shape), memoryview(arr).cast("B"))

    def to_numpy(self) -> np.ndarray:
        """A read-only view of the bytes (no copy). bf16 comes back as its uint16 bit patterns."""
        holder = _NUMPY_HOLDERS[self.dtype]
        return np.frombuffer(self.data, dtype=holder).reshape(self.shape)

    # -- torch ---------------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, tensor: Any) -> WireTensor:
        import torch

        t = tensor.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return cls.from_numpy(t.view(torch.uint16).numpy(), dtype="bfloat16")
        return cls.from_numpy(t.numpy())

    def to_torch(self, device: Any = "cpu") -> Any:
        import torch

        holder = _NUMPY_HOLDERS[self.dtype]
        if len(self.data) == 0:
            t = torch.empty(self.shape, dtype=_torch_dtype(self.dtype))
            return t.to(device)
        # frombuffer shares memory with ``data``; clone so the tensor owns writable storage.
        buf = self.data if isinstance(self.data, bytearray) else bytearray(self.data)
        t = torch.frombuffer(buf, dtype=_torch_holder(holder)).reshape(self.shape)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.to(device)

    def tobytes(self) -> bytes:
        return bytes(self.data)


def _numpy_name(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    for name, holder in _NUMPY_HOLDERS.items():
        if name != "bfloat16" and dt.kind == holder.kind and dt.itemsize == holder.itemsize:
            return name
    raise InvalidArgument(f"unsupported numpy dtype {dt}")


def _torch_holder(holder: np.dtype):
    import torch

    return {
        "u1": torch.uint8,
        "i1": torch.int8,
        "i4": torch.int32,
        "i8": torch.int64,
        "f2": torch.float16,
        "u2": torch.uint16,
        "f4": torch.float32,
        "f8": torch.float64,
    }[f"{holder.kind}{holder.itemsize}"]


def _torch_dtype(name: str):
    import torch

    return {
        "uint8": torch.uint8,
        "int8": torch.int8,
        "int32": torch.int32,
        "int64": torch.int64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float64": torch.float64,
    }[name]


def torch_dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the wire name)."""
    return str(dtype).removeprefix("torch.")


if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("the tensor codec assumes a little-endian host")
