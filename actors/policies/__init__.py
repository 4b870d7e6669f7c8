"""Batching policies: who enters the engine, when, and in which order (pure logic).

    policy = make_policy(PolicyConfig(name="magnus"))

Names: fcfs-static, fcfs-continuous, priority (the runtime's default), time-window,
load-based, adaptive, vtc, magnus, hybrid. See `base` for the interface, `batching`
for the classic policies, `magnus` for length-aware ones, `fairness` for VTC.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.policies.base import (
    BatchPolicy,
    EngineView,
    Job,
    KvReservation,
    PolicyBase,
    StepCostFit,
)
from actors.policies.batching import (
    Adaptive,
    FairVtc,
    FcfsContinuous,
    FcfsStatic,
    LoadBased,
    PriorityAging,
    TimeWindow,
)
from actors.policies.fairness import VirtualTokenCounter
from actors.policies.magnus import Hybrid, Magnus, ServingTimeEstimator

POLICY_NAMES: tuple[str, ...] = (
    "fcfs-static", "fcfs-continuous", "priority", "time-window", "load-based", "adaptive", "vtc",
    "magnus", "hybrid",
)
# the policies that group and reserve KV by predicted length: the server gives them the
# Magnus predictor (MiniLM embeddings, online regression), the rest the cheap running estimate
LENGTH_AWARE_POLICIES: frozenset[str] = frozenset({"magnus", "hybrid"})
# how magnus and hybrid reserve KV blocks for released requests (PolicyConfig.kv_reservation)
KV_RESERVATIONS: tuple[str, ...] = ("auto", "always", "off")


@dataclass(frozen=True)
class PolicyConfig:
    """Which policy and its knobs (only the ones the chosen policy reads matter)."""

    name: str = "priority"
    static_batch_size: int = 8  # fcfs-static
    aging_s: float = 10.0  # priority, hybrid
    window_s: float = 0.5  # time-window
    min_batch: int = 4  # time-window, load-based
    max_batch: int = 32  # time-window
    load_low: int = 4  # load-based
    load_high: int = 32
    target_step_s: float | None = None  # adaptive (None → 3 × the fastest step seen)
    # magnus, hybrid: reserve predicted + max(margin·std, min_margin·predicted): the predictor's
    # uncertainty widens the reservation of requests it is unsure of (std 1 vs 0: 2-4% lower mean
    # response time, 1-20 instead of 21-42 preemptions when the KV cache binds; simulated, docs/scheduling.md)
    kv_margin_std: float = 1.0
    kv_min_margin: float = 0.2
    # reservations may total 1.5× the cache: requests in flight are on average half done, so
    # full-length reservations overstate use; outgrowing it preempts, never fails (measured in docs)
    kv_fraction: float = 1.5
    # a reservation its request outgrows grows to this × the output so far (`KvReservation.regrow`;
    # 0 = never): with under-predictions (a cold predictor) 0.85 instead of 0.95 of
    # fcfs-continuous's mean response time, half the preemptions (simulated, docs/scheduling.md)
    kv_growth: float = 2.0
    # magnus, hybrid: admit without reserving while recomputing a typical waiting request after a
    # preemption costs fewer decode steps than this (launch-bound GPU steps: ~0.1); 0 = always
    # reserve. Not 1: bf16 on AMX measures 0.9-1.5, where reserving won by 0.01-0.03 of the mean
    # response time (simulated) and the decision flapped with the machine's noise (docs/scheduling.md)
    kv_optimistic_below_steps: float = 0.5
    # magnus, hybrid: "auto" reserves unless the measured recompute is cheap (the knob above);
    # "always" reserves whatever the step cost; "off" never reserves (admits like vLLM and keeps
    # the grouping and the HRRN order). Which wins depends on the machine: on an AMX Xeon in
    # bf16, served, reserving gave 0.865 of fcfs-continuous's mean response time at 0.940x its
    # request throughput, never reserving 0.919 at 0.985x (docs/scheduling.md, twenty-third session)
    kv_reservation: str = "auto"

    def __post_init__(self) -> None:
        if self.name not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.name!r}; expected one of {', '.join(POLICY_NAMES)}")
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"unknown kv_reservation {self.kv_reservation!r}; expected one of "
                             f"{', '.join(KV_RESERVATIONS)}")


def make_policy(config: PolicyConfig) -> BatchPolicy:
    c = config
    pred_kv = KvReservation("none" if c.kv_reservation == "off" else "predicted", c.kv_margin_std,
                            c.kv_min_margin, c.kv_fraction, growth=c.kv_growth)
    optimistic_below = 0.0 if c.kv_reservation == "always" else c.kv_optimistic_below_steps
    if c.name == "fcfs-static":
        return FcfsStatic(c.static_batch_size)
    if c.name == "fcfs-continuous":
        return FcfsContinuous()
    if c.name == "priority":
        return PriorityAging(c.aging_s)
    if c.name == "time-window":
        return TimeWindow(c.window_s, c.min_batch, c.max_batch)
    if c.name == "load-based":
        return LoadBased(c.min_batch, c.load_low, c.load_high)
    if c.name == "adaptive":
        return Adaptive(c.target_step_s)
    if c.name == "vtc":
        return FairVtc()
    if c.name == "magnus":
        return Magnus(kv=pred_kv, optimistic_below_steps=optimistic_below)
    return Hybrid(c.aging_s, kv=pred_kv, optimistic_below_steps=optimistic_below)


__all__ = [
    "Adaptive", "BatchPolicy", "EngineView", "FairVtc", "FcfsContinuous", "FcfsStatic", "Hybrid", "Job",
    "KV_RESERVATIONS", "KvReservation", "LENGTH_AWARE_POLICIES", "LoadBased", "Magnus", "POLICY_NAMES", "PolicyBase", "PolicyConfig", "PriorityAging",
    "ServingTimeEstimator", "StepCostFit", "TimeWindow", "VirtualTokenCounter", "make_policy",
]
