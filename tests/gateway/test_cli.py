"""`lmgate generate`'s engine flags map onto `EngineConfig` (no model is loaded here)."""

from __future__ import annotations

from gateway.cli import build_parser, engine_config_from_args
from gpu.config import CacheConfig, SchedulerConfig


def test_generate_takes_the_engine_defaults_and_its_flags_override_them():
    cfg = engine_config_from_args(build_parser().parse_args(["generate", "hi"]))
    assert (cfg.cache.cache_bytes, cfg.scheduler.max_num_seqs) == (CacheConfig().cache_bytes,
                                                                   SchedulerConfig().max_num_seqs)
    assert cfg.cache.huge_pages and cfg.cache.enable_prefix_caching and not cfg.batch_invariant
    cfg = engine_config_from_args(build_parser().parse_args(
        ["generate", "--kv-cache-mb", "64", "--max-num-seqs", "8", "--no-kv-huge-pages", "--no-prefix-caching", "hi"]))
    assert (cfg.cache.cache_bytes, cfg.scheduler.max_num_seqs) == (64 * 1024**2, 8)
    assert not cfg.cache.huge_pages and not cfg.cache.enable_prefix_caching
    assert engine_config_from_args(build_parser().parse_args(["generate", "--batch-invariant", "hi"])).batch_invariant
