"""Named tensors in the safetensors format, written straight from tensor memory.

`safetensors.torch.save_file` first builds the whole file in memory (a second full copy
of the state) and leaves checksumming to a second read. This writer streams the header
and then each tensor's own bytes to the file, hashing as it goes. Its output is
byte-for-byte what the library writes (tests/store/test_tensorfile.py pins that), so
`safetensors.torch.load_file` reads it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import torch

# safetensors' dtype names
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


# The library's order of dtypes (its Rust enum), read off its output: a file lists the
# highest rank first, so larger elements come first and stay aligned.
RANK = {"BOOL": 0, "U8": 1, "I8": 2, "F8_E5M2": 3, "F8_E4M3": 4, "I16": 5, "F16": 6, "BF16": 7, "I32": 8,
        "F32": 9, "F64": 10, "I64": 11}


def _ordered(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The library's order: by dtype rank, highest first, then by name."""
    return sorted(tensors.items(), key=lambda kv: (-RANK.get(DTYPES.get(kv[1].dtype, ""), -1), kv[0]))


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to a multiple of 8."""
    # sorted: the library keeps metadata in a hash map, in no fixed order; ours is stable
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, t in _ordered(tensors):
        if t.dtype not in DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {t.dtype}, which safetensors cannot hold")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian on every platform torch runs on)."""
    if not t.is_contiguous():
        t = t.contiguous()  # one tensor's copy, not the file's
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None,
          sink: Callable[[memoryview], None]) -> int:
    """Feed the whole file to SINK, piece by piece; return its size. Tensors must be on the CPU."""
    head = header(tensors, metadata)
    sink(memoryview(head))
    size = len(head)
    for _, t in _ordered(tensors):
        data = raw_bytes(t)
        sink(data)
        size += len(data)
    return size


def file_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    return len(header(tensors, metadata)) + sum(t.numel() * t.element_size() for t in tensors.values())
