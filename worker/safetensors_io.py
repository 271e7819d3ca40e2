"""Byte-for-byte deterministic safetensors files.

safetensors' own writer emits metadata keys in a per-process order, so two identical trainings
produce files with different bytes. This writer sorts tensors and metadata keys and so gives
the same bytes for the same tensors; any safetensors reader loads it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_canonical(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` to `path` with sorted names, sorted metadata and 8-byte aligned data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canonical_bytes(tensors, metadata))


def load_bytes(raw: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (data only: nothing in them can run code)."""
    from safetensors.torch import load

    return load(raw)


def canonical_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The bytes of a safetensors file of `tensors`: sorted names, sorted metadata, aligned."""
    header: dict[str, object] = {}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name}: unsupported dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    head += b" " * (-len(head) % 8)  # the format asks for the data to start 8-byte aligned
    return b"".join([struct.pack("<Q", len(head)), head, *blobs])
