"""A loading-optimized checkpoint format (ServerlessLLM's, seed 003) and its parallel reader.

A converted folder holds the usual `config.json` and tokenizer files, and instead of
safetensors::

    model.lmg               every tensor back to back, each at a 4 KiB-aligned offset
    model.lmg.index.json    {"format": "lmg/1", "size": bytes, "tensors":
                             {name: {"offset", "nbytes", "dtype", "shape"}}}

Why it loads fast: the index maps each name to an offset in one file, so a tensor is a
*view* of one buffer — nothing is parsed, allocated or copied per tensor (safetensors
parses a header and builds each tensor separately; a GGUF is dequantized). Two ways to
fill the buffer (`load_lmg(mode=...)`):

- "mmap" (the default, for the CPU): the file is memory-mapped copy-on-write and the
  kernel is told to read all of it ahead at once (`POSIX_FADV_WILLNEED`): no copy at all
  when the file is in the page cache, one sequential stream from the disk when it is not.
- "read": several reader threads (`os.preadv` releases the GIL) read large chunks into a
  page-aligned anonymous buffer, with direct I/O where asked and the file system takes it
  (no page-cache copy or pollution). This is ServerlessLLM's disk → memory stage, the one
  a device pipeline (pinned chunks copied on while the next are read) builds on.

`write_lmg` writes the format from a state dict; `load_lmg` reads it back. The buffer
belongs to the returned tensors (they keep it alive); a load in another dtype than the
stored one casts each tensor (a copy). Measured in docs/loading.md (`ops.bench_load`).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "lmg/1"
DATA_FILE = "model.lmg"
INDEX_FILE = "model.lmg.index.json"
ALIGN = 4096  # the direct-I/O alignment of offsets, lengths and the buffer
CHUNK_BYTES = 16 * 1024 * 1024  # one reader call; large enough to stream, small enough to spread
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}  # the dtypes the format stores, by name


class FormatError(ValueError):
    """The folder's index or data file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class LoadStats:
    """How a load went: bytes read, wall seconds, threads, and whether I/O was direct."""

    nbytes: int
    seconds: float
    threads: int
    direct: bool

    @property
    def gbps(self) -> float:
        return self.nbytes / max(self.seconds, 1e-9) / 1e9


def is_lmg_folder(path: Path) -> bool:
    return path.is_dir() and (path / INDEX_FILE).is_file()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_lmg(state_dict: Mapping[str, torch.Tensor], folder: Path) -> int:
    """Write `state_dict` as `model.lmg` + its index into `folder`; returns the data size.

    Tensors keep their dtype (float32, bfloat16 or float16) and are written in the
    dict's order, so a model's layers lie in the order it uses them. Both files are
    written beside their final names and moved into place, the index last: a file that
    a loading process has mapped is replaced, never truncated under it (which would
    crash that process with SIGBUS).
    """
    folder.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict] = {}
    offset = 0
    data_tmp = folder / f".{DATA_FILE}.{os.getpid()}.tmp"
    with open(data_tmp, "wb") as f:
        for name, tensor in state_dict.items():
            if tensor.dtype not in DTYPE_NAMES:
                raise FormatError(f"{name}: dtype {tensor.dtype} is not one of {sorted(_DTYPES)}")
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
            f.seek(offset)
            f.write(data)
            entries[name] = {"offset": offset, "nbytes": len(data), "dtype": DTYPE_NAMES[tensor.dtype],
                             "shape": list(tensor.shape)}
            offset = _aligned(offset + len(data))
        f.truncate(offset)  # whole 4 KiB blocks: the last direct read is aligned too
    index_tmp = folder / f".{INDEX_FILE}.{os.getpid()}.tmp"
    index_tmp.write_text(json.dumps({"format": FORMAT, "size": offset, "tensors": entries}, indent=1) + "\n")
    os.replace(data_tmp, folder / DATA_FILE)
    os.replace(index_tmp, folder / INDEX_FILE)
    return offset


def read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{folder / INDEX_FILE}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise FormatError(f"{folder / INDEX_FILE}: not an {FORMAT} index")
    size, tensors = index.get("size"), index.get("tensors")
    if not _is_int(size) or size < 0 or not isinstance(tensors, dict):
        raise FormatError(f"{folder / INDEX_FILE}: not an {FORMAT} index (size, tensors)")
    data = folder / DATA_FILE
    if not data.is_file() or data.stat().st_size != size:
        raise FormatError(f"{data}: missing, or not the {size} bytes the index says")
    spans = []
    for name, e in tensors.items():
        if not _entry_ok(e, size):
            raise FormatError(f"{folder / INDEX_FILE}: entry {name!r} is inconsistent")
        spans.append((e["offset"], e["offset"] + e["nbytes"], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise FormatError(f"{folder / INDEX_FILE}: entries {first!r} and {second!r} overlap")
    return index


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry_ok(e: object, size: int) -> bool:
    """An index entry's types, alignment, bounds, and byte count against dtype and shape."""
    if not isinstance(e, dict) or not isinstance(e.get("shape"), list):
        return False
    dtype = _DTYPES.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
    offset, nbytes, shape = e.get("offset"), e.get("nbytes"), e["shape"]
    if dtype is None or not (_is_int(offset) and _is_int(nbytes)) or not all(_is_int(d) and d >= 0 for d in shape):
        return False
    numel = 1
    for d in shape:
        numel *= d
    return offset >= 0 and offset % ALIGN == 0 and offset + nbytes <= size \
        and numel * torch.tensor([], dtype=dtype).element_size() == nbytes


def _open(path: Path, direct: bool) -> tuple[int, bool]:
    """(fd, direct?) — O_DIRECT where asked and the file system takes it, else buffered."""
    flag = getattr(os, "O_DIRECT", 0)
    if direct and flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError:  # tmpfs and some overlay file systems refuse O_DIRECT
            pass
    fd = os.open(path, os.O_RDONLY)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd, False


def read_file_parallel(path: Path, size: int, *, threads: int = 4, direct: bool = True) -> tuple[memoryview, bool]:
    """Read `size` bytes of `path` into a new page-aligned buffer with `threads` readers.

    The buffer is an anonymous mapping (page-aligned, as direct I/O requires). Returns
    (buffer, whether direct I/O was used)."""
    buf = mmap.mmap(-1, max(size, ALIGN))
    view = memoryview(buf)
    fd, used_direct = _open(path, direct)
    try:
        chunks = [(off, min(CHUNK_BYTES, size - off)) for off in range(0, size, CHUNK_BYTES)]

        def read(chunk: tuple[int, int]) -> None:
            off, n = chunk
            done = 0
            while done < n:
                got = os.preadv(fd, [view[off + done: off + n]], off + done)
                if got <= 0:
                    raise FormatError(f"{path}: short read at byte {off + done}")
                done += got

        if threads <= 1 or len(chunks) == 1:
            for c in chunks:
                read(c)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(read, chunks))
    except OSError as e:
        if used_direct:  # a file system that opens O_DIRECT but refuses the reads
            os.close(fd)
            fd = -1
            return read_file_parallel(path, size, threads=threads, direct=False)
        raise FormatError(f"{path}: {e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    return view[:size], used_direct


def map_file(path: Path, size: int) -> torch.Tensor:
    """`path` memory-mapped copy-on-write as uint8, its read-ahead of the whole file asked for."""
    if not size:
        return torch.empty(0, dtype=torch.uint8)
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


MODES = ("mmap", "read")


def load_lmg(folder: Path, dtype: torch.dtype | None = None, *, mode: str = "mmap", threads: int = 4,
             direct: bool = False) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """The state dict of an lmg folder (tensors are views of one buffer), and how it went.

    `dtype`: cast every tensor to it (None or the stored dtype: no copy). `mode`, and
    `threads` and `direct` for "read": see the module docstring."""
    import time

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    index = read_index(folder)
    t0 = time.perf_counter()
    used_direct = False
    if mode == "mmap":
        raw = map_file(folder / DATA_FILE, index["size"])
        threads = 0
    else:
        buf, used_direct = read_file_parallel(folder / DATA_FILE, index["size"], threads=threads, direct=direct)
        raw = torch.frombuffer(buf, dtype=torch.uint8) if index["size"] else torch.empty(0, dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    for name, e in index["tensors"].items():
        t = raw[e["offset"]: e["offset"] + e["nbytes"]].view(_DTYPES[e["dtype"]]).view(e["shape"])
        out[name] = t if dtype is None or t.dtype == dtype else t.to(dtype)
    return out, LoadStats(index["size"], time.perf_counter() - t0, threads, used_direct)
