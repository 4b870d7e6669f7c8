"""Model runner: turns a `StepPlan` into tensors, runs the model, returns logits.

The runner owns the model, the KV cache tensors and the attention backend. It
knows nothing about requests beyond what one step feeds; sampling and stop
conditions live in the engine.

Packing of one step (decodes first, as `gpu.attention` requires)::

    plan.seqs  ──▶ input_ids  [d0 d1 | p0 p0 p0 | p1 p1]
                   positions  [17 40 |  0  1  2 | 32 33]   (start_pos + j)
                   slots      block_table[pos // bs] * bs + pos % bs
                   sample_idx [ 0  1 |        4 |     6]   (last token of each sampling seq)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from actors.step_scheduler import ScheduledSeq, StepPlan
from gpu.attention import AttentionBackend, AttentionMetadata, AttentionShape, get_backend
from gpu.loader import Checkpoint
from gpu.lora import LoraAdapter, LoraBatch
from gpu.model import Linear, LlamaModel, allocate_kv_caches
from gpu.quantization import QUANTIZATIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptLogprobs:
    """Logprobs of prompt tokens from one chunk: `logprobs[i]` is that of the prompt token at
    position `start + i + 1` given the tokens before it, `top[i]` the k most likely tokens
    there, (id, logprob) best first, `ranks[i]` the token's rank there (vLLM's: how many
    tokens are at least as likely, itself included; 1 = the most likely). Raw model
    distribution (log_softmax of the logits)."""

    start: int
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    ranks: list[int]


@dataclass(frozen=True)
class RunnerOutput:
    """Logits of the sequences that sample this step, in `seq_ids` order; the prompt
    logprobs of the chunks that asked for them (`ScheduledSeq.logprob_targets`), by sequence."""

    seq_ids: tuple[str, ...]
    logits: torch.Tensor  # (len(seq_ids), vocab) float32
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


PROMPT_LOGIT_ROWS = 128  # rows of logits alive at once for prompt logprobs (128 x vocab floats)


def token_logprobs(hidden: torch.Tensor, targets: Sequence[int], k: int, logits_of) -> tuple[list, list, list]:
    """Logprob of `targets[i]` under row i of `hidden` (logits via `logits_of`), the k most
    likely (id, logprob) per row, and each target's rank (`PromptLogprobs.ranks`); a slice
    of `PROMPT_LOGIT_ROWS` rows at a time, so a long prompt never holds its whole
    (rows, vocab) logits."""
    chosen: list[float] = []
    top: list[list[tuple[int, float]]] = []
    ranks: list[int] = []
    tgt = torch.tensor(list(targets), dtype=torch.int64, device=hidden.device)
    for a in range(0, len(targets), PROMPT_LOGIT_ROWS):
        b = min(a + PROMPT_LOGIT_ROWS, len(targets))
        lp = logits_of(hidden[a:b]).float().log_softmax(dim=-1)
        mine = lp.gather(1, tgt[a:b, None])
        chosen += mine.flatten().tolist()
        ranks += (lp >= mine).sum(dim=1).tolist()
        if k > 0:
            vals, ids = lp.topk(k, dim=-1)
            top += [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
        else:
            top += [[] for _ in range(b - a)]
    return chosen, top, ranks


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.zeros((len(rows), width), dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
    return out


class ModelRunner:
    """Runs one packed step of the model over the paged KV cache."""

    def __init__(
        self,
        ckpt: Checkpoint,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str = "cpu",
        backend: AttentionBackend | None = None,
        huge_pages: bool = True,
        batch_invariant: bool = False,
        quantization: str = "none",
        calibration: Sequence[Sequence[int]] = (),
    ) -> None:
        """`quantization` "int8": the model is built in `dtype`, `calibration` (token ids of
        a few prompts, `gpu.quantization.calibration_prompts`) is prefilled through it once
        to measure every projection's input range, then it is smoothed and quantized
        (`LlamaModel.quantize_int8_`). The calibration's KV entries land in blocks that
        are free to the block manager: later writes overwrite them."""
        self.config = ckpt.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.backend = backend or get_backend(device, batch_invariant=batch_invariant, shape=AttentionShape(
            self.config.head_dim, self.config.num_heads // self.config.num_kv_heads, block_size))
        self.model = LlamaModel.from_checkpoint(ckpt, self.backend, dtype, self.device,
                                                batch_invariant=batch_invariant)
        invariant = getattr(self.backend, "is_batch_invariant", None)
        if batch_invariant and not (invariant is not None and invariant(self.config.head_dim)):
            log.warning("batch invariance covers the projections only: the %s attention backend has no "
                        "batch-invariant path for head size %d here", getattr(self.backend, "name", "?"),
                        self.config.head_dim)
        self.kv_caches = allocate_kv_caches(self.config, num_blocks, block_size, dtype, self.device,
                                            huge_pages=huge_pages)
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
        if quantization == "int8":
            t0 = time.perf_counter()
            self.model.quantize_int8_(self.input_absmax(calibration))
            room = num_blocks * block_size  # (`input_absmax` reads each prompt up to what the cache holds)
            log.info("int8 projections: calibrated on %d prompts (%d tokens) and quantized in %.2f s",
                     len(calibration), sum(min(len(p), room) for p in calibration), time.perf_counter() - t0)

    @torch.inference_mode()
    def input_absmax(self, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Prefill each prompt (alone, from block 0; cut to what the cache holds) and
        return the largest |input| per channel of every projection, by module name, and
        of the LM head (``lm_head``, over every position), float32 on the CPU."""
        if not prompts or not all(prompts):
            raise ValueError("calibration needs at least one prompt, none of them empty")
        stats: dict[str, torch.Tensor] = {}

        def record(name: str, x: torch.Tensor) -> None:
            m = x.reshape(-1, x.shape[-1]).abs().amax(0).float().cpu()
            stats[name] = torch.maximum(stats[name], m) if name in stats else m

        hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
                 for name, m in self.model.named_modules() if isinstance(m, Linear)]
        try:
            room = self.kv_caches[0][0].shape[0] * self.block_size if self.kv_caches else 0
            for i, prompt in enumerate(prompts):
                ids = tuple(prompt[:room])
                table = tuple(range(-(-len(ids) // self.block_size)))
                seq = ScheduledSeq(f"calibration-{i}", ids, 0, table, False)
                inputs, pos, meta, _, _ = self._prepare([seq])
                record("lm_head", self.model(inputs, pos, self.kv_caches, meta))
        finally:
            for h in hooks:
                h.remove()
        return stats

    # ------------------------------------------------------------------ packing
    def _prepare(self, seqs: list[ScheduledSeq]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        sample_ids: list[str] = []
        for s in seqs:
            table = s.block_table
            for j, tok in enumerate(s.token_ids):
                pos = s.start_pos + j
                input_ids.append(tok)
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            if s.sample:
                sample_idx.append(len(input_ids) - 1)
                sample_ids.append(s.request_id)

        decodes = [s for s in seqs if len(s.token_ids) == 1]
        prefills = seqs[len(decodes) :]
        dec_lens = [s.start_pos + 1 for s in decodes]
        pre_q = [len(s.token_ids) for s in prefills]
        pre_ctx = [s.start_pos + len(s.token_ids) for s in prefills]
        qsl = [0]
        for q in pre_q:
            qsl.append(qsl[-1] + q)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decodes=len(decodes),
            decode_block_tables=_pad([list(s.block_table) for s in decodes]).to(dev),
            decode_context_lens=torch.tensor(dec_lens, dtype=torch.int32, device=dev),
            decode_max_context_len=max(dec_lens, default=0),
            num_prefills=len(prefills),
            prefill_query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            prefill_context_lens=torch.tensor(pre_ctx, dtype=torch.int32, device=dev),
            prefill_block_tables=_pad([list(s.block_table) for s in prefills]).to(dev),
            prefill_max_query_len=max(pre_q, default=0),
            prefill_max_context_len=max(pre_ctx, default=0),
            prefill_query_lens_list=pre_q,
            prefill_context_lens_list=pre_ctx,
            decode_context_lens_list=dec_lens,
        )
        ids_t = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids_t, pos_t, meta, sample_idx, sample_ids

    # ------------------------------------------------------------------ running
    @torch.inference_mode()
    def execute(self, plan: StepPlan, adapters: Mapping[str, LoraAdapter] | None = None) -> RunnerOutput:
        """Apply copy-on-write copies, run the plan's tokens, return logits of sampling seqs.

        `adapters`: the loaded LoRA adapter of every `ScheduledSeq.adapter` key in the plan."""
        if plan.copies:
            src = torch.tensor([c[0] for c in plan.copies], dtype=torch.int64, device=self.device)
            dst = torch.tensor([c[1] for c in plan.copies], dtype=torch.int64, device=self.device)
            flat = [t for kv in self.kv_caches for t in kv]
            self.backend.copy_blocks(flat, src, dst)
        # decodes first (the scheduler already orders them so; a 1-token prefill chunk
        # is attention-wise a decode, so order by query length to be safe); within each
        # part by LoRA adapter, so an adapter's rows are one range (`LoraBatch`)
        seqs = sorted(plan.seqs, key=lambda s: (len(s.token_ids) != 1, s.adapter or ""))
        if not seqs:
            return RunnerOutput((), torch.empty((0, self.config.vocab_size)))
        ids, pos, meta, sample_idx, sample_ids = self._prepare(seqs)
        lora = None
        if any(s.adapter for s in seqs):
            missing = {s.adapter for s in seqs if s.adapter} - set(adapters or ())
            if missing:
                raise ValueError(f"the step runs LoRA adapters {sorted(missing)} that were not passed in")
            lora = LoraBatch.for_rows([adapters[s.adapter] if s.adapter else None for s in seqs],
                                      [len(s.token_ids) for s in seqs])
        hidden = self.model(ids, pos, self.kv_caches, meta, lora)  # (T, hidden)
        prompt_lps = self._prompt_logprobs(seqs, hidden)
        if not sample_idx:
            return RunnerOutput((), torch.empty((0, self.config.vocab_size)), prompt_lps)
        idx = torch.tensor(sample_idx, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, idx))  # (S, vocab) float32
        return RunnerOutput(tuple(sample_ids), logits.float().cpu(), prompt_lps)

    def _prompt_logprobs(self, seqs: list[ScheduledSeq], hidden: torch.Tensor) -> dict[str, PromptLogprobs]:
        """Prompt logprobs of the chunks with `logprob_targets` (rows in `_prepare`'s order)."""
        out: dict[str, PromptLogprobs] = {}
        row = 0
        for s in seqs:
            if s.logprob_targets:
                lps, top, ranks = token_logprobs(hidden[row : row + len(s.logprob_targets)], s.logprob_targets,
                                                 s.prompt_logprobs, self.model.compute_logits)
                out[s.request_id] = PromptLogprobs(s.start_pos, lps, top, ranks)
            row += len(s.token_ids)
        return out
