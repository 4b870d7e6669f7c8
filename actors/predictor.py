"""Generation-length prediction (pure logic).

`RunningLengthEstimator` is the simple predictor: an exponentially weighted
mean and variance of true output lengths per (tenant, application), falling
back to the tenant, then to a global estimate. Predictions carry an
uncertainty (the running standard deviation) and are clipped to the request's
`max_tokens`. The Magnus predictor (embeddings + regressor) replaces it behind
the same `predict` / `observe` interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
            self._stats.setdefault(key, _Stat()).add(float(true_tokens), self.config.alpha)
