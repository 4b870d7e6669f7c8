"""The loading-optimized checkpoint format: round trips, the parallel reader, refusals of a
broken folder, and the bundled model converted, loaded and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpu.convert import convert_checkpoint
from gpu.fastload import (
    ALIGN,
    DATA_FILE,
    INDEX_FILE,
    FormatError,
    load_lmg,
    read_file_parallel,
    write_lmg,
)
from gpu.loader import CheckpointError, load_checkpoint


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 4),
        "big": torch.randn(300, 1000, generator=g),  # spans several 4 KiB pages
    }


@pytest.mark.parametrize(("mode", "threads", "direct"), [("mmap", 0, False), ("read", 1, False),
                                                      ("read", 4, True), ("read", 3, False)])
def test_round_trip_keeps_names_dtypes_shapes_and_values(tmp_path, mode, threads, direct):
    state = sample_state()
    size = write_lmg(state, tmp_path)
    assert size % ALIGN == 0 and (tmp_path / DATA_FILE).stat().st_size == size
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert list(index["tensors"]) == list(state)  # written in the dict's order
    assert all(e["offset"] % ALIGN == 0 for e in index["tensors"].values())
    loaded, stats = load_lmg(tmp_path, mode=mode, threads=max(threads, 1), direct=direct)
    assert stats.nbytes == size and stats.threads == threads
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor), name
    loaded["a"].fill_(0)  # copy-on-write: the file is never written through a tensor
    assert torch.equal(load_lmg(tmp_path, mode=mode)[0]["a"], state["a"])
    cast, _ = load_lmg(tmp_path, torch.float32)
    assert all(t.dtype == torch.float32 for t in cast.values())
    assert torch.equal(cast["b"], state["b"].float())


def test_writing_over_a_mapped_folder_replaces_the_files_instead_of_truncating_them(tmp_path):
    state = sample_state()
    write_lmg(state, tmp_path)
    mapped, _ = load_lmg(tmp_path)  # a process that loaded the folder still maps it
    write_lmg({"small": torch.ones(3)}, tmp_path)  # truncating in place would SIGBUS on the next read
    assert torch.equal(mapped["big"], state["big"])
    assert list(load_lmg(tmp_path)[0]) == ["small"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [DATA_FILE, INDEX_FILE]


def test_parallel_reads_of_many_chunks_equal_the_file(tmp_path, monkeypatch):
    import gpu.fastload as fastload

    monkeypatch.setattr(fastload, "CHUNK_BYTES", 8192)  # 2 pages per read: many chunks, many threads
    data = torch.randint(0, 256, (ALIGN * 37,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "blob"
    path.write_bytes(data.numpy().tobytes())
    for threads in (1, 2, 5):
        buf, _ = read_file_parallel(path, data.numel(), threads=threads)
        assert bytes(buf) == data.numpy().tobytes()


def test_broken_folders_are_refused_with_the_reason(tmp_path):
    write_lmg(sample_state(), tmp_path)
    index_path = tmp_path / INDEX_FILE
    good = json.loads(index_path.read_text())

    def broken(change) -> str:
        index = json.loads(json.dumps(good))
        change(index)
        index_path.write_text(json.dumps(index))
        with pytest.raises(FormatError) as e:
            load_lmg(tmp_path)
        return str(e.value)

    assert "not an lmg/1 index" in broken(lambda i: i.update(format="lmg/0"))
    assert "bytes the index says" in broken(lambda i: i.update(size=i["size"] + ALIGN))
    assert "'a' is inconsistent" in broken(lambda i: i["tensors"]["a"].update(offset=8))
    assert "'big' is inconsistent" in broken(lambda i: i["tensors"]["big"].update(shape=[300, 999]))
    assert "'b' is inconsistent" in broken(lambda i: i["tensors"]["b"].update(dtype="int8"))
    assert "'a' is inconsistent" in broken(lambda i: i["tensors"]["a"].update(offset=str(i["tensors"]["a"]["offset"])))
    assert "'big' is inconsistent" in broken(lambda i: i["tensors"]["big"].update(shape=[-300, -1000]))
    assert "(size, tensors)" in broken(lambda i: i.update(tensors=[]))
    assert "'b' and 'a' overlap" in broken(lambda i: i["tensors"]["b"].update(offset=i["tensors"]["a"]["offset"]))
    index_path.write_text("{not json")
    with pytest.raises(FormatError, match=INDEX_FILE):
        load_lmg(tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("free_engines")
def test_the_bundled_model_converted_to_lmg_loads_the_same_tensors_and_generates_the_same(smollm2_path,
                                                                                          tmp_path):
    from gpu.config import CacheConfig, EngineConfig
    from gpu.engine import Engine, generate
    from gpu.sampling import SamplingParams

    dst = convert_checkpoint(str(smollm2_path), tmp_path / "lmg", dtype="bfloat16", progress=False, fmt="lmg")
    names = {p.name for p in Path(dst).iterdir()}
    assert {"config.json", DATA_FILE, INDEX_FILE, "tokenizer.json"} <= names and "model.safetensors" not in names
    original = load_checkpoint(str(smollm2_path), torch.bfloat16)
    converted = load_checkpoint(str(dst), torch.bfloat16)
    assert converted.config == original.config and converted.tokenizer_dir == dst
    assert converted.load_stats is not None and converted.load_stats.nbytes >= 200e6
    assert set(converted.state_dict) == set(original.state_dict)
    for name, tensor in original.state_dict.items():
        assert torch.equal(converted.state_dict[name], tensor), name

    params = SamplingParams(temperature=0, max_tokens=12)
    outs = []
    for source in (str(smollm2_path), str(dst)):
        engine = Engine(EngineConfig(model=source, dtype="bfloat16", cache=CacheConfig(cache_bytes=16 * 1024**2)))
        [[c]] = generate(engine, ["What is the capital of France?"], params)
        outs.append(c.token_ids)
        del engine
    assert outs[0] == outs[1]

    (dst / DATA_FILE).write_bytes(b"\0" * ALIGN)  # truncated: a clear refusal, not a crash
    with pytest.raises(CheckpointError, match="bytes the index says"):
        load_checkpoint(str(dst), torch.bfloat16)


@pytest.mark.slow
def test_the_model_cache_writes_a_copy_once_and_loads_it_after(smollm2_path, tmp_path, caplog):
    """First load: from the GGUF, and an lmg copy is written. Second: from the copy, the same
    tensors. A damaged copy is rewritten; a changed source gets a new entry, the old one goes."""
    import logging
    import shutil

    from gpu.convert import load_cached
    from gpu.fastload import is_lmg_folder

    source = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_path, source)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="gpu.convert")
    first = load_cached(str(source), torch.bfloat16, cache)
    assert first.load_stats is None  # from the GGUF
    [entry] = list(cache.iterdir())
    assert is_lmg_folder(entry) and entry.name.startswith("model-bfloat16-")
    second = load_cached(str(source), torch.bfloat16, cache)
    assert second.load_stats is not None and second.source == str(entry)
    assert second.config == first.config
    for name, tensor in first.state_dict.items():
        assert torch.equal(second.state_dict[name], tensor), name
    assert "from its loading-optimized copy" in caplog.text

    (entry / DATA_FILE).write_bytes(b"\0" * ALIGN)  # damaged: reported, rewritten, still loads
    third = load_cached(str(source), torch.bfloat16, cache)
    assert third.load_stats is None and "unusable" in caplog.text
    assert is_lmg_folder(entry) and load_cached(str(source), torch.bfloat16, cache).load_stats is not None

    import os

    (entry / "tokenizer.json").unlink()  # its tokenizer damaged: rewritten too, not every start refused
    assert load_cached(str(source), torch.bfloat16, cache).load_stats is None
    assert (entry / "tokenizer.json").is_file()

    os.utime(source, ns=(0, 0))  # a new version of the source: a new entry replaces the old
    load_cached(str(source), torch.bfloat16, cache)
    [newer] = list(cache.iterdir())
    assert newer != entry
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    # another model of the same file name, elsewhere: an entry of its own, neither evicts the other
    (tmp_path / "other[v2]").mkdir()
    elsewhere = tmp_path / "other[v2]" / "model.gguf"
    shutil.copyfile(smollm2_path, elsewhere)
    load_cached(str(elsewhere), torch.bfloat16, cache)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert load_cached(str(source), torch.bfloat16, cache).load_stats is not None  # still there
