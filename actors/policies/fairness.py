"""Virtual token counter (S-LoRA's VTC): fair service across tenants.

Each tenant has a counter of the service it has received, in weighted tokens
(`w_in` per prompt token, `w_out` per output token). The next request comes from
the backlogged tenant with the smallest counter. When a tenant becomes
backlogged again after being idle, its counter is lifted to the smallest
counter among the backlogged tenants, so idling does not bank credit (the
"no saving up" rule of VTC) — a heavy tenant cannot starve a light one, and a
light one cannot monopolize the engine after a quiet period.

Output tokens are charged at release with the *predicted* length and corrected
with the true length at finish, so the counters track real service.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class VirtualTokenCounter:
    w_in: float = 1.0
    w_out: float = 2.0
    counters: dict[str, float] = field(default_factory=dict)

    def on_backlogged(self, tenant: str, backlogged: Iterable[str]) -> None:
        """`tenant` got a waiting request while it had none; `backlogged` are the others."""
        others = [self.counters.get(t, 0.0) for t in backlogged if t != tenant]
        floor = min(others) if others else max(self.counters.values(), default=0.0)
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)

    def forget(self, tenant: str) -> None:
        """A deleted tenant's counter goes (one created again under its id is lifted to the
        least backlogged tenant's when it first waits, as any newcomer)."""
        self.counters.pop(tenant, None)

    def pick(self, tenants: Iterable[str]) -> str | None:
        """The tenant with the least service among `tenants` (ties: by name)."""
        return min(tenants, key=lambda t: (self.counters.get(t, 0.0), t), default=None)

    def charge(self, tenant: str, prompt_tokens: float, output_tokens: float) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + self.w_in * prompt_tokens + self.w_out * output_tokens
