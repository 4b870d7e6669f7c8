"""Redis-backed shared state of the gateway: tenants and hashed API keys, atomic
per-tenant quotas and usage accounting, the response (edge) cache and the prompt
cache, plus a private ``redis-server`` for single-node runs and tests.

Everything talks to Redis through one ``RedisStore`` (open it with ``async with``
in a scope that wraps the server); every operation raises ``CacheUnavailable``
when Redis cannot be reached, and callers choose to fail open or closed.
"""

from cache.prompt_cache import PromptCache, RenderedPrompt
from cache.quotas import Admitted, Denied, DuplicateRequest, Quota, QuotaManager, UsageRow
from cache.redis_server import PrivateRedis, RedisServerError
from cache.response_cache import CachedCompletion, CachedUsage, ResponseCache
from cache.store import CacheUnavailable, RedisStore
from cache.tenants import ApiKeyInfo, Tenant, TenantExists, TenantNotFound, TenantRegistry

__all__ = [
    "Admitted",
    "ApiKeyInfo",
    "CacheUnavailable",
    "CachedCompletion",
    "CachedUsage",
    "Denied",
    "DuplicateRequest",
    "PrivateRedis",
    "PromptCache",
    "Quota",
    "QuotaManager",
    "RedisServerError",
    "RedisStore",
    "RenderedPrompt",
    "ResponseCache",
    "Tenant",
    "TenantExists",
    "TenantNotFound",
    "TenantRegistry",
    "UsageRow",
]
