"""LoRA adapters (`gpu.lora`): PEFT folders read into fused projections, many adapters and
the base model in one batch, token-identical to transformers + peft in float32."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.step_scheduler import ScheduledSeq, StepPlan
from gpu.config import CacheConfig, EngineConfig, LoraConfig
from gpu.engine import Engine, generate
from gpu.loader import load_checkpoint
from gpu.lora import (
    GEMM_MIN_ROWS,
    AdapterNotFound,
    LoraAdapter,
    LoraBatch,
    LoraError,
    LoraManager,
    load_adapter,
)
from gpu.runner import ModelRunner
from gpu.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("free_engines")]

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]
MAX_TOKENS = 16


def chat(engine: Engine, question: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True))


def lora_engine(paths: dict[str, Path], **lora) -> Engine:
    return Engine(EngineConfig(dtype="float32", cache=CacheConfig(cache_bytes=64 * 1024**2, huge_pages=False),
                               lora=LoraConfig(modules=tuple((n, str(p)) for n, p in paths.items()), **lora)))


@pytest.fixture(scope="module")
def engine(lora_reference) -> Engine:
    return lora_engine(lora_reference.paths)


def test_an_adapter_loads_as_fused_projections(lora_reference, engine: Engine) -> None:
    cfg = engine.model_config
    a = engine.lora.get("one")
    A, B = a.weights["layers.0.self_attn.qkv_proj"]
    assert A.shape == (3 * 8, cfg.hidden_size) and B.shape == (cfg.q_size + 2 * cfg.kv_size, 3 * 8)
    assert len(a.weights) == 4 * cfg.num_layers and a.rank == 8
    b = engine.lora.get("two")  # q and v at rank 4, down at rank 2 (rank_pattern)
    assert sorted({k.split(".", 2)[2] for k in b.weights}) == ["mlp.down_proj", "self_attn.qkv_proj"]
    A, B = b.weights["layers.5.self_attn.qkv_proj"]
    assert A.shape == (8, cfg.hidden_size)
    assert B[cfg.q_size:cfg.q_size + cfg.kv_size].abs().sum() == 0  # k is not targeted: no update
    assert b.weights["layers.5.mlp.down_proj"][0].shape == (2, cfg.intermediate_size)


def test_greedy_tokens_match_peft_for_every_adapter_in_one_mixed_batch(lora_reference, engine: Engine) -> None:
    """Each question with the base model, adapters one and two — nine requests in one
    continuously batched run — gives transformers + peft's greedy tokens."""
    jobs = [(q, adapter) for q in QUESTIONS for adapter in (None, "one", "two")]
    prompts = [chat(engine, q) for q, _ in jobs]
    outs = generate(engine, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                    adapter=[a for _, a in jobs])
    got = {(q, a): out[0].token_ids for (q, a), out in zip(jobs, outs, strict=True)}
    for (q, a), ids in zip(jobs, prompts, strict=True):
        want = lora_reference.greedy(ids, a, MAX_TOKENS)
        assert got[q, a] == want, (q, a)
    for q in QUESTIONS:  # the adapters change the answers (else this test could not fail)
        assert got[q, "one"] != got[q, None] and got[q, "two"] != got[q, None]
    assert engine.stats()["kv_usage"] == 0.0 and engine._live_adapters == {}


def test_the_prefix_cache_never_hands_one_adapter_another_adapters_kv(lora_reference, engine: Engine) -> None:
    """The same prompt, first with the base model, then with adapter "one": the base model's
    cached blocks are not reused for it (its K/V differ); a second request with "one" reuses its own."""
    ids = engine.tokenizer.encode("The moon and the stars, a story in one sentence: once, long ago, the moon")
    assert len(ids) > engine.config.cache.block_size  # a full block, and no other test's prefix
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    generate(engine, [ids], params)
    hits = engine.counters["prefix_hit_tokens"]
    first = generate(engine, [ids], params, adapter="one")[0][0].token_ids
    assert engine.counters["prefix_hit_tokens"] == hits
    assert first == lora_reference.greedy(ids, "one", MAX_TOKENS)
    again = generate(engine, [ids], params, adapter="one")[0][0].token_ids
    assert engine.counters["prefix_hit_tokens"] > hits and again == first


def test_n_greater_than_one_forks_keep_the_adapter(engine: Engine) -> None:
    ids = chat(engine, QUESTIONS[0])
    want = generate(engine, [ids], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), adapter="two")[0][0]
    outs = generate(engine, [ids], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, n=3), adapter="two")[0]
    assert [c.token_ids for c in outs] == [want.token_ids] * 3


def test_an_evicted_adapter_keeps_serving_the_requests_that_hold_it(lora_reference) -> None:
    """max_loras 1: loading "two" evicts "one" from the LRU while a request with "one" still
    runs; it finishes with the tokens of "one", which is loaded again for the next request.
    (Both were loaded once at start, to check them: two loads, one eviction.)"""
    engine = lora_engine(lora_reference.paths, max_loras=1)
    assert engine.lora.counters["loads"] == 2 and engine.lora.loaded() == ["two"]
    ids = chat(engine, QUESTIONS[1])
    engine.add_request("with-a", ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), adapter="one")
    got: dict[str, list[int]] = {}
    for d in engine.step():  # its prompt and first token
        got.setdefault(d.request_id, []).extend(d.token_ids)
    engine.add_request("with-b", ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), adapter="two")
    assert engine.lora.loaded() == ["two"] and engine.lora.counters["evictions"] == 3
    while engine.has_unfinished():
        for d in engine.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    assert got["with-a"] == lora_reference.greedy(ids, "one", MAX_TOKENS)
    assert got["with-b"] == lora_reference.greedy(ids, "two", MAX_TOKENS)
    generate(engine, [ids], SamplingParams(temperature=0, max_tokens=2), adapter="one")
    assert engine.lora.counters["loads"] == 5 and engine._live_adapters == {}


def test_an_adapter_handed_over_loaded_is_not_looked_up_again(lora_reference) -> None:
    """The runtime loads a request's adapter off the event loop and hands the engine that
    object: by name, the engine would read it again (on the event loop) had other loads
    dropped it from the LRU in between."""
    engine = lora_engine(lora_reference.paths, max_loras=1)
    one = engine.lora.get("one")  # (a load: "two" dropped)
    engine.lora.get("two")  # (a load: "one" dropped, as by another request's admission)
    loads = engine.lora.counters["loads"]
    ids = chat(engine, QUESTIONS[0])
    engine.add_request("r", ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), adapter=one)
    assert engine.lora.counters["loads"] == loads and engine.adapter_key("r") == one.key
    tokens = []
    while engine.has_unfinished():
        tokens += [t for d in engine.step() for t in d.token_ids]
    assert tokens == lora_reference.greedy(ids, "one", MAX_TOKENS)


def test_an_adapter_whose_files_are_replaced_is_loaded_again(lora_reference, tmp_path) -> None:
    """Retraining an adapter under the same name: the next request reads the new files and
    shares no cached prefix with the old version (the same prompt, a full block long)."""
    folder = tmp_path / "support"
    shutil.copytree(lora_reference.paths["one"], folder)
    engine = lora_engine({"support": folder})
    ids = chat(engine, QUESTIONS[2])
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    before = generate(engine, [ids], params, adapter="support")[0][0].token_ids
    assert before == lora_reference.greedy(ids, "one", MAX_TOKENS)
    assert engine.lora.is_current("support") and not engine.lora.is_current("nope")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora_reference.paths["two"] / f, folder / f)
    assert not engine.lora.is_current("support")  # (the stepper then loads it in a worker thread)
    hits = engine.counters["prefix_hit_tokens"]
    after = generate(engine, [ids], params, adapter="support")[0][0].token_ids
    assert after == lora_reference.greedy(ids, "two", MAX_TOKENS) != before
    assert engine.lora.counters["reloads"] == 1 and engine.counters["prefix_hit_tokens"] == hits


def test_an_unknown_adapter_is_refused_and_leaves_nothing_behind(engine: Engine) -> None:
    with pytest.raises(AdapterNotFound, match="no adapter of that name"):
        engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=4), adapter="nope")
    assert not engine.has_unfinished() and engine.scheduler.get("x") is None
    engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=1), adapter="one")  # the id is free again
    while engine.has_unfinished():
        engine.step()


def test_smoothquant_scaled_inputs_get_the_same_update(lora_reference) -> None:
    """After `smooth_` (what --quantization int8 runs first), projections read x / σ; an
    adapter loaded with the model's input scales computes the same logits as before."""
    ckpt = load_checkpoint("smollm2", torch.float32)
    runner = ModelRunner(ckpt, num_blocks=8, block_size=16, dtype=torch.float32, huge_pages=False)
    ids = tuple(range(100, 140))
    plan = StepPlan((ScheduledSeq("x", ids, 0, (0, 1, 2), True, adapter="one"),), (), (), len(ids))
    load = lambda scales=None: load_adapter("one", lora_reference.paths["one"], ckpt.config, torch.float32,  # noqa: E731
                                            scales=scales)
    before = runner.execute(plan, {"one": load()}).logits
    runner.model.smooth_(runner.input_absmax([list(ids)]))
    assert runner.model.smoothing_scales()  # smoothing recorded σ per projection
    after = runner.execute(plan, {"one": load(runner.model.smoothing_scales())}).logits
    unscaled = runner.execute(plan, {"one": load()}).logits
    assert torch.allclose(after, before, atol=2e-3, rtol=1e-3)
    assert not torch.allclose(unscaled, before, atol=2e-3, rtol=1e-3)


def test_a_batch_runs_small_row_ranges_through_the_kernel_and_large_ones_as_gemms() -> None:
    """Adjacent rows of one adapter merge into one range; ranges up to GEMM_MIN_ROWS rows
    go through `layer_ops.lora_rows_`, longer ones through GEMMs; both add x Aᵀ Bᵀ."""
    g = torch.Generator().manual_seed(0)

    weights = {name: (torch.randn(rank, 24, generator=g), torch.randn(40, rank, generator=g))
               for name, rank in (("a", 4), ("b", 6))}
    counts = [1, 1, 3, GEMM_MIN_ROWS + 8, 4, 1]
    x = torch.randn(sum(counts), 24, generator=g)
    end_b = 5 + GEMM_MIN_ROWS + 8
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        a, b = (LoraAdapter(name, Path(name), A.shape[0], {"p": (A.to(dtype), B.to(dtype))},
                            {"p": (A, B.t().contiguous(), torch.tensor([[0, 40]] * A.shape[0]))})
                for name, (A, B) in weights.items())
        batch = LoraBatch.for_rows([None, a, a, b, None, a], counts)
        assert [(s[0].name, s[1], s[2]) for s in batch.segments] == [("a", 1, 5), ("b", 5, end_b),
                                                                     ("a", end_b + 4, end_b + 5)]
        assert [s[0].name for s in batch.gemm_segments] == ["b"] and batch.row_adapters == (a,)
        out = torch.zeros(sum(counts), 40, dtype=dtype)
        batch.apply_("p", x.to(dtype), out)
        want = torch.zeros(sum(counts), 40)
        for who, start, end in batch.segments:
            A, B = weights[who.name]
            want[start:end] = x[start:end] @ A.t() @ B.t()
        assert torch.allclose(out.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert LoraBatch.for_rows([None, None], [3, 1]) is None


# ------------------------------------------------------------------ what is refused


def copy_adapter(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"lora_alpha": "x"}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "finite number"),
    ({"lora_alpha": 10 ** 400}, "finite number"),  # a JSON number no float holds (it was an OverflowError)
    ({"rank_pattern": {"down_proj": 0}}, "rank_pattern"),
    ({"r": 8}, r"rank 4, and the config says r = 8 \(rank_pattern: 2\)"),  # PEFT scales by the config's r
    # weights for modules the config does not target: PEFT would leave them out
    ({"target_modules": ["q_proj", "v_proj"]}, "layer 0 down_proj, but target_modules .* does not name it"),
    ({"target_modules": None}, "down_proj, but target_modules"),  # (PEFT's Llama default: q_proj, v_proj)
    ({"target_modules": r".*\.(q_proj|v_proj)"}, "does not match model.layers.0.mlp.down_proj"),
    ({"target_modules": "("}, "not a regular expression"),
    ({"layers_to_transform": [0]}, "layers_to_transform \\[0\\] leaves layer 1 out"),
    ({"exclude_modules": ["v_proj"]}, r"layer 0 v_proj, but exclude_modules \['v_proj'\] names it"),
    ({"exclude_modules": r".*\.1\.mlp\.down_proj"}, "exclude_modules .* matches model.layers.1.mlp.down_proj"),
    ({"exclude_modules": 3}, "exclude_modules must be"),
])
def test_an_adapter_this_engine_would_not_compute_as_peft_does_is_refused(lora_reference, tmp_path, change,
                                                                         message) -> None:
    folder = copy_adapter(lora_reference.paths["two"], tmp_path / "bad", **change)
    cfg = load_checkpoint("smollm2", torch.float32).config
    with pytest.raises(LoraError, match=message):
        load_adapter("bad", folder, cfg, torch.float32)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["self_attn.q_proj", "v_proj", "mlp.down_proj"],
                                     r".*\.(q_proj|v_proj|down_proj)", "all-linear"])
def test_target_modules_are_matched_as_peft_matches_them(lora_reference, tmp_path, targets) -> None:
    folder = copy_adapter(lora_reference.paths["two"], tmp_path / "ok", target_modules=targets,
                          exclude_modules=["k_proj"])  # excluding a module it has no weights for
    cfg = load_checkpoint("smollm2", torch.float32).config
    assert load_adapter("ok", folder, cfg, torch.float32).rank == 4


def test_an_adapter_is_keyed_by_its_contents_not_its_file_times(lora_reference, tmp_path) -> None:
    """Replicas hold copies of the same files, with other times: they must key cached answers
    alike; another version with the same times and sizes must not."""
    cfg = load_checkpoint("smollm2", torch.float32).config
    first = load_adapter("a", lora_reference.paths["two"], cfg, torch.float32)
    copied = tmp_path / "copy"
    shutil.copytree(lora_reference.paths["two"], copied, copy_function=shutil.copyfile)  # new file times
    again = load_adapter("a", copied, cfg, torch.float32)
    assert again.version != first.version and again.key == first.key
    other = load_adapter("a", lora_reference.paths["one"], cfg, torch.float32)
    assert other.key != first.key


def test_weights_that_do_not_fit_this_model_are_refused(lora_reference, tmp_path) -> None:
    cfg = load_checkpoint("smollm2", torch.float32).config
    folder = copy_adapter(lora_reference.paths["two"], tmp_path / "other-model")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in weights if "q_proj.lora_A" in k)
    save_file({**weights, key: torch.zeros(4, 1024)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="do not fit"):
        load_adapter("x", folder, cfg, torch.float32)
    save_file({**weights, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="not a LoRA A/B weight"):
        load_adapter("x", folder, cfg, torch.float32)
    save_file({**weights, key: torch.full_like(weights[key], float("nan"))}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="not finite"):
        load_adapter("x", folder, cfg, torch.float32)
    b_key = key.replace("lora_A", "lora_B")
    save_file({**weights, key: torch.zeros(0, weights[key].shape[1]), b_key: torch.zeros(weights[b_key].shape[0], 0)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="do not fit"):  # rank 0 (alpha / r divided by zero)
        load_adapter("x", folder, cfg, torch.float32)
    save_file({**weights, key: weights[key].to(torch.int32)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="floating point"):
        load_adapter("x", folder, cfg, torch.float32)
    del weights[key]
    save_file(weights, str(folder / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="without its pair"):
        load_adapter("x", folder, cfg, torch.float32)
    with pytest.raises(LoraError, match="rank 8; this server allows up to 4"):
        load_adapter("one", lora_reference.paths["one"], cfg, torch.float32, max_rank=4)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraError, match="no adapter_model.safetensors"):
        load_adapter("x", folder, cfg, torch.float32)


def test_a_folder_of_adapters_is_searched_by_name(lora_reference, tmp_path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(lora_reference.paths["two"], root / "support-bot")
    (root / "not-an-adapter").mkdir()
    cfg = load_checkpoint("smollm2", torch.float32).config
    manager = LoraManager(LoraConfig(directory=str(root)), cfg, torch.float32)
    assert manager.names() == ["support-bot"]
    assert manager.get("support-bot").rank == 4
    shutil.copytree(lora_reference.paths["one"], root / "added-later")
    assert manager.names() == ["added-later", "support-bot"]
    for name in ("not-an-adapter", "../adapters/support-bot", "..", ""):
        assert manager.folder(name) is None
        with pytest.raises(AdapterNotFound):
            manager.get(name)
    copy_adapter(lora_reference.paths["one"], root / "dora", use_dora=True)  # unservable: not listed
    copy_adapter(lora_reference.paths["one"], root / "huge-alpha", lora_alpha=10 ** 400)
    shutil.copytree(lora_reference.paths["one"], root / "deep")
    (root / "deep" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert manager.names() == ["added-later", "support-bot"]  # (these two made it raise: every listing a 500)
    for name in ("huge-alpha", "deep"):
        with pytest.raises(LoraError):
            manager.get(name)
    small = LoraManager(LoraConfig(directory=str(root), max_rank=4), cfg, torch.float32)
    assert small.names() == ["support-bot"]  # added-later has rank 8: refused, so not listed
    manager.reserve({"support-bot", "SmolLM2-135M-Instruct"})  # the served model's names
    assert manager.names() == ["added-later"] and manager.folder("support-bot") is None
    with pytest.raises(LoraError, match="served model's own names"):
        LoraManager(LoraConfig(modules=(("smollm2", str(root / "added-later")),)), cfg,
                    torch.float32).reserve({"smollm2"})


def test_requests_for_one_adapter_arriving_together_load_it_once(lora_reference, tmp_path, monkeypatch) -> None:
    """Admission loads adapters in worker threads, one per request: eight requests naming
    an adapter not yet loaded read and converted it eight times."""
    import threading

    import gpu.lora

    reads = []
    real = gpu.lora.load_adapter
    monkeypatch.setattr(gpu.lora, "load_adapter", lambda *a, **k: reads.append(1) or real(*a, **k))
    shutil.copytree(lora_reference.paths["one"], tmp_path / "adapters" / "one")
    cfg = load_checkpoint("smollm2", torch.float32).config
    manager = LoraManager(LoraConfig(directory=str(tmp_path / "adapters")), cfg, torch.float32)
    start = threading.Barrier(8)
    got = []

    def ask() -> None:
        start.wait()
        got.append(manager.get("one"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and manager.counters["loads"] == 1 and len({id(a) for a in got}) == 1


def test_a_broken_configured_adapter_fails_the_start(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoraError, match="unreadable"):
        lora_engine({"broken": tmp_path})


def test_lora_and_batch_invariance_are_refused_together(tmp_path) -> None:
    with pytest.raises(ValueError, match="not batch-invariant"):
        EngineConfig(batch_invariant=True, lora=LoraConfig(modules=(("one", str(tmp_path)),)))
    with pytest.raises(ValueError, match="unique"):
        LoraConfig(modules=(("one", "x"), ("one", "y")))
    with pytest.raises(ValueError, match="adapter name"):
        LoraConfig(modules=(("../a", "x"),))


def test_an_unreadable_adapter_file_is_reasoned_without_the_server_s_path(tmp_path) -> None:
    """A client is told `reason`: an OSError's own text names the file."""
    from gpu.lora import read_config

    (tmp_path / "adapter_config.json").mkdir()  # unreadable as a file, even by root
    with pytest.raises(LoraError) as info:
        read_config(tmp_path)
    assert info.value.reason == "unreadable (Is a directory)" and str(tmp_path) in str(info.value)


def test_the_key_an_adapter_loaded_with_is_remembered_after_it_is_evicted(lora_reference, tmp_path) -> None:
    """Files rewritten with the same sizes and times (a reproducible build) keep their key
    until the adapter loads again; then the load's key (of the contents) is the one. It was
    not remembered: once the new version was evicted, admission keyed it by the old
    contents again, and the response cache answered with the old version's answers."""
    root = tmp_path / "adapters"
    shutil.copytree(lora_reference.paths["two"], root / "two")
    shutil.copytree(lora_reference.paths["one"], root / "three")
    cfg = load_checkpoint("smollm2", torch.float32).config
    manager = LoraManager(LoraConfig(directory=str(root), max_loras=1), cfg, torch.float32)
    old = manager.key_of("two")
    weights = root / "two" / "adapter_model.safetensors"
    times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # a weight's lowest bits: the same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=times)
    assert manager.key_of("two") == old  # (the documented window: nothing has read the files yet)
    new = manager.get("two").key
    assert new != old and manager.key_of("two") == new
    manager.get("three")  # evicts "two"
    assert manager.loaded() == ["three"]
    assert manager.key_of("two") == new


def test_the_key_of_an_adapter_comes_from_its_files_without_loading_it(lora_reference, tmp_path) -> None:
    """What admission asks of a request naming an adapter (`key_of`): the key a load would
    give it, read from its files, remembered per file version; nothing is loaded, so the
    LRU keeps the adapters the engine runs (admission loaded each in full, all at once)."""
    root = tmp_path / "adapters"
    shutil.copytree(lora_reference.paths["two"], root / "two")
    copy_adapter(lora_reference.paths["one"], root / "dora", use_dora=True)
    cfg = load_checkpoint("smollm2", torch.float32).config
    manager = LoraManager(LoraConfig(directory=str(root), max_loras=1), cfg, torch.float32)
    key = manager.key_of("two")
    assert manager.loaded() == [] and manager.counters["loads"] == 0
    assert key == load_adapter("two", root / "two", cfg, torch.float32).key
    assert manager.key_of("two") == key and manager.get("two").key == key  # the LRU's, once loaded
    with pytest.raises(AdapterNotFound):
        manager.key_of("three")
    with pytest.raises(LoraError, match="DoRA"):
        manager.key_of("dora")
    with pytest.raises(LoraError, match="max-lora-rank"):
        LoraManager(LoraConfig(directory=str(root), max_rank=2), cfg, torch.float32).key_of("two")
    # new contents under the same name: a new key
    shutil.rmtree(root / "two")
    shutil.copytree(lora_reference.paths["one"], root / "two")
    assert manager.key_of("two") not in (key, None)
