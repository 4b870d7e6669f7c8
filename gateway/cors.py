"""Cross-origin requests (CORS) from web pages to the public API.

A page served from another origin (a browser playground, a JavaScript app using the
`openai` package in the browser) may call `/v1/*` only if the answer says its origin
is allowed; for a request with an `Authorization` header the browser first sends a
preflight (`OPTIONS` with `Access-Control-Request-Method`), which must say so too.

The public API authenticates with a bearer key the page itself sends, never with
cookies, so allowing every origin (`*`, the default, as OpenAI's API and vLLM do) gives
a page no power it does not already hold: credentials are not allowed
(`Access-Control-Allow-Credentials` is never sent). The admin API (`/admin/...`) never
answers cross-origin: its key does not belong in a browser. Nor does `/metrics`, the
operator's: without a metrics key it is open, and its series name every tenant, so any
page an operator opened could have read it from a server on localhost or an inner network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ORIGIN = re.compile(r"https?://[^\s/?#,]+", re.IGNORECASE)
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
# a 429/503 says when to come back (and, `x-should-retry`, when not to: the OpenAI SDKs read
# it); OpenAI's rate-limit headers say how much is left
EXPOSED_HEADERS = ", ".join(["Retry-After", "X-Request-Id", "x-should-retry"]
                            + [f"x-ratelimit-{what}-{kind}" for kind in ("requests", "tokens")
                               for what in ("limit", "remaining", "reset")])
MAX_AGE_S = 600  # browsers cache a preflight this long (Chromium caps it at 7200)
OPERATOR_PATHS = ("/admin", "/metrics")  # never answered cross-origin (see the module docstring)


class CorsConfigError(ValueError):
    pass


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def canonical_origin(origin: str) -> str:
    """An origin as browsers send it (RFC 6454 §6.1): scheme and host in lower case, no
    default port. `https://App.Example.com:443` allowed as written matched no browser's
    `https://app.example.com`, and CORS was silently off for that site."""
    if origin == "*":
        return origin
    origin = origin.lower()  # (an origin holds no path: nothing in it is case-sensitive)
    scheme = origin.split("://", 1)[0]
    port = _DEFAULT_PORTS.get(scheme)
    return origin.removesuffix(port) if port and origin.endswith(port) else origin


@dataclass(frozen=True)
class CorsPolicy:
    """Which origins may call the public API: `("*",)` any, `()` none (CORS off), or a
    list of exact origins (`https://app.example.com`)."""

    origins: tuple[str, ...] = ("*",)

    @classmethod
    def parse(cls, text: str) -> CorsPolicy:
        """`"*"`, `""` (off) or comma-separated origins; CorsConfigError for anything else."""
        origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise CorsConfigError(f"an allowed origin is '*' or scheme://host[:port], got {origin!r}")
        origins = tuple(dict.fromkeys(canonical_origin(o) for o in origins))
        if "*" in origins and len(origins) > 1:
            raise CorsConfigError("'*' allows every origin: give it alone")
        return cls(origins)

    def allows(self, origin: str) -> bool:
        return origin in self.origins or self.origins == ("*",)

    def headers(self, path: str, origin: str | None, preflight_headers: str | None,
                preflight: bool) -> dict[str, str]:
        """The CORS headers of an answer to a request from `origin` for `path` (none for a
        same-origin or non-browser request, an origin not allowed, or `OPERATOR_PATHS`).
        `preflight`: the request is a preflight; `preflight_headers` the headers it asks
        to send (`Access-Control-Request-Headers`), which are allowed as asked."""
        if path.startswith(OPERATOR_PATHS) or not self.origins:
            return {}
        # listed origins: the answer depends on the Origin, whether it is allowed or not, so
        # a shared cache must key on it (else it could serve one origin's answer to another)
        vary = {} if self.origins == ("*",) else {"Vary": "Origin"}
        if origin is None or not self.allows(origin):
            return vary
        out = {"Access-Control-Allow-Origin": "*" if self.origins == ("*",) else origin, **vary}
        if preflight:
            out["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            if preflight_headers:
                out["Access-Control-Allow-Headers"] = preflight_headers
            out["Access-Control-Max-Age"] = str(MAX_AGE_S)
        else:
            out["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        return out


__all__ = ["CorsConfigError", "CorsPolicy", "canonical_origin"]
