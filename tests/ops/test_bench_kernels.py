"""`python -m ops.bench_kernels --cpu`: both CPU backends timed on the same inputs."""

from __future__ import annotations

import json

import pytest

from ops import bench_kernels


@pytest.mark.slow
def test_cpu_mode_times_both_backends_and_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert bench_kernels.main(["--cpu", "--iters", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    kernels = {(r["kernel"], r["model"], r["dtype"]) for r in rows}
    for model in ("SmolLM2-135M", "Llama-7B-size"):
        for dtype in ("float32", "bfloat16"):
            assert ("paged_decode", model, dtype) in kernels
            assert ("paged_prefill", model, dtype) in kernels
    for r in rows:
        assert r["torch_us"] > 0 and r["native_us"] > 0
        assert r["speedup"] == pytest.approx(r["torch_us"] / r["native_us"])
        assert (r["native_gflops"] is None) == (r["kernel"] == "paged_decode")
        if r["kernel"] == "paged_decode":  # every decode kernel built here, auto's among them
            assert "portable" in r["kernels_us"] and r["native_kernel"] in r["kernels_us"]
            assert all(us > 0 for us in r["kernels_us"].values())
        else:  # every prefill kernel built here; auto's among them unless it took the torch path
            from gpu.attention.cpu_native import prefill_kernels

            assert set(r["kernels_us"]) <= set(prefill_kernels())
            # "avx512", or "avx512/torch >= 32 MFLOP" where bf16 on AMX splits by work
            assert r["native_kernel"].split("/")[0] in (*r["kernels_us"], "none")
            assert all(us > 0 for us in r["kernels_us"].values())
    out = capsys.readouterr().out
    assert "speedup" in out and "CPU decode kernels" in out
    if any(r["kernels_us"] for r in rows if r["kernel"] == "paged_prefill"):
        assert "CPU prefill kernels" in out
