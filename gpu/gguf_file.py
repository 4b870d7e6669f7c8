"""A fast reader of GGUF files: the metadata as plain Python values, the tensors as
memory-mapped bytes, and dequantization of the common types in a few numpy passes.

Why not `gguf.GGUFReader`: it builds a numpy view per metadata element, which costs
about 2 s for SmolLM2's 98,000 vocabulary and merge strings (half of a model load),
and its dequantization splits each tensor into row groups. This reader parses the
metadata with `struct` over one `bytes` of the header (~50 ms) and dequantizes
Q4_0, Q4_1, Q8_0, F16, BF16 and F32 whole-tensor at a time; other types go through
`gguf.quants.dequantize`. Both give the same values as `gguf` (tests/gpu/test_gguf_file.py
checks every field and every tensor against it, bit for bit).

Format (GGUF v2/v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
magic ``GGUF``, uint32 version, uint64 tensor count, uint64 metadata count; each
metadata entry a string key, a uint32 value type and the value (arrays: uint32 element
type, uint64 count, elements); each tensor a string name, uint32 dims, uint64 per dim
(ggml order: fastest first), uint32 ggml type, uint64 offset into the data section,
which starts at the next multiple of ``general.alignment`` (default 32).

Contract: `GgufFile.open` raises `GgufError` (a ValueError) naming the problem for a
file that is not GGUF, is big-endian, is truncated, or is inconsistent (a tensor past
the end of the file, a duplicate tensor name or metadata key, an unknown value type,
arrays nested deeper than `MAX_ARRAY_DEPTH`, a tensor of a type that cannot be
dequantized or of no elements); it never returns a half-read file. Where the two differ
on a malformed file, this reader refuses and `gguf`'s may not (it reads nested arrays
flattened, and hangs on some corrupt files); on well-formed files they agree.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GgufError", "GgufFile", "GgufTensor", "dequantize"]

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 8  # arrays of arrays: none in real files; deeper is refused, not recursed into

# metadata value types (gguf.GGUFValueType)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS = {  # type -> (struct format, size)
    _UINT8: ("<B", 1), _INT8: ("<b", 1), _UINT16: ("<H", 2), _INT16: ("<h", 2), _UINT32: ("<I", 4),
    _INT32: ("<i", 4), _FLOAT32: ("<f", 4), _BOOL: ("<?", 1), _UINT64: ("<Q", 8), _INT64: ("<q", 8),
    _FLOAT64: ("<d", 8),
}
_NUMPY = {_UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4", _INT32: "<i4",
          _FLOAT32: "<f4", _BOOL: "?", _UINT64: "<u8", _INT64: "<i8", _FLOAT64: "<f8"}

# ggml tensor types this module dequantizes itself: type -> (elements per block, bytes per block)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
_OWN = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), BF16: (1, 2)}


class GgufError(ValueError):
    """The file is not a GGUF this reader can read (the message says why)."""


@dataclass(frozen=True)
class GgufTensor:
    """One tensor: `shape` in ggml order (fastest-varying first, as the file stores it),
    `raw` its bytes (a read-only view of the memory-mapped file)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The shape in row-major (numpy / torch) order: ggml's reversed."""
        return tuple(reversed(self.shape))


@dataclass(frozen=True)
class GgufFile:
    """A parsed GGUF file. `fields` holds every metadata entry as a plain value (str,
    int, float, bool, or a list of them), in file order."""

    path: Path
    version: int
    fields: dict[str, Any]
    tensors: list[GgufTensor]
    alignment: int

    @classmethod
    def open(cls, path: str | Path) -> GgufFile:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file cannot be mapped
            raise GgufError(f"{path}: not a GGUF file (empty)") from e
        try:
            return _parse(path, mm)
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as e:
            raise GgufError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from e


class _Cursor:
    """Reads little-endian values from `buf` (a memoryview) at a moving offset."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def take(self, n: int) -> int:
        """Advance by n bytes; returns where they start."""
        start = self.pos
        if n < 0 or start + n > self.end:
            raise IndexError(f"{n} bytes at offset {start} run past the end ({self.end})")
        self.pos = start + n
        return start

    def scalar(self, kind: int) -> Any:
        fmt, size = _SCALARS[kind]
        return struct.unpack_from(fmt, self.buf, self.take(size))[0]

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return str(self.buf[start:start + n], "utf-8")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row: the hot loop of a vocabulary (tokens, merges)."""
        buf, pos, end = self.buf, self.pos, self.end
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                raise IndexError(f"a string of {n} bytes at offset {pos} runs past the end ({end})")
            append(str(buf[pos:pos + n], "utf-8"))
            pos += n
        self.pos = pos
        return out

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.scalar(kind)
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            sub, count = self.u32(), self.u64()
            if sub == _STRING:
                return self.strings(count)
            if sub in _NUMPY:
                size = _SCALARS[sub][1]
                start = self.take(size * count)
                return np.frombuffer(self.buf, _NUMPY[sub], count, start).tolist()
            if sub == _ARRAY:
                if depth >= MAX_ARRAY_DEPTH:
                    raise GgufError(f"metadata arrays nested deeper than {MAX_ARRAY_DEPTH}")
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            raise GgufError(f"unknown array element type {sub}")
        raise GgufError(f"unknown metadata value type {kind}")


def _parse(path: Path, mm: mmap.mmap) -> GgufFile:
    buf = memoryview(mm)
    cur = _Cursor(buf)
    if bytes(buf[:4]) != MAGIC:
        raise GgufError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
    cur.take(4)
    version = cur.u32()
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in (2, 3):
            raise GgufError(f"{path}: a big-endian GGUF (only little-endian files are read)")
        raise GgufError(f"{path}: GGUF version {version} (2 and 3 are read)")
    n_tensors, n_fields = cur.u64(), cur.u64()
    if n_fields > len(buf) or n_tensors > len(buf):
        raise GgufError(f"{path}: {n_fields} metadata entries and {n_tensors} tensors cannot fit its size")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        if key in fields:
            raise GgufError(f"{path}: metadata key {key!r} appears twice")
        try:
            fields[key] = cur.value(cur.u32())
        except GgufError as e:
            raise GgufError(f"{path}: metadata {key!r}: {e}") from None
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > 8:
            raise GgufError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.u64() for _ in range(n_dims))
        infos.append((name, shape, cur.u32(), cur.u64()))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise GgufError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors, names = [], set()
    for name, shape, ggml_type, offset in infos:
        if name in names:
            raise GgufError(f"{path}: tensor {name!r} appears twice")
        names.add(name)
        nbytes = _nbytes(path, name, ggml_type, shape)
        start = data_start + offset
        if start + nbytes > len(buf):
            raise GgufError(f"{path}: tensor {name!r} ({nbytes} bytes at {start}) runs past the end of the file "
                            f"({len(buf)} bytes): truncated?")
        tensors.append(GgufTensor(name, ggml_type, shape, np.frombuffer(buf, np.uint8, nbytes, start)))
    return GgufFile(path, version, fields, tensors, alignment)


def _block(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type this module can dequantize
    (itself, or through `gguf.quants`); `GgufError` for any other."""
    if ggml_type in _OWN:
        return _OWN[ggml_type]
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        raise GgufError(f"unknown ggml tensor type {ggml_type}") from None
    # gguf lists sizes for more types than it dequantizes (Q8_1, Q8_K, the integer types)
    if qtype not in getattr(gguf.quants, "_type_traits", {}) or qtype not in gguf.GGML_QUANT_SIZES:
        raise GgufError(f"tensor type {qtype.name} cannot be dequantized")
    return gguf.GGML_QUANT_SIZES[qtype]


def _nbytes(path: Path, name: str, ggml_type: int, shape: tuple[int, ...]) -> int:
    try:
        per_block, block_bytes = _block(ggml_type)
    except GgufError as e:
        raise GgufError(f"{path}: tensor {name!r}: {e}") from None
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        raise GgufError(f"{path}: tensor {name!r} has no elements (shape {list(shape)})")
    row = shape[0] if shape else 1
    if row % per_block:
        raise GgufError(f"{path}: tensor {name!r} rows of {row} are not whole blocks of {per_block}")
    return n // per_block * block_bytes


def dequantize(tensor: GgufTensor) -> np.ndarray:
    """The tensor's values as float32, in `tensor.torch_shape`. A new array for quantized
    and half types; for F32, a read-only view of the file (copy it before writing).
    `GgufError` if it cannot be (`GgufFile.open` has refused the types and shapes that
    cannot, so this is a guard)."""
    try:
        return _dequantize(tensor)
    except (ValueError, NotImplementedError) as e:
        raise GgufError(f"tensor {tensor.name!r} cannot be dequantized: {e}") from None


def _dequantize(tensor: GgufTensor) -> np.ndarray:
    t, raw, shape = tensor.ggml_type, tensor.raw, tensor.torch_shape
    if t == F32:
        return raw.view("<f4").reshape(shape)
    if t == F16:
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if t == BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if t in (Q4_0, Q4_1, Q8_0):
        per_block, block_bytes = _OWN[t]
        blocks = raw.reshape(-1, block_bytes)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n, 1)
        out = np.empty((len(blocks), per_block), np.float32)  # every step in place: one array written
        if t == Q8_0:
            out[:] = blocks[:, 2:].view(np.int8)
            out *= d
            return out.reshape(shape)
        qs = blocks[:, 4:] if t == Q4_1 else blocks[:, 2:]
        np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")  # low nibbles: elements 0..15
        np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")  # high nibbles: 16..31
        if t == Q4_0:
            out -= np.float32(8)
        out *= d
        if t == Q4_1:
            out += blocks[:, 2:4].copy().view("<f2").astype(np.float32)
        return out.reshape(shape)
    import gguf

    per_block, block_bytes = _block(t)
    rows = raw.reshape(-1, shape[-1] // per_block * block_bytes) if shape else raw
    return np.asarray(gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(t)), np.float32).reshape(shape)
