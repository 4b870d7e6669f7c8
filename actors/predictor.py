"""Generation-length prediction (pure logic).

`RunningLengthEstimator` is the simple predictor: an exponentially weighted
mean and variance of true output lengths per (tenant, application), falling
back to the tenant, then to a global estimate. Predictions carry an
uncertainty (the running standard deviation) and are clipped to the request's
`max_tokens`. The Magnus predictor (embeddings + regressor) replaces it behind
the same `predict` / `observe` interface.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import logging
import math
import statistics
import time
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np


@dataclass(frozen=True)
class Prediction:
    tokens: float  # expected output length
    std: float  # uncertainty (one standard deviation)
    source: str  # which estimate answered: "tenant/app", "tenant", "global", "prior"


@dataclass
class _Stat:
    n: int = 0
    mean: float = 0.0
    var: float = 0.0

    def add(self, x: float, alpha: float) -> None:
        self.n += 1
        if self.n == 1:
            self.mean, self.var = x, 0.0
            return
        a = max(alpha, 1.0 / self.n)  # plain mean while few samples, EWMA after
        d = x - self.mean
        self.mean += a * d
        self.var = (1 - a) * (self.var + a * d * d)


@dataclass(frozen=True)
class PredictorConfig:
    alpha: float = 0.1  # EWMA weight of a new observation
    min_samples: int = 3  # an estimate answers only after this many observations
    prior_tokens: float = 128.0


MAX_KEYS = 10_000  # per-(tenant, app) and per-user statistics kept at most: the least recently fed go


def _touch(table: dict, key: Any, make: Any) -> Any:
    """`table[key]` (made by `make()` if missing), now the most recently used; beyond
    MAX_KEYS entries the least recently used is dropped (a dict keeps insertion order):
    the tables are keyed by what clients send (app tags, `user`), and must not grow
    without bound."""
    value = table.pop(key, None)
    if value is None:
        value = make()
    table[key] = value
    while len(table) > MAX_KEYS:
        del table[next(iter(table))]
    return value


class RunningLengthEstimator:
    """Per-tenant/app running estimate of output length."""

    def __init__(self, config: PredictorConfig | None = None):
        self.config = config or PredictorConfig()
        self._stats: dict[tuple[str, ...], _Stat] = {}

    def _keys(self, tenant: str, app: str | None) -> list[tuple[tuple[str, ...], str]]:
        keys = []
        if app:
            keys.append(((tenant, app), "tenant/app"))
        keys.append(((tenant,), "tenant"))
        keys.append(((), "global"))
        return keys

    def predict(self, tenant: str, app: str | None, max_tokens: int) -> Prediction:
        for key, source in self._keys(tenant, app):
            st = self._stats.get(key)
            if st is not None and st.n >= self.config.min_samples:
                return Prediction(min(st.mean, max_tokens), math.sqrt(st.var), source)
        prior = min(self.config.prior_tokens, max_tokens)
        return Prediction(prior, prior, "prior")

    def observe(self, tenant: str, app: str | None, true_tokens: int) -> None:
        """Feed back the true output length of a finished request."""
        for key, _ in self._keys(tenant, app):
            _touch(self._stats, key, _Stat).add(float(true_tokens), self.config.alpha)


# ============================================================================
# The Magnus predictor: input length + instruction embedding + user history → ridge
# ============================================================================

@dataclass(frozen=True)
class RequestFeatures:
    """What the length predictor knows about a request before it runs."""

    tenant: str
    app: str | None
    user: str | None
    prompt_tokens: int
    max_tokens: int
    embedding: np.ndarray | None = None  # (384,) unit-norm embedding of the instruction


@dataclass(frozen=True)
class LengthModelConfig:
    ridge_grid: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # embedding penalty, picked by LOO
    head_ridge: float = 1e-3  # penalty of the intercept, length and history features
    emb_scale: float = 4.0  # unit-norm embeddings scaled so their coordinates are not drowned by the penalty
    min_fit_samples: int = 24  # below this the per-application quantiles answer
    # New observations between background refits: `refit_every`, or `refit_fraction` of the
    # samples held when that is more. A refit runs under the compute lock, so it stalls the
    # engine's steps: at the 4096-sample window one took 1.5 s (2 cores), every 16 finished
    # requests, while 16 new samples move a model fitted on 4096 by 0.4%.
    refit_every: int = 16
    refit_fraction: float = 1 / 32
    # A refit picks the embedding penalty by leave-one-out over `ridge_grid` (one LOO solve per
    # penalty) only when the model is new, when the samples have grown by `research_growth`x
    # since the last search, or on every `research_every`-th refit; in between it keeps the
    # last penalty (one solve instead of len(ridge_grid)): 0.09 instead of 0.34 s at 780
    # samples, 0.33 instead of 1.46 s at 4096 (docs/scheduling.md, twenty-second session).
    research_growth: float = 1.5
    research_every: int = 8
    max_samples: int = 4096  # training window (most recent)
    user_history: int = 8  # recent output lengths kept per user
    cold_min_samples: int = 3  # a per-app quantile answers after this many observations
    quantile_window: int = 256
    prior_tokens: float = 128.0
    emb_dim: int = 384
    # A request cut at max_tokens >= this is taken for a runaway (one that would not have
    # stopped: greedy small models repeat themselves until the cap); one cut earlier is
    # censored (it might have stopped soon after): the length model takes it as a lower
    # bound (`LengthPredictor._with_censored`).
    runaway_min_tokens: int = 256
    min_runaway_samples: int = 4  # runaways seen before the runaway model is fitted
    censored_rounds: int = 100  # EM rounds at most that fit the censored requests (`_with_censored`)
    # The point prediction of the mixture: "median" (what minimises the absolute error,
    # and what ±25% rewards) or "mean" (the expected length).
    point: str = "median"

    def __post_init__(self) -> None:
        if self.refit_every < 1 or not 0 <= self.refit_fraction < 1:
            raise ValueError("refit_every must be >= 1 and refit_fraction in [0, 1)")
        if self.research_growth <= 1 or self.research_every < 1:
            raise ValueError("research_growth must be > 1 and research_every >= 1")
        if self.censored_rounds < 0:
            raise ValueError("censored_rounds must be >= 0")
        if self.point not in ("median", "mean"):
            raise ValueError(f"point must be 'median' or 'mean', got {self.point!r}")


class PredictorBlobError(ValueError):
    """Bytes that are not a saved `LengthPredictor` (or one of another feature width)."""


ANDERSON_DEPTH = 5  # EM rounds the censored fit extrapolates from (`LengthPredictor._with_censored`)
STOP, RUNAWAY, CENSORED = 0, 1, 2  # what a finished request teaches (LengthPredictor.observe)
_HEAD = 6  # intercept, log length, its square, app mean, user mean, has-history


def survival_quantiles(lengths: Iterable[float], cut: Iterable[bool],
                       qs: Iterable[float]) -> list[float | None]:
    """Kaplan-Meier quantiles of `lengths`, those flagged in `cut` cut short (right-
    censored: the request ran at least that long): for each q, the least length at which
    the estimated share still running falls to 1 − q or below; None where it never does
    (too many were cut before). Without cuts, the lower empirical quantile. Pure."""
    rows = sorted(zip(lengths, cut, strict=True), key=lambda r: (r[0], r[1]))  # (ends before cuts at a tie)
    at_risk, alive, curve = len(rows), 1.0, []
    i = 0
    while i < len(rows):
        t, ended, gone = rows[i][0], 0, 0
        while i < len(rows) and rows[i][0] == t:
            ended += not rows[i][1]
            gone += 1
            i += 1
        if ended:
            alive *= 1.0 - ended / at_risk
            curve.append((t, alive))
        at_risk -= gone
    return [next((t for t, a in curve if a <= 1.0 - q + 1e-12), None) for q in qs]


def inverse_mills(z: np.ndarray) -> np.ndarray:
    """φ(z) / (1 − Φ(z)) elementwise: the mean of a standard normal above `z` (pure).
    Beyond z = 30 the tail underflows: there it is z + 1/z, its asymptote."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    far = z > 30.0
    near = z[~far]
    tail = 0.5 * _ERFC(near / math.sqrt(2.0))
    out[~far] = np.exp(-0.5 * near * near) / math.sqrt(2.0 * math.pi) / tail
    out[far] = z[far] + 1.0 / z[far]
    return out


_ERFC = np.vectorize(math.erfc, otypes=[np.float64])


def ridge_loo_residuals(x: np.ndarray, y: np.ndarray, pen: np.ndarray,
                        gram: np.ndarray | None = None) -> np.ndarray:
    """Exact leave-one-out residuals e_i / (1 - H_ii) of ridge regression of `y` on `x`
    (n × d) with per-feature penalties `pen`: H = x (xᵀx + diag(pen))⁻¹ xᵀ, which is
    K (K + I)⁻¹ for K = xs xsᵀ, xs = x / √pen.

    Solved in whichever space is smaller: the n×n kernel form costs O(n³) — at the
    4096-sample window 5.4 s per penalty, ~32 s of CPU per refit over the ridge grid,
    taken from the engine every 16 requests — the d×d primal form O(n·d²) (0.1 s);
    `gram` (xᵀx) is shared across the grid's penalties."""
    n, d = x.shape
    if n <= d:
        xs = x / np.sqrt(pen)
        k = xs @ xs.T
        h = k @ np.linalg.inv(k + np.eye(n))
        fitted, h_diag = h @ y, np.diag(h)
    else:
        g = x.T @ x if gram is None else gram
        b = np.linalg.solve(g + np.diag(pen), x.T)  # (d, n)
        fitted, h_diag = x @ (b @ y), np.einsum("ij,ji->i", x, b)
    return (y - fitted) / np.clip(1.0 - h_diag, 1e-6, None)


@dataclass(frozen=True)
class LinearModel:
    """Ridge weights over `features()` predicting log(1 + output tokens); `sigma` is the
    residual std in log space (the uncertainty)."""

    w: np.ndarray  # (F,)
    sigma: float
    n: int
    # the embedding penalty LOO picked from the ridge grid (NaN: not known, e.g. restored from a
    # blob), the samples that search ran on, and the refits since that kept it (`_ridge`)
    penalty: float = math.nan
    searched_on: int = 0
    refits_since_search: int = 0


@dataclass(frozen=True)
class LengthModel:
    """The two halves of the hurdle model: how long a request runs if it stops on its
    own (`length`, fitted on requests that did), and the probability that it never
    does (`runaway`, a ridge linear-probability model on stopped vs runaway requests;
    None until `min_runaway_samples` runaways have been seen)."""

    length: LinearModel
    runaway: LinearModel | None = None


def _rebuild(head: np.ndarray, emb: np.ndarray, c: LengthModelConfig) -> np.ndarray:
    """Feature rows from their head and embedding, as `LengthPredictor.features` built them."""
    e = c.emb_scale * emb.astype(np.float64)
    return np.concatenate([head, e, e * head[:, 1:2]], axis=1)


class LengthPredictor:
    """Magnus-style generation-length predictor (sync core; see `PredictorService`).

    Features: log input length (and its square), the instruction embedding and its
    product with the log input length (so each application gets its own slope),
    and the user's recent output lengths (log mean; the application's while the
    user is new). A hurdle model on them: the length a request runs to if it stops
    on its own (target log(1 + tokens) of requests that ended on EOS/stop — errors
    are relative, as the ±25% metric is — with those cut at a small `max_tokens` as
    lower bounds, `_with_censored`), and the probability `p` that it runs away
    to its cap instead (requests cut at a large `max_tokens`). The prediction is the
    mixture's median (`config.point`; or its mean `p·max_tokens + (1 − p)·length`),
    its std the mixture's. Until `min_fit_samples` requests have stopped on their
    own, per-(tenant, app) quantiles of every finished length answer (median;
    IQR/1.349 as std).

    `observe` records a finished request; `snapshot()` + `train()` (pure, run it in
    a worker thread) + `install()` refit without blocking predictions.
    """

    def __init__(self, config: LengthModelConfig | None = None) -> None:
        self.config = config or LengthModelConfig()
        c = self.config
        self._x: collections.deque[np.ndarray] = collections.deque(maxlen=c.max_samples)
        self._y: collections.deque[float] = collections.deque(maxlen=c.max_samples)
        self._kind: collections.deque[int] = collections.deque(maxlen=c.max_samples)  # STOP/RUNAWAY/CENSORED
        self._lengths: dict[tuple[str, ...], collections.deque[float]] = {}
        # beside each length history, which of its lengths were cut short (censored)
        self._cut: dict[tuple[str, ...], collections.deque[bool]] = {}
        self._users: dict[tuple[str, str], collections.deque[float]] = {}
        self.model: LengthModel | None = None
        self._since_fit = 0

    # ------------------------------------------------------------ features
    def _app_log_mean(self, tenant: str, app: str | None) -> float:
        for key in ((tenant, app or ""), (tenant,), ()):
            d = self._lengths.get(key)
            if d:
                return float(np.mean(np.log1p(d)))
        return float(np.log1p(self.config.prior_tokens))

    def features(self, f: RequestFeatures) -> np.ndarray:
        c = self.config
        lp = np.log1p(f.prompt_tokens) / 5.0  # ~1 for 150-token prompts
        hist = self._users.get((f.tenant, f.user or "")) if f.user else None
        app_mean = self._app_log_mean(f.tenant, f.app) / 5.0
        user_mean = float(np.mean(np.log1p(hist))) / 5.0 if hist else app_mean
        emb = f.embedding if f.embedding is not None else np.zeros(c.emb_dim, dtype=np.float32)
        if emb.shape != (c.emb_dim,):
            raise ValueError(f"embedding must have shape ({c.emb_dim},), got {emb.shape}")
        head = np.array([1.0, lp, lp * lp, app_mean, user_mean, 1.0 if hist else 0.0])
        e = c.emb_scale * emb.astype(np.float64)
        return np.concatenate([head, e, e * lp])

    # ------------------------------------------------------------ predict
    def predict(self, f: RequestFeatures) -> Prediction:
        if self.model is not None:
            x = self.features(f)
            cap = float(max(1, f.max_tokens))
            length = float(np.clip(np.expm1(x @ self.model.length.w), 1.0, cap))
            length_std = length * float(np.expm1(self.model.length.sigma))
            p = 0.0
            if self.model.runaway is not None:
                p = float(np.clip(x @ self.model.runaway.w, 0.0, 1.0))
            mean = p * cap + (1.0 - p) * length
            var = (1.0 - p) * length_std ** 2 + p * (1.0 - p) * (cap - length) ** 2
            tokens = mean if self.config.point == "mean" else self._median(p, length, cap)
            return Prediction(tokens, float(np.sqrt(var)), "model")
        return self.cold_predict(f)

    def _median(self, p: float, length: float, cap: float) -> float:
        """The mixture's median: the cap when a runaway is more likely than not, else the
        (0.5 / (1 − p)) quantile of the stop length (log-normal around `length`)."""
        if p >= 0.5:
            return cap
        q = 0.5 / (1.0 - p)
        z = statistics.NormalDist().inv_cdf(min(q, 1.0 - 1e-9)) if q > 0.5 else 0.0
        return float(min(cap, length * np.exp(z * self.model.length.sigma)))

    def cold_predict(self, f: RequestFeatures) -> Prediction:
        """Per-application quantiles: median, and IQR / 1.349 as std (the fallback). A
        history holding lengths cut short (censored) answers with its Kaplan-Meier
        quantiles, and only when its median is known: an app whose requests were all cut
        at max_tokens 2 predicted 2 ± 0 tokens for a story (an audit); the tenant's, the
        fleet's, or the prior answer then."""
        c = self.config
        for key, source in (((f.tenant, f.app or ""), "app-quantile"), ((f.tenant,), "tenant-quantile"),
                            ((), "global-quantile")):
            d = self._lengths.get(key)
            if d is None or len(d) < c.cold_min_samples:
                continue
            cut = self._cut.get(key)
            if cut is None or len(cut) != len(d) or not any(cut):
                q25, q50, q75 = np.percentile(np.asarray(d), [25, 50, 75])
            else:
                q25, q50, q75 = survival_quantiles(d, cut, (0.25, 0.5, 0.75))
                if q50 is None:  # more than half cut before any median: not known here
                    continue
                q75 = q50 + (q50 - q25) if q75 is None else q75  # (symmetric, where the upper is not known)
            return Prediction(float(min(q50, f.max_tokens)), float((q75 - q25) / 1.349), source)
        prior = min(c.prior_tokens, f.max_tokens)
        return Prediction(prior, prior, "prior")

    # ------------------------------------------------------------ learn
    def observe(self, f: RequestFeatures, true_tokens: int, finish_reason: str = "stop", *,
                counts: bool = True) -> None:
        """A request finished with `true_tokens` output tokens. `counts`: it counts toward
        the next refit (`needs_refit`); another replica's (`PredictorService.share`) does
        not, so that each replica refits at the pace of its own traffic, on everyone's.

        `finish_reason` "stop" (EOS or a stop sequence) teaches the length model;
        "length" (cut at `f.max_tokens`) teaches the runaway model when the cap was at
        least `runaway_min_tokens`, and is censored otherwise, as is any other reason
        ("capped": cut at a max_tokens the quota lowered). Every finished length
        feeds the application and user histories (the service the request took). The
        length model learns from a censored one that it ran at least that long
        (`_with_censored`); it counts toward the next refit only when that says something
        (`_tells`: 240 requests cut at max_tokens 2 ran 4 refits, 3.3 s of the engine's
        thread, each fitting the same model and saving its 3.7 MB again — an audit).
        """
        c = self.config
        x = self.features(f)  # the history *before* this request: what prediction saw
        if finish_reason == "stop":
            kind = STOP
        elif finish_reason == "length" and f.max_tokens >= c.runaway_min_tokens:
            kind = RUNAWAY
        else:
            kind = CENSORED
        self._x.append(x)
        self._y.append(float(np.log1p(max(0, true_tokens))))
        self._kind.append(kind)
        for key in ((f.tenant, f.app or ""), (f.tenant,), ()):
            d = _touch(self._lengths, key, lambda: collections.deque(maxlen=c.quantile_window))
            cut = _touch(self._cut, key, lambda: collections.deque(maxlen=c.quantile_window))
            if len(cut) != len(d):  # (a history restored from a blob: its lengths read as uncut)
                cut.clear()
                cut.extend([False] * len(d))
            d.append(float(true_tokens))
            cut.append(kind == CENSORED)
        if f.user:
            _touch(self._users, (f.tenant, f.user), lambda: collections.deque(maxlen=c.user_history)).append(
                float(true_tokens))
        self._since_fit += counts and (kind != CENSORED or self._tells(x, true_tokens))

    def _tells(self, x: np.ndarray, cut_at: int) -> bool:
        """Does a request of features `x` cut at `cut_at` tokens tell the length model
        anything: was it cut no more than a standard deviation short of the model's
        prediction (`_with_censored` then takes it longer)? One cut far below (max_tokens
        2) moves nothing: it does not bring the next refit nearer."""
        m = self.model
        return m is not None and float(np.log1p(cut_at)) >= float(x @ m.length.w) - m.length.sigma

    @property
    def num_samples(self) -> int:
        return len(self._y)

    @property
    def num_stopped(self) -> int:
        """Samples of requests that stopped on their own: what the length model needs."""
        return sum(1 for k in self._kind if k == STOP)

    @property
    def num_runaways(self) -> int:
        """Samples of requests cut at a large max_tokens: what the runaway model learns from."""
        return sum(1 for k in self._kind if k == RUNAWAY)

    def summary(self) -> dict:
        """What the predictor has learned, for operators (`lmgate predictor show`,
        `GET /admin/predictor`): sample counts by kind, whether the regressor is fitted
        (and its LOO log-space error), and how many requests each (tenant, app) history holds."""
        m = self.model
        apps = {"/".join(k): len(d) for k, d in sorted(self._lengths.items()) if len(k) == 2}
        return {
            "samples": self.num_samples,
            "stopped": self.num_stopped,
            "runaways": self.num_runaways,
            "censored": self.num_samples - self.num_stopped - self.num_runaways,
            "fitted": m is not None,
            "answers_from": "model" if m is not None else "quantiles",
            "length_sigma": round(m.length.sigma, 4) if m is not None else None,
            "runaway_model": m is not None and m.runaway is not None,
            "fitted_on": m.length.n if m is not None else 0,
            "apps": apps,
            "users": len(self._users),
        }

    def needs_refit(self) -> bool:
        c = self.config
        if self.num_stopped < c.min_fit_samples:
            return False
        return self.model is None or self._since_fit >= max(c.refit_every, math.ceil(c.refit_fraction * self.num_samples))

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training data as arrays: features, log(1 + tokens), kind (copies: safe to hand
        to another thread)."""
        self._since_fit = 0
        return np.stack(list(self._x)), np.asarray(self._y), np.asarray(self._kind, dtype=np.int8)

    def train(self, data: tuple[np.ndarray, np.ndarray, np.ndarray],
              previous: LengthModel | None = None) -> LengthModel:
        """Pure: the length model on the requests that stopped; the runaway model on
        stopped (0) against runaway (1) requests once enough runaways were seen.

        With `previous` (the model being replaced) each half may keep the embedding penalty
        that model's search picked instead of searching the grid again (`_ridge`); without
        it every penalty of the grid is tried."""
        x, y, kind = data
        stop = kind == STOP
        xs, ys = x[stop], y[stop]
        gram = xs.T @ xs if xs.shape[0] > xs.shape[1] else None  # (shared with the censored refit)
        length = self._ridge(xs, ys, previous.length if previous else None, gram)
        cens = kind == CENSORED
        length = self._with_censored(xs, ys, x[cens], y[cens], length, gram)
        runaway = None
        n_run = int(np.sum(kind == RUNAWAY))
        if n_run >= self.config.min_runaway_samples and stop.any():
            labelled = kind != CENSORED
            runaway = self._ridge(x[labelled], (kind[labelled] == RUNAWAY).astype(np.float64),
                                  previous.runaway if previous else None)
        return LengthModel(length, runaway)

    def _with_censored(self, xs: np.ndarray, ys: np.ndarray, xc: np.ndarray, cut: np.ndarray,
                       length: LinearModel, gram: np.ndarray | None = None) -> LinearModel:
        """`length` (fitted on the stopped requests `xs`, `ys`) refitted with the censored
        ones too (`xc`, cut at log(1 + tokens) `cut`): a request cut at `t` tokens ran at
        least `t`, so its log length is taken at its expectation above log(1 + t) under the
        model (a normal of the model's `sigma` around its prediction) and the weights
        refitted with it, until they settle (EM for a censored normal regression, Tobit's,
        with the same ridge penalty and `sigma` held). Fitted on stopped requests only, an
        app whose clients cap max_tokens below its answers was never learned: only its
        answers that fit under the cap stopped (an audit: predicted ~40 tokens against a
        true mean of 123, for as long as the clients capped at 100). A request cut more
        than three standard deviations short of the stopped requests' model (an app's
        max_tokens-2 probes) would be taken at that model's own prediction: left out, it
        costs nothing. `gram`: xsᵀxs when the caller has it. `sigma` stays the stopped
        requests' leave-one-out error: refitted with the rest (Tobit's own, one spread for
        every app), the held-out error on the workload fixture was worse (docs/scheduling.md).
        """
        rounds = self.config.censored_rounds
        if not len(xc) or not rounds or not math.isfinite(length.penalty) or not 0 < length.sigma < math.inf:
            return length
        w, sigma = length.w, length.sigma
        near = cut >= xc @ w - 3.0 * sigma
        xc, cut = xc[near], cut[near]
        if not len(xc):
            return length
        pen = np.full(xs.shape[1], length.penalty)
        pen[:_HEAD] = self.config.head_ridge
        # one inverse, so that each round is O(n·d): 0.1-0.2 s at the 4096-sample window
        solve = np.linalg.inv((xs.T @ xs if gram is None else gram) + xc.T @ xc + np.diag(pen))
        stopped = xs.T @ ys
        images: list[np.ndarray] = []  # the last EM images and their steps, for Anderson's extrapolation
        steps: list[np.ndarray] = []
        best, best_moved, last_moved = w, math.inf, math.inf
        for _ in range(rounds):
            mu = xc @ w
            above = mu + sigma * inverse_mills((cut - mu) / sigma)  # E[log length | above the cut]
            image = solve @ (stopped + xc.T @ above)  # one EM round from w
            step = image - w
            moved = float(np.max(np.abs(xc @ step)))
            if moved < best_moved:  # (the EM image nearest its own fixed point, should the rounds run out)
                best, best_moved = image, moved
            if moved < 1e-4:  # (in log length: 0.01% of a prediction)
                break
            # Anderson acceleration (depth 5): plain EM crawls when many are cut (50 rounds
            # still 7% from the optimum with every request cut at 64); extrapolated from the
            # last rounds it is there in ~15. Safeguarded: a round that moved more than the
            # one before (the extrapolation went astray) restarts from plain EM (a review
            # saw unguarded iterates swing at the round limit, 227% off)
            if moved > last_moved:
                images.clear()
                steps.clear()
            last_moved = moved
            images.append(image)
            steps.append(step)
            if len(steps) > ANDERSON_DEPTH + 1:
                del images[0], steps[0]
            w = image
            if len(steps) > 1:
                d_step = np.stack([b - a for a, b in itertools.pairwise(steps)], axis=1)
                d_image = np.stack([b - a for a, b in itertools.pairwise(images)], axis=1)
                extrapolated = image - d_image @ np.linalg.lstsq(d_step, step, rcond=None)[0]
                if np.all(np.isfinite(extrapolated)):
                    w = extrapolated
        return dataclasses.replace(length, w=best, n=len(xs) + len(xc))  # (`fitted_on`: the cut rows too)

    def _searches(self, n: int, previous: LinearModel | None) -> bool:
        """Does a refit on `n` samples search the ridge grid, or keep `previous`'s penalty?"""
        c = self.config
        # a NaN penalty (restored from a blob) is in no grid: it searches
        return (previous is None or previous.penalty not in c.ridge_grid
                or n >= c.research_growth * previous.searched_on or n * c.research_growth <= previous.searched_on
                or previous.refits_since_search + 1 >= c.research_every)

    def _ridge(self, x: np.ndarray, y: np.ndarray, previous: LinearModel | None = None,
               gram: np.ndarray | None = None) -> LinearModel:
        """Ridge regression, its strength chosen by leave-one-out error.

        The first `_HEAD` features (intercept, input length, application and user
        means) get a tiny penalty; the embedding features get `lam`, picked from
        `config.ridge_grid` by exact LOO residuals (`ridge_loo_residuals`) — or, when
        `previous` picked one recently (`_searches`), that one: the weights are fitted on
        all of `x` either way, only the choice among the grid is kept.
        `sigma` is the LOO residual std: an honest
        uncertainty, not the (optimistic) training residual. `gram`: xᵀx, when the caller
        has it (used only when n > d, where the LOO solves are in the primal space).
        """
        n, d = x.shape
        search = self._searches(n, previous)
        best = None
        if gram is None and n > d:
            gram = x.T @ x
        for lam in self.config.ridge_grid if search else (previous.penalty,):
            pen = np.full(d, lam)
            pen[:_HEAD] = self.config.head_ridge
            loo = ridge_loo_residuals(x, y, pen, gram)
            score = float(np.mean(np.abs(loo)))
            if best is None or score < best[0]:
                best = (score, lam, pen, loo)
        _, lam, pen, loo = best
        w = np.linalg.solve((x.T @ x if gram is None else gram) + np.diag(pen), x.T @ y)
        sigma = float(np.sqrt(np.mean(loo ** 2)))
        if search:
            return LinearModel(w, sigma, n, float(lam), n, 0)
        return LinearModel(w, sigma, n, float(lam), previous.searched_on, previous.refits_since_search + 1)

    def install(self, model: LengthModel) -> None:
        self.model = model

    def train_offline(self, finished: Iterable[tuple[RequestFeatures, int, str]]) -> None:
        """Learn from a log of finished requests `(features, true tokens, finish reason)`, in
        order, as serving would have: each is observed with the histories its predecessors
        left, the regressor refits every `refit_every`, and once more at the end."""
        for f, tokens, reason in finished:
            self.observe(f, tokens, reason)
            if self.needs_refit():
                self.fit()
        if self.num_stopped >= self.config.min_fit_samples:
            self.fit()

    def fit(self) -> LengthModel:
        """Synchronous refit that searches the whole ridge grid (tests, offline evaluation)."""
        m = self.train(self.snapshot())
        self.install(m)
        return m

    # ------------------------------------------------------------ persistence
    def state(self) -> dict:
        """A consistent copy of what `to_bytes` saves, cheap to take (lists of references:
        the sample rows are never mutated), so `pack` can run in another thread while
        `observe` goes on."""
        return {
            "x": list(self._x), "y": list(self._y), "kind": list(self._kind), "model": self.model,
            "lengths": {k: list(d) for k, d in self._lengths.items()},
            "cut": {k: list(cut) for k, cut in self._cut.items() if any(cut) and len(cut) == len(self._lengths.get(k, ()))},
            "users": {k: list(d) for k, d in self._users.items()},
        }

    def pack(self, state: dict) -> bytes:
        """`state()` as bytes (pure: safe in a worker thread).

        Uncompressed .npz: the samples are float noise to zlib (it saved ~20% and took
        0.45 s for 1000 samples, 1.8 s for 4096, on the event loop after every refit). The
        rows are stored as their head features (float64) and the instruction embedding
        (float32, as MiniLM gives it) — `e·log length` is recomputed on load, bit for bit —
        a quarter of the full rows' bytes; rows that do not rebuild exactly (an embedding
        given in float64) are stored whole instead.
        """
        c = self.config
        arrays: dict[str, np.ndarray] = {}
        if state["y"]:
            x = np.stack(state["x"])
            head = x[:, :_HEAD]
            emb = (x[:, _HEAD:_HEAD + c.emb_dim] / c.emb_scale).astype(np.float32)
            if np.array_equal(_rebuild(head, emb, c), x):
                arrays.update(head=head, emb=emb)
            else:
                arrays["x"] = x
        else:
            arrays.update(head=np.zeros((0, _HEAD)), emb=np.zeros((0, c.emb_dim), dtype=np.float32))
        m = state["model"]
        keys, users = list(state["lengths"]), list(state["users"])
        meta = {
            "lengths_keys": ["\x1f".join(k) if k else "\x1e" for k in keys],
            "users_keys": ["\x1f".join(k) for k in users],
        }
        arrays.update({
            "y": np.asarray(state["y"], dtype=np.float64), "kind": np.asarray(state["kind"], dtype=np.int8),
            "w": m.length.w if m is not None else np.zeros(0),
            "model": np.array([m.length.sigma, m.length.n] if m is not None else []),
            "wr": m.runaway.w if m is not None and m.runaway is not None else np.zeros(0),
            "runaway": np.array([m.runaway.sigma, m.runaway.n] if m is not None and m.runaway is not None else []),
            "meta": np.frombuffer(repr(meta).encode(), dtype=np.uint8),
        })
        for i, k in enumerate(keys):
            arrays[f"l{i}"] = np.asarray(state["lengths"][k], dtype=np.float64)
            if k in state.get("cut", {}):  # (none: no length of it was cut)
                arrays[f"c{i}"] = np.asarray(state["cut"][k], dtype=np.int8)
        for i, k in enumerate(users):
            arrays[f"u{i}"] = np.asarray(state["users"][k], dtype=np.float64)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def to_bytes(self) -> bytes:
        """Everything needed to resume: samples, per-app lengths, user histories, weights."""
        return self.pack(self.state())

    @classmethod
    def from_bytes(cls, blob: bytes, config: LengthModelConfig | None = None) -> LengthPredictor:
        """The predictor `to_bytes` wrote (or an earlier version's blob). Raises
        `PredictorBlobError`, and nothing else, for any other bytes: not a blob at all, one
        whose feature width does not match `config`'s embedding size (a predictor trained
        with another embedder), one holding more than a predictor of `config` keeps (refused
        before it is decompressed: `_BlobMembers`), or one holding values no predictor
        writes (NaN or infinity, negative lengths, unknown kinds: `_read_samples`)."""
        if not blob.startswith(b"PK\x03\x04"):  # what np.savez writes: a zip archive
            raise PredictorBlobError("not a length-predictor blob (not an .npz archive)")
        try:
            return cls._from_bytes(blob, config)
        except PredictorBlobError:
            raise
        except Exception as e:  # the bytes come from outside (an upload, a file, Redis): whatever
            # fails to decode them (zlib.error, NotImplementedError for a zip method, ...) is a bad blob
            raise PredictorBlobError(f"not a length-predictor blob ({type(e).__name__}: {e})") from e

    @classmethod
    def _from_bytes(cls, blob: bytes, config: LengthModelConfig | None) -> LengthPredictor:
        p = cls(config)
        c = p.config
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            members = _BlobMembers(zf, c)
            for name in ("y", "w", "meta"):
                if name not in members:
                    raise PredictorBlobError(f"not a length-predictor blob (no {name!r} array)")
            lengths_keys, users_keys = _decode_meta(members.read("meta"))
            x, y, kind = _read_samples(members, c)
            lengths = _read_histories(members, "l", lengths_keys)
            cuts = _read_cuts(members, lengths)
            users = _read_histories(members, "u", users_keys)
            model = _read_model(members, c)
        p._x.extend(x)
        p._y.extend(y.tolist())
        p._kind.extend(kind.tolist())
        for k, d, cut in zip(lengths_keys, lengths, cuts, strict=True):
            key = () if k == "\x1e" else tuple(k.split("\x1f"))
            p._lengths[key] = collections.deque(d, maxlen=c.quantile_window)
            if cut is not None:
                p._cut[key] = collections.deque(cut, maxlen=c.quantile_window)
        for k, d in zip(users_keys, users, strict=True):
            p._users[tuple(k.split("\x1f"))] = collections.deque(d, maxlen=c.user_history)
        p.model = model
        return p


# ============================================================================
# Reading a blob: untrusted bytes (an upload, a seed file, what Redis holds)
# ============================================================================

_NPY_HEADER_BYTES = 10_000  # the longest .npy header read (numpy's own default max_header_size)
_ITEM_BYTES = 8  # the widest value a predictor writes (float64)
_KEY_REPR_BYTES = 1024  # meta: bytes of repr per history key, on average, at most (a key is a tenant id
# of <= 64 characters and an app tag of <= 128 or a user of <= 256: routes_openai's limits)


def _most_values(name: str, c: LengthModelConfig) -> int:
    """The most values a predictor of config `c` writes into the blob's array `name`.

    The window of `max_samples` feature rows (n × (6 + 2·emb_dim)) is the largest: 25 MB of
    float64 at 4096 × 774; the histories are at most MAX_KEYS arrays each, of
    `quantile_window` (per app) and `user_history` (per user) lengths; `meta` is the repr of
    their keys. Every array a predictor writes is float64 or narrower, so reading a blob
    inflates ~70 MB at most (x, or head + emb, and every history full), whatever its size
    on the wire."""
    rows, width = c.max_samples, _HEAD + 2 * c.emb_dim
    most = {"x": rows * width, "head": rows * _HEAD, "emb": rows * c.emb_dim, "y": rows, "kind": rows,
            "w": width, "wr": width, "model": 2, "runaway": 2, "meta": 2 * MAX_KEYS * _KEY_REPR_BYTES}
    if name in most:
        return most[name]
    return {"l": c.quantile_window, "c": c.quantile_window, "u": c.user_history}[name[0]]  # f"l{i}", ...: i < MAX_KEYS


class _BlobMembers:
    """The arrays of an .npz blob, each read once, and checked before it is decompressed.

    An .npz is a zip of .npy files, and zip deflates ~1000:1 on zeros: a 1 MB upload held a
    1 GB `y`, and `np.load` inflated it (twice) before any shape was looked at. `read`
    refuses a member whose zip entry declares more bytes, or whose .npy header declares more
    values, than `_most_values` allows (it never reads past what the zip entry declares, and
    allocates only what the header declares), and one that is not real numbers, all finite.
    """

    def __init__(self, zf: zipfile.ZipFile, config: LengthModelConfig) -> None:
        self._zf = zf
        self._config = config
        self._infos = {info.filename.removesuffix(".npy"): info for info in zf.infolist()
                       if info.filename.endswith(".npy")}

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def read(self, name: str) -> np.ndarray:
        """Member `name` (without ".npy") as a read-only array."""
        info = self._infos.get(name)
        if info is None:
            raise PredictorBlobError(f"not a length-predictor blob (no {name!r} array)")
        most = _most_values(name, self._config)
        limit = _NPY_HEADER_BYTES + _ITEM_BYTES * most
        if info.file_size > limit:
            raise PredictorBlobError(f"the blob's {name!r} array is {info.file_size} bytes uncompressed, more than "
                                     f"a predictor writes there ({limit} at most)")
        with self._zf.open(info) as f:
            shape, fortran, dtype = _npy_header(f, name)
            count = math.prod(shape)
            if min(shape, default=0) < 0:
                raise PredictorBlobError(f"the blob's {name!r} array has shape {shape}")
            if count > most:
                raise PredictorBlobError(f"the blob's {name!r} array has shape {shape}, more than the {most} "
                                         f"values a predictor writes there")
            if dtype.kind not in "biuf" or dtype.itemsize > _ITEM_BYTES:
                raise PredictorBlobError(f"the blob's {name!r} array holds {dtype} values, not real numbers")
            data = f.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise PredictorBlobError(f"the blob's {name!r} array is truncated")
        a = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        if dtype.kind == "f" and not np.isfinite(a).all():
            raise PredictorBlobError(f"the blob's {name!r} array holds NaN or infinity")
        return a


def _npy_header(f, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) from the header of a .npy stream, which is left at the data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            return fmt.read_array_header_1_0(f, max_header_size=_NPY_HEADER_BYTES)
        if version == (2, 0):
            return fmt.read_array_header_2_0(f, max_header_size=_NPY_HEADER_BYTES)
    except ValueError as e:
        raise PredictorBlobError(f"the blob's {name!r} member is not a NumPy array ({e})") from e
    raise PredictorBlobError(f"the blob's {name!r} member is a .npy of version {version}, not 1.0 or 2.0")


def _decode_meta(meta: np.ndarray) -> tuple[list[str], list[str]]:
    """The keys the blob's histories are filed under, (tenant, app) ones then (tenant, user)
    ones (joined by "\\x1f"; "\\x1e" is the global key), from its `meta` array: the UTF-8
    repr of a dict of two lists of strings, at most MAX_KEYS each (`pack`)."""
    import ast

    if meta.dtype != np.uint8 or meta.ndim != 1:
        raise PredictorBlobError(f"the blob's 'meta' array is not text (a {meta.dtype} array of shape {meta.shape})")
    try:
        value = ast.literal_eval(meta.tobytes().decode())
    except (ValueError, SyntaxError, TypeError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise PredictorBlobError(f"the blob's 'meta' array is not a Python literal ({type(e).__name__})") from e
    if not isinstance(value, dict):
        raise PredictorBlobError(f"the blob's 'meta' is a {type(value).__name__}, not a dict")
    keys = []
    for field in ("lengths_keys", "users_keys"):
        names = value.get(field)
        if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
            raise PredictorBlobError(f"the blob's meta[{field!r}] is not a list of strings")
        if len(names) > MAX_KEYS:
            raise PredictorBlobError(f"the blob's meta[{field!r}] has {len(names)} keys, more than the "
                                     f"{MAX_KEYS} a predictor keeps")
        keys.append(names)
    return keys[0], keys[1]


def _read_samples(members: _BlobMembers, c: LengthModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blob's training window: feature rows (n, 6 + 2·emb_dim) float64, targets
    log(1 + tokens) (n,) >= 0, and kinds (n,) int8 in STOP/RUNAWAY/CENSORED (a blob without
    kinds is from before the runaway model: all stopped). Rows are stored whole (`x`: blobs
    before the eighteenth session, or float64 embeddings) or as head + embedding."""
    width = _HEAD + 2 * c.emb_dim
    y = members.read("y")
    if y.ndim != 1 or (y < 0).any():
        raise PredictorBlobError(f"the blob's 'y' array must hold log lengths (>= 0, one per sample), has shape "
                                 f"{y.shape} and minimum {y.min(initial=0)}")
    n = len(y)
    if "x" in members:
        x = members.read("x").astype(np.float64)
    elif "head" in members and "emb" in members:
        head, emb = members.read("head"), members.read("emb")
        if emb.ndim != 2 or emb.shape[1] != c.emb_dim or head.shape != (len(emb), _HEAD):
            raise PredictorBlobError(f"the blob's embeddings have shape {emb.shape} and its feature heads "
                                     f"{head.shape}; this predictor uses embedding size {c.emb_dim} and heads of "
                                     f"{_HEAD} per embedding")
        x = _rebuild(head, emb, c)
    else:
        raise PredictorBlobError("not a length-predictor blob (no 'x' array)")
    if x.shape[:1] != (n,):
        raise PredictorBlobError(f"the blob holds feature rows of shape {x.shape} for {n} samples")
    if n and (x.ndim != 2 or x.shape[1] != width):
        raise PredictorBlobError(f"the blob's samples have {x.shape[-1]} features, this predictor "
                                 f"uses {width} (embedding size {c.emb_dim})")
    kind = members.read("kind") if "kind" in members else np.full(n, STOP, dtype=np.int8)
    if kind.shape != (n,) or not np.isin(kind, (STOP, RUNAWAY, CENSORED)).all():
        raise PredictorBlobError(f"the blob's 'kind' array must hold one of {STOP}, {RUNAWAY}, {CENSORED} "
                                 f"per sample (has shape {kind.shape})")
    return x, y.astype(np.float64), kind.astype(np.int8)


def _read_histories(members: _BlobMembers, prefix: str, keys: list[str]) -> list[list[float]]:
    """The finished lengths (>= 0) filed under each of `keys`: arrays f"{prefix}{i}"."""
    histories = []
    for i in range(len(keys)):
        name = f"{prefix}{i}"
        d = members.read(name)
        if d.ndim != 1 or (d < 0).any():
            raise PredictorBlobError(f"the blob's {name!r} array must hold output lengths (>= 0), has shape "
                                     f"{d.shape}")
        histories.append(d.astype(np.float64).tolist())
    return histories


def _read_cuts(members: _BlobMembers, lengths: list[list[float]]) -> list[list[bool] | None]:
    """Which lengths of each history were cut short: arrays f"c{i}" of 0/1 beside f"l{i}"
    (None where absent: none was, or a blob from before they were kept)."""
    cuts = []
    for i, d in enumerate(lengths):
        name = f"c{i}"
        if name not in members:
            cuts.append(None)
            continue
        a = members.read(name)
        if a.shape != (len(d),) or not np.isin(a, (0, 1)).all():
            raise PredictorBlobError(f"the blob's {name!r} array must hold a 0 or 1 for each of the {len(d)} "
                                     f"lengths of 'l{i}', has shape {a.shape}")
        cuts.append([bool(v) for v in a])
    return cuts


def _read_model(members: _BlobMembers, c: LengthModelConfig) -> LengthModel | None:
    """The fitted hurdle model (None: none was fitted): `w` + `model` (σ, n) for the length
    half, `wr` + `runaway` for the runaway half (none, or empty: not fitted yet)."""
    length = _read_linear(members, "w", "model", c)
    if length is None:
        return None
    runaway = _read_linear(members, "wr", "runaway", c) if "wr" in members else None
    return LengthModel(length, runaway)


def _read_linear(members: _BlobMembers, weights: str, stats: str, c: LengthModelConfig) -> LinearModel | None:
    """A `LinearModel` from its weights (one per feature; empty: not fitted) and its (σ, n):
    σ a residual std (>= 0), n the whole number of samples it was fitted on (<= max_samples)."""
    width = _HEAD + 2 * c.emb_dim
    w = members.read(weights)
    if not w.size:
        return None
    if w.shape != (width,):
        raise PredictorBlobError(f"the blob's weights have shape {w.shape}, this predictor uses {width} features "
                                 f"(embedding size {c.emb_dim})")
    s = members.read(stats)
    if s.shape != (2,):
        raise PredictorBlobError(f"the blob's {stats!r} array must hold (sigma, n), has shape {s.shape}")
    sigma, n = float(s[0]), float(s[1])
    if sigma < 0 or not (0 <= n <= c.max_samples and n == int(n)):
        raise PredictorBlobError(f"the blob's {stats!r} array holds sigma {sigma} and n {n}: not a residual std "
                                 f"(>= 0) and a sample count (0 to {c.max_samples})")
    return LinearModel(w.astype(np.float64), sigma, int(n))


# ============================================================================
# Async shell: embeddings in a worker thread, background refits, Redis persistence
# ============================================================================


def instruction_of(call) -> str:
    """System prompt + first user turn of a chat call (or the prompt text): what is embedded."""
    if call.messages:
        sys_msgs = [m.content for m in call.messages if m.role == "system"][:1]
        user_msgs = [m.content for m in call.messages if m.role == "user"][:1]
        return "\n".join(sys_msgs + user_msgs)
    return call.prompt or ""


SHARE_KEY = "predictor:observations"  # a Redis stream: what each replica's predictor observed
SHARE_EVERY_S = 1.0
# entries the stream keeps (about): each holds a replica's second of observations, and the
# readers take all that is new every second, so it is a few seconds' exchange for fleets of
# up to ~100 replicas (20 MB at 50 requests/s, 1.6 KB each; a lone replica writes it unread)
SHARE_MAX_ENTRIES = 256
SHARE_MAX_BATCH = 512  # observations per entry; a replica's outbox holds at most 4 entries' worth
SHARE_READ_ENTRIES = 16  # entries one read takes (a reader reads on until it has caught up)


class SharedObservation(msgspec.Struct, array_like=True):
    """One finished request as a replica's predictor learned it (`PredictorService.observe`),
    for the other replicas of the Redis (`PredictorService.share`). The embedding is the
    instruction's, float32 bytes (1.5 KB for MiniLM); the histories it reads are recomputed
    by whoever applies it."""

    tenant: str
    app: str | None
    user: str | None
    prompt_tokens: int
    max_tokens: int
    embedding: bytes | None
    tokens: int
    finish_reason: str

    @classmethod
    def of(cls, f: RequestFeatures, tokens: int, finish_reason: str) -> SharedObservation:
        emb = None if f.embedding is None else np.asarray(f.embedding, dtype=np.float32).tobytes()
        return cls(f.tenant, f.app, f.user, int(f.prompt_tokens), int(f.max_tokens), emb, int(tokens), finish_reason)

    def features(self, emb_dim: int) -> RequestFeatures | None:
        """The features, or None if the embedding is not `emb_dim` finite float32s (a
        replica of another embedding model, or bytes no replica writes: not ours to learn;
        a NaN would poison every later fit)."""
        emb = None
        if self.embedding is not None:
            if len(self.embedding) != 4 * emb_dim:
                return None
            emb = np.frombuffer(self.embedding, dtype=np.float32)
            if not np.isfinite(emb).all():
                return None
        return RequestFeatures(self.tenant, self.app, self.user, self.prompt_tokens, self.max_tokens, emb)


_SHARED_BATCH = msgspec.msgpack.Decoder(list[SharedObservation])


class PredictorService:
    """The Magnus predictor inside a trio process.

    `predict(st)` embeds the instruction in a worker thread and predicts;
    `observe(st, true_tokens)` learns and, every `refit_every` observations,
    starts a refit in a worker thread (`trio.to_thread`) — predictions keep
    using the previous model meanwhile — then saves the predictor to Redis
    (`RedisStore`, key `<prefix>predictor:length`). `load()` restores it after a
    restart. Without an embedder the embedding features are zero (input length
    and user history still count); without a store nothing is persisted.

    Replicas of one Redis learn from each other (`share`): each publishes what it
    observes to a Redis stream once a second and applies the others', so every
    replica's predictor learns the whole fleet's traffic, and the one saved (by
    whichever refit last) holds it too. Without it, each learned only its own share and
    a restart restored the last writer's.
    """

    def __init__(self, predictor: LengthPredictor | None = None, *, embedder=None, store=None,
                 key: str = "predictor:length") -> None:
        self.predictor = predictor or LengthPredictor()
        self.embedder = embedder
        self.store = store
        self.key = key
        self.refits = 0
        self.refit_failures = 0
        self._refit_failed_logged = -math.inf
        self._refitting = False
        self._embed_lock = None
        self._save_lock = None  # a trio.Lock (made on first use): one save, or swap and save, at a time
        # a trio.Lock shared with the engine's steps (Runtime.compute_lock), or None:
        # embeddings and refits then run beside the steps
        self.compute_lock = None
        # where embeddings and refits run: the runtime's `actors.compute` thread (the one
        # thread of the process that runs torch on a CPU engine), or None: trio's worker threads
        self.compute = None
        # seconds of work run by `_exclusive`, by phase ("embed", "refit"), and a callback
        # `(phase, seconds)` for each (the runtime feeds lmgate_predictor_compute_seconds)
        self.compute_seconds: dict[str, float] = {"embed": 0.0, "refit": 0.0}
        self.on_compute = None
        # observations not yet published to the other replicas (`share`), and where in the
        # shared stream this replica has read up to
        self.replica = uuid.uuid4().hex
        self.share_every_s = SHARE_EVERY_S
        self._outbox: collections.deque[SharedObservation] = collections.deque(maxlen=4 * SHARE_MAX_BATCH)
        self.shared_in = 0  # observations applied from other replicas
        self._pending: tuple[int, int, bytes] | None = None  # a batch being published: (sequence, size, payload)
        self._sequence = 0  # this replica's batches, numbered
        self._seen: dict[str, int] = {}  # other replicas' last batch applied
        self._read_up_to: str | None = None  # the stream id `share` has applied up to (saved beside the predictor)
        self._resume_from: str | None = None  # where a restored predictor had read up to (`load`)

    @property
    def refitting(self) -> bool:
        """A background refit is running (predictions use the previous model meanwhile)."""
        return self._refitting

    def features(self, st, embedding: np.ndarray | None) -> RequestFeatures:
        return RequestFeatures(st.tenant_id, st.app, st.call.user, st.prompt_tokens,
                               int(st.params.max_tokens or 1), embedding)

    async def _exclusive(self, phase: str, fn, *args):
        """`fn(*args)` on the compute thread (or a worker thread) while holding
        `compute_lock` (if any); its duration is added to `compute_seconds[phase]`."""
        import trio

        run = self.compute.run if self.compute is not None else trio.to_thread.run_sync

        def timed():
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                took = time.perf_counter() - t0
                self.compute_seconds[phase] = self.compute_seconds.get(phase, 0.0) + took
                if self.on_compute is not None:
                    self.on_compute(phase, took)

        if self.compute_lock is None:
            return await run(timed)
        async with self.compute_lock:
            return await run(timed)

    async def embed_many(self, sts) -> list[np.ndarray | None]:
        """The instructions' embeddings, one encoder call for the lot."""
        if self.embedder is None:
            return [None] * len(sts)
        import trio

        if self._embed_lock is None:
            self._embed_lock = trio.Lock()  # the embedder is not thread-safe
        texts = [instruction_of(st.call) for st in sts]
        async with self._embed_lock:
            return list(await self._exclusive("embed", self.embedder.embed, texts))

    async def embed(self, st) -> np.ndarray | None:
        return (await self.embed_many([st]))[0]

    async def predict_many(self, sts) -> list[tuple[Prediction, RequestFeatures]]:
        """`predict` for several requests, embedded together (a burst of arrivals)."""
        feats = [self.features(st, e) for st, e in zip(sts, await self.embed_many(sts), strict=True)]
        return [(self.predictor.predict(f), f) for f in feats]

    async def predict(self, st) -> tuple[Prediction, RequestFeatures]:
        """The prediction and the features it used (hand them back to `observe`)."""
        return (await self.predict_many([st]))[0]

    async def observe(self, f: RequestFeatures, true_tokens: int, nursery=None, finish_reason: str = "stop",
                      *, own: bool = True) -> None:
        """Learn a finished request: this replica's `own` (published to the others, `share`,
        and counted toward the next refit), or another replica's."""
        self.predictor.observe(f, true_tokens, finish_reason, counts=own)
        if own and self.store is not None:
            self._outbox.append(SharedObservation.of(f, true_tokens, finish_reason))
        if self.predictor.needs_refit() and not self._refitting:
            if nursery is None:
                await self.refit()
            else:
                self._refitting = True  # claimed now, so a burst of observations starts one refit
                nursery.start_soon(self._refit_in_background)

    async def _refit_in_background(self) -> None:
        """`refit`, started beside the predictor actor's work: one that fails is counted
        (`refit_failures`) and logged at most once a minute, the model kept; raised, it
        cancelled the actor while it predicted requests (an audit: they hung)."""
        try:
            await self.refit()
        except Exception:  # noqa: BLE001 — the model in use goes on answering
            self.refit_failures += 1
            now = time.monotonic()
            if now - self._refit_failed_logged >= 60.0:
                self._refit_failed_logged = now
                logging.getLogger(__name__).exception(
                    "length predictor refit failed (%d so far; the current model goes on answering; logged at "
                    "most once a minute)", self.refit_failures)

    async def refit(self) -> LengthModel:
        self._refitting = True
        try:
            predictor = self.predictor
            data = predictor.snapshot()
            # keeps the current model's ridge penalty between grid searches (LengthModelConfig.research_every)
            model = await self._exclusive("refit", predictor.train, data, predictor.model)
            if self.predictor is not predictor:
                # replaced (`replace`) while this refit ran: its model belongs to the old one
                return model
            predictor.install(model)
            self.refits += 1
            await self.save()
            return model
        finally:
            self._refitting = False

    async def replace(self, blob: bytes) -> bool:
        """Serve from the predictor in `blob` (`LengthPredictor.to_bytes`) from now on, and
        save it to Redis; True if it was saved (False: no store, or Redis down — it is
        served all the same, and saved at the next refit). Raises `PredictorBlobError`
        (and changes nothing) if `blob` is not a predictor. Requests in flight keep the
        features they were predicted with; their observations teach the new predictor. A
        refit running meanwhile is discarded.

        The swap and its save hold the save lock, so replacements (and refits' saves) land
        in Redis in the order they were served: of two overlapping uploads the one served
        last is the one stored (without it the first one's slower pack and SET could land
        after the second's, and a restart would bring back the predictor that lost)."""
        predictor = await self._parse(blob)  # outside the lock: a bad blob waits for nothing
        async with self._saving():
            self.predictor = predictor
            if self._read_up_to is None and self.store is not None:
                # (not sharing — `lmgate predictor import`: the fleet's observations so far are
                # not this predictor's to learn again at the next start; left at the replaced
                # one's position, a restart replayed them on top of a blob that held them: an
                # audit counted 61 requests learned twice or three times)
                try:
                    end = await self._stream_end()
                except Exception:  # noqa: BLE001 - a Redis that refuses streams: no stream to skip
                    end = "$"
                self._read_up_to = end if end != "$" else None
            return await self._save_held()

    def export(self) -> bytes:
        """The predictor as bytes (what `save` writes to Redis and `replace` reads)."""
        return self.predictor.to_bytes()

    async def save(self) -> bool:
        """Persist the predictor served when the save lock is taken (one save at a time:
        `replace`); False (and the store marked unhealthy) if Redis is down."""
        async with self._saving():
            return await self._save_held()

    def _saving(self):
        """The save lock (made here: trio is imported only where it runs)."""
        import trio

        if self._save_lock is None:
            self._save_lock = trio.Lock()
        return self._save_lock

    async def _save_held(self) -> bool:
        """`save`, the caller holding the save lock."""
        if self.store is None:
            return False
        import trio

        from cache.store import CacheUnavailable

        predictor = self.predictor
        read_up_to = self._read_up_to  # what of the shared stream the saved predictor has learned
        # packing copies every sample (MBs): in a worker thread, so streams keep flowing
        blob = await trio.to_thread.run_sync(predictor.pack, predictor.state())
        try:
            with self.store.guard():
                await self.store.client.set(self.store.key(self.key), blob)
                if read_up_to is not None:  # (a replica that does not share leaves the last sharer's)
                    await self.store.client.set(self.store.key(self.key + ":read"), read_up_to)
        except CacheUnavailable:
            return False
        return True

    async def load(self) -> bool:
        """Restore from Redis; False if nothing is stored (or Redis is down)."""
        if self.store is None:
            return False
        import coredis

        from cache.store import CacheUnavailable

        try:
            blob = await self.stored_blob()
            with self.store.guard():
                read_up_to = await self.store.client.get(self.store.key(self.key + ":read"))
        except CacheUnavailable:
            return False
        except coredis.exceptions.WrongTypeError:  # (the stream position: learned from the start)
            read_up_to = None
        if blob is None:
            return False
        self.predictor = await self._parse(blob)
        # `share` starts there: what the fleet observed after the save is learned too
        self._resume_from = _text(read_up_to, "replace") if read_up_to is not None else None
        return True

    async def stored_blob(self) -> bytes | None:
        """The bytes Redis holds under the predictor's key, or None. PredictorBlobError for a
        key of another type (a hash, a list: not a predictor), as for bytes that are none;
        CacheUnavailable when Redis is down."""
        import coredis

        try:
            with self.store.guard():
                return await self.store.client.get(self.store.key(self.key))
        except coredis.exceptions.WrongTypeError as e:
            raise PredictorBlobError(f"not a length-predictor blob (Redis holds another type there: {e})") from e

    async def _parse(self, blob: bytes) -> LengthPredictor:
        import trio

        return await trio.to_thread.run_sync(LengthPredictor.from_bytes, blob, self.predictor.config)

    async def share(self, *, task_status=None) -> None:
        """Run for good: every `share_every_s`, publish this replica's new observations to
        the Redis stream `SHARE_KEY` (one entry, trimmed to about `SHARE_MAX_ENTRIES`) and
        learn the other replicas' entries since the last read. It starts where the
        predictor `load` restored had read the stream up to when it was saved (what the
        fleet observed since is learned too, as far as the stream still holds it: about
        `SHARE_MAX_ENTRIES` entries; the saving replica's own observations of its last
        seconds may come twice), else from the stream's end. Redis down: the outbox keeps
        the newest observations (`SHARE_MAX_BATCH` × 4) and reading resumes where it stopped."""
        import logging

        import trio

        if task_status is not None:  # first: the server is ready whatever Redis answers
            task_status.started()
        last: str | None = None
        failures = 0
        async with trio.open_nursery() as nursery:  # refits the others' observations start
            first = True
            while True:
                if not first:  # (the first round at once: where the stream ends now is where to read from)
                    await trio.sleep(self.share_every_s * 2 ** min(failures, 6))  # 64 rounds at most after failures
                first = False
                if not self.store.reachable():  # down: the store's watch finds it back (no retries here)
                    continue
                try:
                    if last is None:
                        last = self._resume_from or await self._stream_end()
                    await self._publish()
                    last = await self._apply_shared(last, nursery)
                except Exception as e:  # noqa: BLE001 - a Redis that refuses streams (an ACL, a key of another
                    # type): the predictor works on without the others' observations
                    if not failures:
                        logging.getLogger(__name__).warning("length predictor sharing failed (%s: %s); retrying "
                                                            "with backoff", type(e).__name__, e)
                    failures += 1
                    continue
                failures = 0
                self._read_up_to = last if last != "$" else None

    async def _stream_end(self) -> str:
        from cache.store import CacheUnavailable

        try:
            with self.store.guard():
                entries = await self.store.client.xrevrange(self.store.key(SHARE_KEY), count=1)
        except CacheUnavailable:
            return "$"  # unknown: read from whatever comes next (a reconnect finds it)
        return _text(entries[0].identifier) if entries else "0-0"

    async def _publish(self) -> None:
        from coredis.tokens import PureToken

        from cache.store import CacheUnavailable

        while self._pending is not None or self._outbox:
            if self._pending is None:  # numbered once: sent again as it is, the readers skip a second copy
                batch = [self._outbox.popleft() for _ in range(min(SHARE_MAX_BATCH, len(self._outbox)))]
                self._sequence += 1
                self._pending = (self._sequence, len(batch), msgspec.msgpack.encode(batch))
            sequence, _, payload = self._pending
            try:
                with self.store.guard():
                    await self.store.client.xadd(
                        self.store.key(SHARE_KEY), {"r": self.replica, "s": str(sequence), "o": payload},
                        trim_strategy=PureToken.MAXLEN, threshold=SHARE_MAX_ENTRIES,
                        trim_operator=PureToken.APPROXIMATELY)
            except CacheUnavailable:  # (it may have landed: a timeout after the write, or the client's retry)
                return
            self._pending = None

    async def _apply_shared(self, last: str, nursery) -> str:
        """Learn the entries after `last` that other replicas published (all of them, a
        read of `SHARE_READ_ENTRIES` at a time); the id read up to."""
        import trio

        from cache.store import CacheUnavailable

        key = self.store.key(SHARE_KEY)
        while True:
            try:
                with self.store.guard():
                    if last == "$":
                        entries = await self.store.client.xrevrange(key, count=1)
                        return _text(entries[0].identifier) if entries else "0-0"
                    # a few at a time: an entry holds up to SHARE_MAX_BATCH observations
                    # (~800 KB), and a large reply would outlast the store's read timeout
                    read = await self.store.client.xread({key: last}, count=SHARE_READ_ENTRIES)
            except CacheUnavailable:
                return last
            entries = [entry for each in (read or {}).values() for entry in each]
            for entry in entries:
                last = _text(entry.identifier)
                await self._apply_entry(entry.field_values, nursery)
                await trio.sleep(0)  # applying takes ~30 µs an observation: let the loop run between entries
            if len(entries) < SHARE_READ_ENTRIES:
                return last

    async def _apply_entry(self, fields: dict, nursery) -> None:
        """One entry of the stream: another replica's observations (this replica's own, and
        what no replica writes, are skipped)."""
        fields = {_text(k, "replace"): v for k, v in fields.items()}
        replica = _text(fields.get("r", b""), "replace")
        if replica == self.replica:
            return
        try:
            batch = _SHARED_BATCH.decode(fields.get("o", b""))
            sequence = int(fields.get("s", 0))
        except (msgspec.DecodeError, TypeError, ValueError):
            return
        if sequence:  # a batch sent twice (its first XADD landed, but its answer did not): once
            if sequence <= self._seen.get(replica, 0):
                return
            self._seen[replica] = sequence
            while len(self._seen) > 1024:  # (one per replica start: the oldest go)
                del self._seen[next(iter(self._seen))]
        for obs in batch:
            f = obs.features(self.predictor.config.emb_dim)
            if f is None or obs.tokens < 0 or obs.prompt_tokens < 0 or obs.max_tokens < 1:
                continue
            await self.observe(f, obs.tokens, nursery, obs.finish_reason, own=False)
            self.shared_in += 1

    def sharing(self) -> dict:
        """What `share` has done, for operators (`GET /admin/predictor`)."""
        pending = self._pending[1] if self._pending is not None else 0
        return {"replica": self.replica, "applied_from_others": self.shared_in,
                "waiting_to_publish": len(self._outbox) + pending}

    async def load_or_seed(self, seed: bytes | None) -> str:
        """Start-up: the predictor saved in Redis if there is one ("restored"), else the
        one in `seed` — saved to Redis, so the next start restores what it learns on top
        ("seeded") — else a cold one ("cold"). A seed never overwrites what a deployment
        has learned. Raises `PredictorBlobError` if `seed` is not a predictor."""
        if await self.load():
            return "restored"
        if seed is None:
            return "cold"
        await self.replace(seed)
        return "seeded"


def _text(value: str | bytes, errors: str = "strict") -> str:
    """A Redis reply's string (the store's client may answer bytes)."""
    return value.decode(errors=errors) if isinstance(value, bytes) else value
