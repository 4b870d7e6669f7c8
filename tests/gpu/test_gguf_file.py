"""gpu.gguf_file against the `gguf` package's own reader: the same metadata values and
the same dequantized tensors, bit for bit, for the bundled model and for a file written
with `gguf.GGUFWriter` holding every metadata type and the tensor types lmgate reads
itself (plus two it hands to `gguf.quants`); and clear errors for files that are not
whole GGUFs."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gpu.gguf_file import GgufError, GgufFile, dequantize
from gpu.loader import CheckpointError, bundled_gguf_path, load_checkpoint
from gpu.tokenizer import TokenizerError, load_tokenizer

T = gguf.GGMLQuantizationType


def assert_same_as_gguf(path: Path) -> GgufFile:
    ours = GgufFile.open(path)
    ref = gguf.GGUFReader(str(path))
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(want)
    for key, value in want.items():
        assert ours.fields[key] == value, key
        assert type(ours.fields[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors, strict=True):
        assert mine.ggml_type == int(theirs.tensor_type)
        assert mine.torch_shape == tuple(int(d) for d in reversed(theirs.shape))
        got = dequantize(mine)
        expected = gguf.quants.dequantize(theirs.data, theirs.tensor_type).reshape(got.shape)
        assert got.dtype == np.float32
        assert np.array_equal(got, expected, equal_nan=True), mine.name
    return ours


def test_the_bundled_model_reads_as_gguf_reads_it():
    ours = assert_same_as_gguf(bundled_gguf_path())
    assert {t.ggml_type for t in ours.tensors} == {int(T.Q4_1), int(T.Q8_0), int(T.F32)}
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152


def write_gguf(path: Path, *, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A GGUF of every metadata type and tensor types F32, F16, BF16, Q4_0, Q4_1, Q8_0
    (lmgate's own dequantization), Q5_0 and Q4_K (`gguf.quants`)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for kind, value in [("uint8", 200), ("int8", -100), ("uint16", 60000), ("int16", -30000),
                        ("uint32", 4_000_000_000), ("int32", -2_000_000_000), ("float32", 0.5),
                        ("uint64", 2**63 + 5), ("int64", -(2**62)), ("float64", 1e-300), ("bool", True),
                        ("string", "héllo ✓")]:
        getattr(w, f"add_{kind}")(f"test.{kind}", value)
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.25, -1.5])
    w.add_array("test.strings", ["a", "", "ü" * 300])
    w.add_array("test.bools", [True, False])
    values = {}
    for name, qtype in [("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1),
                        ("q8_0", T.Q8_0), ("q5_0", T.Q5_0)]:
        x = rng.standard_normal((3, 64)).astype(np.float32)
        values[name] = x
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
    # no quantizer for K types in gguf's Python: blocks of random bytes with finite scales
    block_bytes = gguf.GGML_QUANT_SIZES[T.Q4_K][1]
    raw = rng.integers(0, 256, (2, block_bytes), dtype=np.uint8)
    raw[:, :4] = np.array([0.01, 0.002], np.float16).view(np.uint8)  # d, dmin
    w.add_tensor("q4_k", raw, raw_dtype=T.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_metadata_type_and_tensor_type_reads_as_gguf_reads_it(tmp_path, alignment):
    path = tmp_path / "all.gguf"
    values = write_gguf(path, alignment=alignment)
    ours = assert_same_as_gguf(path)
    assert ours.alignment == (alignment or 32)
    assert ours.fields["test.uint64"] == 2**63 + 5 and ours.fields["test.strings"][2] == "ü" * 300
    by_name = {t.name: dequantize(t) for t in ours.tensors}
    assert np.array_equal(by_name["f32"], values["f32"])
    assert np.abs(by_name["q8_0"] - values["q8_0"]).max() < 0.05  # and the quantized ones are near
    assert np.abs(by_name["q4_1"] - values["q4_1"]).max() < 0.5


def test_files_that_are_not_whole_ggufs_are_refused_with_the_reason(tmp_path):
    whole = tmp_path / "whole.gguf"
    write_gguf(whole)
    data = whole.read_bytes()
    cases = {
        "empty": (b"", "empty"),
        "magic": (b"GGML" + data[4:], "not a GGUF file"),
        "version": (data[:4] + (7).to_bytes(4, "little") + data[8:], "version 7"),
        "big-endian": (data[:4] + (3).to_bytes(4, "big") + data[8:], "big-endian"),
        "metadata": (data[:200], "truncated"),
        "tensors": (data[:-40], "runs past the end"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(content)
        with pytest.raises(GgufError, match=reason):
            GgufFile.open(path)
    with pytest.raises(CheckpointError, match="runs past the end"):  # what `lmgate serve --model` says
        load_checkpoint(str(tmp_path / "tensors.gguf"), torch.float32)
    with pytest.raises(TokenizerError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "magic.gguf")


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def raw_gguf(path: Path, kvs: list[bytes], tensors: list[tuple[str, list[int], int]], data: bytes = b"") -> Path:
    """A GGUF built byte by byte (what `gguf.GGUFWriter` refuses to write): metadata
    entries as given, tensors laid out back to back from offset 0 of the data section."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    offset = 0
    for name, dims, ggml_type in tensors:
        out += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % 32) + data
    path.write_bytes(out)
    return path


def u32_kv(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", 4, value)


@pytest.mark.parametrize(("kvs", "tensors", "data", "reason"), [
    ([u32_kv("a", 1), u32_kv("a", 2)], [], b"", "'a' appears twice"),  # gguf refuses it too
    # 5000 arrays nested: gguf's reader recurses until Python gives up
    ([_str("deep") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)], [], b"",
     "nested deeper than 8"),
    ([], [("t", [4], 26)], b"\0" * 16, "I32 cannot be dequantized"),  # a type gguf sizes but cannot read
    ([], [("t", [0, 4], 8)], b"", "no elements"),
    ([], [("t", [], 8)], b"\0" * 34, "not whole blocks of 32"),  # one quantized value is not a block
])
def test_inconsistent_files_are_refused_when_opened(tmp_path, kvs, tensors, data, reason):
    with pytest.raises(GgufError, match=reason):
        GgufFile.open(raw_gguf(tmp_path / "bad.gguf", kvs, tensors, data))


def test_a_tensor_of_the_wrong_shape_is_refused_before_it_is_dequantized(tmp_path, monkeypatch):
    """A file can claim a tensor far larger than the model needs (a sparse file costs no disk):
    the loader compares shapes with the configuration first, so nothing that big is allocated."""
    src = GgufFile.open(bundled_gguf_path())
    path = tmp_path / "wide.gguf"
    data = bundled_gguf_path().read_bytes()
    embd = next(t for t in src.tensors if t.name == "token_embd.weight")
    at = data.index(_str("token_embd.weight")) + len(_str("token_embd.weight"))
    n_dims = struct.unpack_from("<I", data, at)[0]
    dims = list(struct.unpack_from(f"<{n_dims}Q", data, at + 4))
    assert dims == list(embd.shape)
    patched = data[:at + 4] + struct.pack("<Q", dims[0] // 2) + data[at + 12:]  # half the rows' width
    path.write_bytes(patched)
    called = []
    monkeypatch.setattr("gpu.loader.dequantize", lambda t: called.append(t.name) or dequantize(t))
    with pytest.raises(CheckpointError, match="'token_embd.weight' has shape .* the model's configuration needs"):
        load_checkpoint(str(path), torch.float32)
    assert "token_embd.weight" not in called
