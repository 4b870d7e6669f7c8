"""Compile helpers for the kernels in this folder (no CUDA device needed).

One list of template instances serves three compilers, so they cannot drift:

- `name_expressions(...)` — the strings handed to `cupy.RawModule(name_expressions=...)`
  and to `get_function` at run time;
- `instantiation_source(...)` — a translation unit that includes every .cu and takes
  the address of every instance, so `nvcc` really compiles the template bodies (an
  uninstantiated template is only parsed);
- `build_cpu_emulator()` — the same .cu files compiled with g++ against
  `cpu_emu/cuda_emu.h` into a shared library (cached by source hash) for ctypes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
CPU_EMU_DIR = KERNEL_DIR / "cpu_emu"
SOURCES = ("cache_ops.cu", "paged_attention.cu")

# torch dtype name → C++ element type
CXX_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16,)
GROUPS = (1, 2, 3, 4, 8)  # num_heads // num_kv_heads


@dataclass(frozen=True)
class AttentionInstance:
    """One template parameter set of the attention kernels."""

    dtype: str  # key of CXX_TYPES
    head_dim: int
    block_size: int
    group: int

    def kernel(self, name: str) -> str:
        """`name` is "paged_decode", "paged_decode_partitioned" or "paged_prefill"."""
        params = f"{CXX_TYPES[self.dtype]}, {self.head_dim}, {self.block_size}, {self.group}"
        return f"lmgate::{name}<{params}>"

    @property
    def reduce_kernel(self) -> str:
        return f"lmgate::paged_decode_reduce<{CXX_TYPES[self.dtype]}, {self.head_dim}>"

    @property
    def kernels(self) -> tuple[str, ...]:
        """Every kernel name of this instance (one NVRTC module)."""
        return (
            self.kernel("paged_decode"),
            self.kernel("paged_decode_partitioned"),
            self.reduce_kernel,
            self.kernel("paged_prefill"),
        )


def write_kv_name(dtype: str) -> str:
    return f"lmgate::write_kv<{CXX_TYPES[dtype]}>"


COPY_BLOCKS_NAME = "lmgate::copy_blocks"
PARTITION_SIZE = 256  # kPartitionSize in paged_attention.cu


def all_attention_instances() -> list[AttentionInstance]:
    return [
        AttentionInstance(dtype, hd, bs, g)
        for dtype in CXX_TYPES
        for hd in HEAD_DIMS
        for bs in BLOCK_SIZES
        for g in GROUPS
    ]


def name_expressions(instances: list[AttentionInstance]) -> list[str]:
    """Every kernel name the given instances need, plus the cache ops of their dtypes."""
    names = [COPY_BLOCKS_NAME]
    for dtype in sorted({i.dtype for i in instances}):
        names.append(write_kv_name(dtype))
    for inst in instances:
        names += [n for n in inst.kernels if n not in names]  # reduce is shared by groups
    return names


def module_source() -> str:
    """The source handed to NVRTC: every .cu, included by path."""
    return "".join(f'#include "{name}"\n' for name in SOURCES)


def instantiation_source(instances: list[AttentionInstance]) -> str:
    """A translation unit that forces every instance to be compiled."""
    refs = ",\n    ".join(f"(const void*)&{name}" for name in name_expressions(instances))
    return f"{module_source()}\nextern const void* const lmgate_instances[] = {{\n    {refs}\n}};\n"


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )


def nvcc_compile(arch: str, instances: list[AttentionInstance], out_dir: Path) -> Path:
    """Compile every kernel instance for `arch` (e.g. "sm_80") with warnings as errors.

    Raises `subprocess.CalledProcessError` (with nvcc's output) on failure.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH")
    src = out_dir / "lmgate_instances.cu"
    src.write_text(instantiation_source(instances))
    obj = out_dir / f"lmgate_{arch}.o"
    cmd = [
        nvcc, f"-arch={arch}", "-std=c++17", "-O2", "--Werror", "all-warnings",
        "-Xcompiler", "-Wall,-Wextra", "-I", str(KERNEL_DIR), "-c", str(src), "-o", str(obj),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return obj


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted(
        [*KERNEL_DIR.glob("*.cu"), *KERNEL_DIR.glob("*.cuh"), *CPU_EMU_DIR.glob("*")]
    ):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_cpu_emulator(cache_dir: Path | None = None) -> Path:
    """g++-compile cpu_emu/harness.cpp (which includes the .cu files) into a shared library.

    The result is cached under `cache_dir` (default: the system temp dir) by a hash
    of every kernel and emulator source, so an edit rebuilds and a rerun does not.
    """
    cxx = shutil.which("g++")
    if cxx is None:
        raise FileNotFoundError("g++ not found on PATH")
    root = cache_dir or Path(tempfile.gettempdir()) / "lmgate-cpu-emu"
    lib = root / _source_hash() / "liblmgate_cpu_emu.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [
        cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
        "-I", str(KERNEL_DIR), "-I", str(CPU_EMU_DIR),
        str(CPU_EMU_DIR / "harness.cpp"), "-o", str(tmp),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    tmp.replace(lib)  # atomic: a concurrent builder never loads a half-written file
    return lib


def cuda_header_dir() -> str | None:
    """Where cuda_fp16.h / cuda_bf16.h live (system toolkit or the nvidia-* wheels)."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError:
        return None
    return find_nvidia_header_directory("cudart")  # None when not found


def nvrtc_options() -> tuple[str, ...]:
    """Options for NVRTC (CuPy adds its own include dirs too; duplicates are harmless)."""
    opts = ["-std=c++17", f"-I{KERNEL_DIR}"]
    headers = cuda_header_dir()
    if headers:
        opts.append(f"-I{headers}")
    return tuple(opts)


def nvrtc_compile(names: list[str], arch: str = "compute_80") -> dict[str, str]:
    """Compile the module with NVRTC directly (no device needed, unlike CuPy's
    RawModule, which asks the device for its arch). Returns name → lowered name.

    Raises RuntimeError with NVRTC's log on a compile error; ImportError/OSError
    when CuPy or libnvrtc is missing.
    """
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(module_source(), "lmgate_kernels.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, [*nvrtc_options(), f"-arch={arch}"])
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed:\n{nvrtc.getProgramLog(prog)}") from exc
        return {name: nvrtc.getLoweredName(prog, name) for name in names}
    finally:
        nvrtc.destroyProgram(prog)


# Flags of the CPU extensions (gpu/kernels/cpu/*.cpp). -march=native: they are built on
# the machine that runs them. -fopenmp is what makes at::parallel_for (an inline OpenMP
# region in torch's headers) actually use torch's threads — without it a kernel runs on
# one core — and turns on the `omp simd` pragmas.
CPU_EXTENSION_CFLAGS = ("-O3", "-march=native", "-fopenmp")


@functools.cache
def cpu_fingerprint() -> str:
    """What `-march=native` compiles for on this machine: vendor, family, model and the
    ISA flags of the first CPU in /proc/cpuinfo (the platform's names elsewhere).

    Part of every CPU extension's cache key, because the build cache outlives the
    machine: a home directory or image layer that carries ~/.cache/torch_extensions
    from an AVX-512 host to an AVX2-only one would otherwise load a binary that dies
    on its first AVX-512 instruction (SIGILL), not fall back.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    first = text.split("\n\n", 1)[0]
    keep = ("vendor_id", "cpu family", "model", "flags", "Features", "CPU implementer", "CPU part")
    fields = [line.split(":", 1)[1].strip() for line in first.splitlines()
              if ":" in line and line.split(":", 1)[0].strip() in keep]
    return " | ".join(fields) or f"{platform.machine()} {platform.processor()}"


def cpu_extension_name(source: Path, cflags: Sequence[str], fingerprint: str) -> str:
    """Module (and cache directory) name of a CPU extension: a hash of the source text,
    the headers beside it (torch's build check does not follow includes), the flags and
    `fingerprint` (the CPU it is built for, and the Python environment), so an edit, a
    flag, another CPU or another venv builds its own and a rerun does not rebuild."""
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(
        source.read_bytes() + headers + " ".join(cflags).encode() + b"\0" + fingerprint.encode()
    ).hexdigest()[:12]
    return f"lmgate_{source.stem}_{digest}"


def extension_fingerprint() -> str:
    """What a CPU extension's build depends on besides its source and flags: this CPU, and
    the Python environment (torch's include and library paths, the venv's, are in the
    build's flags: two checkouts' venvs sharing one name rebuilt it in turn, each time)."""
    return cpu_fingerprint() + "\0" + sys.prefix


def load_cpu_extension(source: str, extra_cflags: tuple[str, ...] = ()):
    """Build (on first use) and import the torch C++ extension `cpu/<source>`.

    `torch.utils.cpp_extension.load` caches the build under ~/.cache/torch_extensions
    under `cpu_extension_name` (source, flags and this CPU). `extra_cflags` go after
    the shared ones. Raises whatever the build raises (no compiler, no headers):
    callers decide how to fall back.

    torch guards each build directory with a `lock` *file*, taken on every load (it
    checks the build is current) and left behind when the process dies holding it:
    every later load then waits forever (seen: a server killed while loading hung
    the next start and the test suite). So loads of one extension are serialized by
    a kernel lock (`flock`, released when its process dies) taken first; whoever
    holds it and finds torch's lock file knows it is a dead process's and removes it.
    """
    from torch.utils.cpp_extension import _get_build_directory, load

    ninja_on_path()
    path = KERNEL_DIR / "cpu" / source
    cflags = [*CPU_EXTENSION_CFLAGS, *extra_cflags]
    name = cpu_extension_name(path, cflags, extension_fingerprint())
    build_dir = Path(_get_build_directory(name, verbose=False))
    with _exclusive(build_dir.parent / f"{name}.flock"):
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that died", stale)
            stale.unlink(missing_ok=True)
        return load(
            name=name,
            sources=[str(path)],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


def ninja_on_path() -> bool:
    """Whether `ninja` (torch builds extensions with it) is on PATH, after putting the
    running interpreter's bin directory there when ninja lies there and not on PATH: the
    set-up installs it into the venv, and `.venv/bin/lmgate` run without the venv
    activated (a systemd unit, cron) has only the system's PATH."""
    if shutil.which("ninja") is not None:
        return True
    bin_dir = Path(sys.executable).parent
    if shutil.which("ninja", path=str(bin_dir)) is None:
        return False
    os.environ["PATH"] = os.pathsep.join(p for p in (str(bin_dir), os.environ.get("PATH", "")) if p)
    return True


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive `flock` on `lock_path` for the block (no-op where flock does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
