"""GatewayConfig: precedence flags > env > file > defaults, type errors name the setting."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest
import trio

from gateway.config import (
    ConfigError,
    GatewayConfig,
    load_config,
    non_default_settings,
    start_warnings,
)
from gateway.server import add_serve_arguments, hypercorn_config


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_precedence(tmp_path: Path) -> None:
    path = tmp_path / "lmgate.toml"
    path.write_text('port = 7000\nhost = "0.0.0.0"\nmax_body_bytes = 100\nadmin_key = "from-file"\n')
    env = {"LMGATE_PORT": "7100", "LMGATE_MAX_BODY_BYTES": "200"}
    config = load_config(path, env, {"port": "7200"})
    assert (config.port, config.max_body_bytes, config.host, config.admin_key) == (7200, 200, "0.0.0.0", "from-file")
    assert config.max_ws_frame_bytes == GatewayConfig().max_ws_frame_bytes


def test_gateway_table_and_redis_url_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[gateway]\nshutdown_grace_seconds = 2.5\ndev_tenant = false\n")
    config = load_config(path, {"REDIS_URL": "redis://x:1/0"}, {})
    assert (config.shutdown_grace_seconds, config.dev_tenant, config.redis_url) == (2.5, False, "redis://x:1/0")


def test_flags_from_argparse(tmp_path: Path) -> None:
    from gateway.config import config_from_args

    args = parse(["--port", "9001", "--max-streams-per-socket", "3", "--no-dev-tenant"])
    config = config_from_args(args, env={"LMGATE_PORT": "1", "LMGATE_DATA_DIR": str(tmp_path)})
    assert (config.port, config.max_streams_per_socket, config.dev_tenant, config.data_dir) == (9001, 3, False, str(tmp_path))


@pytest.mark.parametrize(
    ("env", "name"),
    [({"LMGATE_PORT": "eighty"}, "port"), ({"LMGATE_PORT": "70000"}, "port"),
     ({"LMGATE_DEV_TENANT": "maybe"}, "dev_tenant"), ({"LMGATE_MAX_BODY_BYTES": "0"}, "max_body_bytes")],
)
def test_bad_values_name_the_setting(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config(None, env, {})


def test_unknown_file_setting_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(path, {}, {})


def test_help_documents_env_and_precedence(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    assert "LMGATE_MAX_WS_FRAME_BYTES" in out and "flags > LMGATE_* env > file > defaults" in out


def test_hypercorn_limits_leave_room_for_the_app_to_answer() -> None:
    config = GatewayConfig(max_ws_frame_bytes=1000, shutdown_grace_seconds=3)
    hc = hypercorn_config(config)
    assert hc.websocket_max_message_size > config.max_ws_frame_bytes
    assert hc.graceful_timeout == 3


def test_hypercorn_logs_through_the_root_logger_once(caplog: pytest.LogCaptureFixture) -> None:
    from hypercorn.logging import Logger

    logger = Logger(hypercorn_config(GatewayConfig()))
    assert logger.error_logger is not None and logger.error_logger.handlers == []
    assert logger.error_logger.propagate
    with caplog.at_level(logging.INFO):
        trio.run(logger.info, "Running on http://127.0.0.1:8000")
    assert [r.getMessage() for r in caplog.records] == ["Running on http://127.0.0.1:8000"]


@pytest.mark.parametrize(
    "flags,expected",
    [
        ([], "running"),
        (["--scheduling-policy", "magnus"], "magnus"),
        (["--scheduling-policy", "hybrid"], "magnus"),
        (["--scheduling-policy", "magnus", "--length-predictor", "running"], "running"),
        (["--length-predictor", "magnus"], "magnus"),
    ],
)
def test_length_predictor_auto_follows_the_policy(flags: list[str], expected: str) -> None:
    from gateway.config import config_from_args, runtime_config

    config = config_from_args(parse(flags), env={})
    assert runtime_config(config).length_predictor == expected


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [([], {}, "auto"), (["--kv-reservation", "off"], {}, "off"),
     ([], {"LMGATE_KV_RESERVATION": "always"}, "always"),
     (["--kv-reservation", "off"], {"LMGATE_KV_RESERVATION": "always"}, "off")],
)
def test_kv_reservation_reaches_the_policy(flags: list[str], env: dict[str, str], expected: str) -> None:
    from actors.policies import make_policy
    from gateway.config import config_from_args, runtime_config

    config = config_from_args(parse(["--scheduling-policy", "magnus", *flags]), env=env)
    policy = runtime_config(config).queue.policy
    assert policy.kv_reservation == expected
    assert make_policy(policy).kv.mode == ("none" if expected == "off" else "predicted")


@pytest.mark.parametrize("policy", ["priority", "hybrid"])
def test_aging_seconds_reaches_the_policy(policy: str) -> None:
    from actors.policies import make_policy
    from gateway.config import config_from_args, runtime_config

    assert make_policy(runtime_config(config_from_args(parse(["--scheduling-policy", policy]), env={}))
                       .queue.policy_config()).aging_s == 10.0
    config = config_from_args(parse(["--scheduling-policy", policy]), env={"LMGATE_AGING_SECONDS": "2.5"})
    assert make_policy(runtime_config(config).queue.policy_config()).aging_s == 2.5
    with pytest.raises(ConfigError, match="aging_seconds"):
        GatewayConfig(aging_seconds=0)


def test_bad_kv_reservation_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="kv_reservation"):
        GatewayConfig(kv_reservation="never")


def test_bad_length_predictor_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="length_predictor"):
        GatewayConfig(length_predictor="oracle")


def test_engine_defaults_and_the_huge_pages_switch_reach_the_engine_config() -> None:
    """The serving defaults (128 sequences on 1.5 GiB, huge pages) are the engine's, and the
    flag and the environment both turn the huge pages off."""
    from gateway.config import config_from_args, runtime_config
    from gpu.config import CacheConfig, SchedulerConfig

    engine = runtime_config(config_from_args(parse([]), env={})).engine
    assert (engine.cache.cache_bytes, engine.scheduler.max_num_seqs, engine.cache.huge_pages) == (
        CacheConfig().cache_bytes, SchedulerConfig().max_num_seqs, True)
    assert (CacheConfig().cache_bytes, SchedulerConfig().max_num_seqs) == (1536 * 1024**2, 128)
    assert not runtime_config(config_from_args(parse(["--no-kv-huge-pages"]), env={})).engine.cache.huge_pages
    off = config_from_args(parse([]), env={"LMGATE_KV_HUGE_PAGES": "false"})
    assert not runtime_config(off).engine.cache.huge_pages


def test_the_long_prefill_threshold_reaches_the_scheduler_and_is_never_negative() -> None:
    from gateway.config import ConfigError, config_from_args, runtime_config

    def threshold(flags: list[str], env: dict[str, str]) -> int:
        return runtime_config(config_from_args(parse(flags), env=env)).engine.scheduler.long_prefill_token_threshold

    assert threshold([], {}) == 0  # (the whole step budget, as vLLM's default)
    assert threshold(["--long-prefill-token-threshold", "128"], {}) == 128
    assert threshold([], {"LMGATE_LONG_PREFILL_TOKEN_THRESHOLD": "64"}) == 64
    with pytest.raises(ConfigError, match="long_prefill_token_threshold must be >= 0"):
        threshold(["--long-prefill-token-threshold", "-1"], {})


@pytest.mark.parametrize(("flags", "env", "expected"), [
    ([], {}, False),
    (["--batch-invariant"], {}, True),
    ([], {"LMGATE_BATCH_INVARIANT": "1"}, True),
    (["--no-batch-invariant"], {"LMGATE_BATCH_INVARIANT": "1"}, False),
])
def test_batch_invariant_reaches_the_engine_config(flags: list[str], env: dict[str, str], expected: bool) -> None:
    from gateway.config import config_from_args, runtime_config

    assert runtime_config(config_from_args(parse(flags), env=env)).engine.batch_invariant is expected


@pytest.mark.parametrize(("flags", "env", "expected"), [
    ([], {}, True),
    (["--step-thread", "loop"], {}, False),
    (["--step-thread", "worker"], {}, True),
    ([], {"LMGATE_STEP_THREAD": "loop"}, False),
])
def test_step_thread_reaches_the_runtime_config(flags: list[str], env: dict[str, str], expected: bool) -> None:
    from gateway.config import config_from_args, runtime_config

    assert runtime_config(config_from_args(parse(flags), env=env)).step_in_thread is expected


def test_bad_step_thread_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="step_thread"):
        GatewayConfig(step_thread="gpu")


def test_predictor_seed_reaches_the_runtime_and_bad_seeds_fail_at_start_up(tmp_path: Path) -> None:
    import numpy as np

    from actors.predictor import LengthPredictor, RequestFeatures
    from gateway.config import config_from_args, runtime_config

    p = LengthPredictor()
    for k in range(30):
        p.observe(RequestFeatures("dev", "qa", None, 20 + k, 256, np.full(384, 384 ** -0.5, dtype=np.float32)), 40 + k)
    good = tmp_path / "seed.npz"
    good.write_bytes(p.to_bytes())
    config = config_from_args(parse(["--scheduling-policy", "magnus", "--predictor-seed", str(good)]), env={})
    assert runtime_config(config).predictor_seed == str(good)
    assert runtime_config(config_from_args(parse([]), env={})).predictor_seed is None

    with pytest.raises(ConfigError, match="needs the magnus length predictor"):
        GatewayConfig(predictor_seed=str(good))  # the default policy runs the running estimate
    with pytest.raises(ConfigError, match="cannot read"):
        GatewayConfig(length_predictor="magnus", predictor_seed=str(tmp_path / "missing.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a length-predictor blob"):
        GatewayConfig(length_predictor="magnus", predictor_seed=str(junk))


def test_serve_reports_a_bad_setting_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["serve", "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmgate serve: ") and "port must be in 0..65535" in err and "Traceback" not in err


@pytest.mark.parametrize(("content", "match"), [
    (b"port = \n", "invalid TOML"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_an_unreadable_file_is_a_config_error_naming_it(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, {}, {})
    assert str(path) in str(info.value)


def test_a_missing_file_is_a_config_error_from_the_flag_and_from_lmgate_config(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=f"{missing}: No such file"):
        load_config(missing, {}, {})
    with pytest.raises(ConfigError, match=f"{missing}: No such file"):
        load_config(None, {"LMGATE_CONFIG": missing}, {})


def test_settings_outside_the_gateway_table_are_refused_not_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('port = 9999\nadmin_key = "secret"\n[gateway]\nmax_waiting = 5\n')
    with pytest.raises(ConfigError, match=r"\['admin_key', 'port'\] are outside the \[gateway\] table"):
        load_config(path, {}, {})
    path.write_text('[gateway]\nport = 9999\nadmin_key = "secret"\nmax_waiting = 5\n')
    config = load_config(path, {}, {})
    assert (config.port, config.admin_key, config.max_waiting) == (9999, "secret", 5)


def test_config_help_says_how_the_gateway_table_mixes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "settings outside [gateway] are refused, not ignored" in out


@pytest.mark.parametrize("toml", ["port = 8080.7\n", "max_body_bytes = 1.9\n", "port = 8080.0\n", "threads = true\n"])
def test_a_float_for_an_integer_setting_in_the_file_is_refused_not_truncated(tmp_path: Path, toml: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=toml.split()[0]):
        load_config(path, {}, {})


@pytest.mark.parametrize("toml", ['port = "8000"\n', 'prefix_caching = "no"\n', "prefix_caching = 0\n",
                                  'dev_tenant = "off"\n', 'shutdown_grace_seconds = "1e1"\n'])
def test_a_string_or_number_for_a_typed_setting_in_the_file_is_refused(tmp_path: Path, toml: str) -> None:
    """A TOML value has a type of its own: the environment's text parsing is not applied to it
    (the module's contract: "A value of the wrong type is refused")."""
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=toml.split()[0]):
        load_config(path, {}, {})


def test_an_empty_config_path_is_refused_as_such() -> None:
    with pytest.raises(ConfigError, match="config file's path is empty"):
        load_config("", {}, {})


def test_an_empty_lmgate_redis_url_counts_as_unset(tmp_path: Path) -> None:
    assert load_config(None, {"REDIS_URL": "redis://a:1", "LMGATE_REDIS_URL": ""}, {}).redis_url == "redis://a:1"
    assert load_config(None, {"REDIS_URL": "redis://a:1", "LMGATE_REDIS_URL": "redis://b:2"}, {}).redis_url \
        == "redis://b:2"
    assert load_config(None, {"LMGATE_REDIS_URL": ""}, {}).redis_url is None
    path = tmp_path / "c.toml"
    path.write_text('redis_url = "redis://filehost:6379"\n')
    assert load_config(path, {"LMGATE_REDIS_URL": ""}, {}).redis_url == "redis://filehost:6379"


def test_a_float_for_an_integer_setting_from_env_or_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'port' \(environment variable LMGATE_PORT\): expected an integer, "
                                          "got '8080.7'"):
        load_config(None, {"LMGATE_PORT": "8080.7"}, {})
    with pytest.raises(ConfigError, match="max_body_bytes"):
        load_config(None, {}, {"max_body_bytes": "1.9"})
    assert load_config(None, {"LMGATE_PORT": " 8080 "}, {}).port == 8080


@pytest.mark.parametrize(("name", "value"), [
    ("max_estimated_wait_seconds", "-1"), ("max_estimated_wait_seconds", "0"),
    ("max_estimated_wait_seconds", "nan"), ("max_estimated_wait_seconds", "inf"),
    ("keep_alive_seconds", "-5"), ("keep_alive_seconds", "inf"), ("keep_alive_seconds", "nan"),
    ("shutdown_grace_seconds", "nan"), ("shutdown_grace_seconds", "-1"), ("shutdown_grace_seconds", "inf"),
    ("shutdown_grace_seconds", "true"), ("sse_ping_seconds", "-1"), ("sse_ping_seconds", "inf"),
])
def test_out_of_range_seconds_are_refused_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_config(None, {"LMGATE_" + name.upper(): value}, {})


def test_nan_from_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("shutdown_grace_seconds = nan\n")
    with pytest.raises(ConfigError, match="shutdown_grace_seconds"):
        load_config(path, {}, {})


def test_zero_seconds_stay_valid_where_they_mean_something() -> None:
    config = GatewayConfig(shutdown_grace_seconds=0, keep_alive_seconds=0, max_estimated_wait_seconds=0.5)
    assert (config.shutdown_grace_seconds, config.keep_alive_seconds) == (0, 0)


@pytest.mark.parametrize("url", ["notaurl", "http://127.0.0.1:6379", "redis://", "127.0.0.1:6379"])
def test_a_redis_url_without_a_redis_scheme_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="redis_url must start with redis://, rediss:// or unix://"):
        load_config(None, {"REDIS_URL": url}, {})


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://user:pw@host:6380", "unix:///tmp/redis.sock"])
def test_redis_urls_of_every_scheme_are_accepted(url: str) -> None:
    assert load_config(None, {}, {"redis_url": url}).redis_url == url


@pytest.mark.parametrize(("url", "said"), [
    ("rediss://h:6380/0?ssl_ca_certs=/nonexistent/ca.pem", "its TLS files do not load (ssl_ca_certs='/nonexistent/ca.pem'): No such file"),
    ("rediss://h:6380/0?ssl_cert_reqs=bogus", "ssl_cert_reqs must be none, optional or required"),
    ("redis://:Ab/Cd+ef=@10.0.0.5:6380/0", "must be percent-encoded"),
    ("redis://default:1234/Cd+ef@host:6379/0", "not shown: the URL holds a password"),
    ("redis://u:p?db=Cd+ef@host/0", "must be percent-encoded"),
])
def test_what_the_redis_client_would_fail_on_is_refused_in_one_line_without_the_password(url: str, said: str) -> None:
    """A TLS file or setting coredis reads when the client is made (a traceback there), a
    password holding `/` (urllib's words quoted part of it): one line, no password (a review)."""
    with pytest.raises(ConfigError, match=re.escape(said)) as info:
        load_config(None, {}, {"redis_url": url})
    assert "Ab" not in str(info.value) and "Cd+ef" not in str(info.value)


def test_tls_files_are_loaded_at_start(tmp_path) -> None:  # noqa: ANN001
    """A CA file that is not PEM is one line (a traceback when the client was made); a
    folder of CAs, as coredis takes, is accepted (a review)."""
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="its TLS files do not load"):
        load_config(None, {}, {"redis_url": f"rediss://h:6380/0?ssl_ca_certs={tmp_path / 'bad.pem'}"})
    assert load_config(None, {}, {"redis_url": f"rediss://h:6380/0?ssl_ca_certs={tmp_path}"}).redis_url


@pytest.mark.parametrize("device", ["bogus", "cuda:", "cuda:x", "gpu", "CPU "])
def test_a_bad_device_is_refused(device: str) -> None:
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N"):
        GatewayConfig(device=device)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_devices_are_accepted(device: str) -> None:
    assert GatewayConfig(device=device).device == device


def test_log_levels_are_checked_not_defaulted() -> None:
    import logging

    from gateway.config import parse_log_level

    assert parse_log_level("debug") == logging.DEBUG and parse_log_level("WARNING") == logging.WARNING
    with pytest.raises(ConfigError, match="DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'bogus'"):
        parse_log_level("bogus")


@pytest.mark.parametrize(("flags", "env", "expected"), [
    ([], {}, "none"),
    (["--quantization", "int8"], {}, "int8"),
    ([], {"LMGATE_QUANTIZATION": "int8"}, "int8"),
])
def test_quantization_reaches_the_engine_config(flags: list[str], env: dict[str, str], expected: str) -> None:
    from gateway.config import config_from_args, runtime_config

    assert runtime_config(config_from_args(parse(flags), env=env)).engine.quantization == expected


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"quantization": "int4"}, "quantization must be none or int8, got 'int4'"),
    ({"quantization": "int8", "device": "cuda"}, "CPU only"),
])
def test_quantization_the_engine_cannot_run_is_refused_at_start(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GatewayConfig(**kwargs)


def test_model_cache_dir_reaches_the_engine_config_and_a_file_there_is_refused(tmp_path: Path) -> None:
    from gateway.config import config_from_args, runtime_config

    assert runtime_config(config_from_args(parse([]), env={})).engine.model_cache_dir == ""
    cache = str(tmp_path / "models")  # need not exist yet
    assert runtime_config(config_from_args(parse(["--model-cache-dir", cache]), env={})).engine.model_cache_dir \
        == cache
    env = {"LMGATE_MODEL_CACHE_DIR": cache}
    assert runtime_config(config_from_args(parse([]), env=env)).engine.model_cache_dir == cache
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="model_cache_dir"):
        GatewayConfig(model_cache_dir=str(tmp_path / "file"))


@pytest.mark.parametrize(("url", "match"), [
    ("redis://:::", "Port could not be cast"),  # an AssertionError inside coredis
    ("redis://:6379/0", "names no host"),
    ("redis://h:99999/0", "Port out of range"),
    ("redis://h:0/0", "port must be in 1..65535"),  # coredis took port 0 for 6379
    ("redis://h:6379/abc", "the path is the database number"),  # coredis silently used database 0
    ("redis://h/1/2", "the path is the database number"),  # coredis read database 12
    ("redis://h?db=x", "db must be a database number"),
    ("redis://h?max_connections=lots", "bad max_connections"),
    ("unix://tmp/redis.sock", "three slashes"),  # coredis connected to /redis.sock
])
def test_a_redis_url_coredis_would_misread_is_refused(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, {}, {"redis_url": url})


@pytest.mark.parametrize("url", ["redis://[::1]:6379/2", "redis://h?db=3", "redis://h/", "rediss://:pw@h:6380/15",
                                 "unix:///tmp/redis.sock?db=1", "unix://:pw@/tmp/redis.sock"])
def test_redis_urls_with_a_database_are_accepted(url: str) -> None:
    assert load_config(None, {"REDIS_URL": url}, {}).redis_url == url


def test_a_refused_redis_url_does_not_show_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {}, {"redis_url": "redis://user:hunter2@h:6379/abc"})
    assert "hunter2" not in str(info.value) and "redis://user:***@h:6379/abc" in str(info.value)


def test_log_level_is_a_setting_of_the_file_the_environment_and_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('log_level = "debug"\n')
    assert GatewayConfig().log_level == "INFO"
    assert load_config(path, {}, {}).log_level == "debug"
    assert load_config(path, {"LMGATE_LOG_LEVEL": "WARNING"}, {}).log_level == "WARNING"
    assert load_config(path, {"LMGATE_LOG_LEVEL": "WARNING"}, {"log_level": "ERROR"}).log_level == "ERROR"
    with pytest.raises(ConfigError, match="log level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        load_config(None, {"LMGATE_LOG_LEVEL": "loud"}, {})


def test_a_value_of_the_wrong_type_names_where_it_came_from(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('dev_tenant = "maybe"\n')
    with pytest.raises(ConfigError, match=rf"'dev_tenant' \(config file {path}\): expected true or false, unquoted, "
                                               "got the string 'maybe'"):
        load_config(path, {}, {})
    with pytest.raises(ConfigError, match=r"'dev_tenant' \(environment variable LMGATE_DEV_TENANT\): not a boolean"):
        load_config(None, {"LMGATE_DEV_TENANT": "maybe"}, {})
    with pytest.raises(ConfigError, match=r"'port' \(flag --port\): expected an integer, got 'eighty'"):
        load_config(None, {}, {"port": "eighty"})


def test_unknown_lmgate_variables_are_named_with_the_closest_known_one() -> None:
    from gateway.config import unknown_variables

    env = {"LMGATE_MAXNUMSEQS": "1", "LMGATE_PORT": "8000", "LMGATE_SECRET": "s" * 32, "LMGATE_CONFIG": "",
           "lmgate_admin_key": "k", "PATH": "/bin", "REDIS_URL": "redis://h/0"}
    assert unknown_variables(env) == [("LMGATE_MAXNUMSEQS", "LMGATE_MAX_NUM_SEQS"),
                                      ("lmgate_admin_key", "LMGATE_ADMIN_KEY")]
    assert load_config(None, env, {}).max_num_seqs == GatewayConfig().max_num_seqs  # ignored, not refused


def test_every_lmgate_variable_the_code_reads_is_known() -> None:
    """LMGATE_SECRET, LMGATE_CONFIG and the variables other commands read (lmgate chat's
    LMGATE_URL, ...) are not misspelt settings: grep the sources (but gateway/config.py, whose
    docstrings show misspelt ones) for them."""
    import re

    import gateway.config
    from gateway.config import unknown_variables

    root = Path(__file__).resolve().parents[2]
    names = {name for folder in ("gateway", "actors", "cache", "clients", "gpu", "ops")
             for source in (root / folder).rglob("*.py") if source != Path(gateway.config.__file__).resolve()
             for name in re.findall(r"\bLMGATE_[A-Z][A-Z0-9_]*\b", source.read_text(encoding="utf-8"))}
    assert {"LMGATE_SECRET", "LMGATE_CONFIG", "LMGATE_URL", "LMGATE_API_KEY", "LMGATE_HF_CACHE"} <= names
    assert unknown_variables(dict.fromkeys(names, "")) == []


@pytest.mark.parametrize(("name", "value", "message"), [
    ("max_body_bytes", 2**30 + 1, "max_body_bytes must be at most 1073741824"),
    ("max_body_bytes", 10**14, "max_body_bytes must be at most"),
    ("max_ws_frame_bytes", 2**31, "max_ws_frame_bytes must be at most"),
    ("listen_backlog", 65536, "listen_backlog must be at most 65535"),
    ("listen_backlog", 99999999999999, "listen_backlog must be at most 65535"),  # an OverflowError in listen()
])
def test_sizes_have_an_upper_bound(name: str, value: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"LMGATE_" + name.upper(): str(value)}, {})


def test_the_largest_sizes_are_accepted() -> None:
    config = GatewayConfig(max_body_bytes=2**30, max_ws_frame_bytes=2**30, listen_backlog=65535)
    assert (config.max_body_bytes, config.listen_backlog) == (2**30, 65535)


def test_a_data_dir_that_cannot_be_a_folder_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="data_dir .* exists and is not a folder"):
        GatewayConfig(data_dir=str(afile))
    with pytest.raises(ConfigError, match=f"data_dir .* cannot be created: '{afile}' is not a folder"):
        GatewayConfig(data_dir=str(afile / "sub" / "dir"))
    assert GatewayConfig(data_dir=str(tmp_path / "new" / "dir")).data_dir == str(tmp_path / "new" / "dir")


def test_a_short_server_secret_is_refused_with_the_settings() -> None:
    with pytest.raises(ConfigError, match="LMGATE_SECRET must be at least 16 bytes, got 5"):
        load_config(None, {"LMGATE_SECRET": "short"}, {})
    with pytest.raises(ConfigError, match="got 15"):
        load_config(None, {"LMGATE_SECRET": "é" * 7 + "x"}, {})  # bytes, as the HMAC takes it
    assert load_config(None, {"LMGATE_SECRET": "s" * 16}, {}).port == 8000
    assert load_config(None, {"LMGATE_SECRET": ""}, {}).port == 8000  # unset: the data dir's secret file


def test_a_kv_cache_larger_than_the_ram_is_refused() -> None:
    from gateway.config import kv_cache_unavailable

    problem = kv_cache_unavailable(2**40, "cpu")  # 1 EiB
    assert problem is not None and problem.startswith("kv_cache_mb 1099511627776 MiB does not fit in")
    assert kv_cache_unavailable(GatewayConfig().kv_cache_mb, "cpu") is None
    assert kv_cache_unavailable(2**40, "cuda") is None  # the engine finds out, with torch


def test_the_413_names_the_limit_of_its_route() -> None:
    """A route with its own body limit (an admin's PUT /admin/predictor: 64 MiB) must not
    send the client to --max-body-bytes, which does not set it."""
    from quart_trio import QuartTrio
    from werkzeug.exceptions import RequestEntityTooLarge

    from gateway.errors import from_http_exception

    app = QuartTrio("t")
    app.config["MAX_CONTENT_LENGTH"] = 1024

    async def messages() -> tuple[str, str]:
        async with app.test_request_context("/v1/completions", method="POST"):
            app_wide = from_http_exception(RequestEntityTooLarge()).message
        async with app.test_request_context("/admin/predictor", method="PUT"):
            from quart import request

            request.max_content_length = 64 * 1024 * 1024
            route = from_http_exception(RequestEntityTooLarge()).message
        return app_wide, route

    app_wide, route = trio.run(messages)
    assert app_wide == "the request body is larger than the server takes (1024 bytes; its operator sets " \
                       "--max-body-bytes)"
    assert route == "the request body is larger than PUT /admin/predictor takes (67108864 bytes)"


def test_a_server_reachable_from_other_hosts_warns_of_what_it_leaves_open() -> None:
    """The env file of the deployments, its secrets left empty: it starts, and says so."""
    env = {"LMGATE_HOST": "0.0.0.0", "LMGATE_METRICS_KEY": "", "LMGATE_ADMIN_KEY": "", "LMGATE_DEV_TENANT": "false"}
    warnings = start_warnings(load_config(None, env, {}))
    assert [w.split(" ")[0] for w in warnings] == ["/metrics", "no", "no"]
    assert "LMGATE_METRICS_KEY" in warnings[0] and "LMGATE_ADMIN_KEY" in warnings[1] and "REDIS_URL" in warnings[2]
    kept = load_config(None, {**env, "LMGATE_METRICS_KEY": "m", "LMGATE_ADMIN_KEY": "a",
                              "REDIS_URL": "redis://127.0.0.1:6379/0"}, {})
    assert start_warnings(kept) == []
    assert start_warnings(load_config(None, {"LMGATE_HOST": "127.0.0.1"}, {})) == []

    ignored = start_warnings(load_config(None, {"LMGATE_HOST": "127.0.0.1", "LMGATE_KV_RESERVATION": "always"}, {}))
    assert len(ignored) == 1 and "no effect under the 'priority' policy" in ignored[0]
    assert start_warnings(load_config(None, {"LMGATE_HOST": "127.0.0.1", "LMGATE_KV_RESERVATION": "always",
                                             "LMGATE_SCHEDULING_POLICY": "magnus"}, {})) == []


def test_the_settings_other_than_their_defaults_are_listed_without_secrets() -> None:
    config = load_config(None, {"LMGATE_ADMIN_KEY": "adm-secret"}, {
        "port": "8731", "redis_url": "redis://user:hunter2@h:6379/0", "prefix_caching": False})
    listed = non_default_settings(config)
    assert listed == ("port=8731, admin_key='***', redis_url='redis://user:***@h:6379/0', prefix_caching=False")
    assert non_default_settings(load_config(None, {}, {})) == "none"
    # coredis also reads a password from the query
    listed = non_default_settings(load_config(None, {}, {"redis_url": "rediss://h/0?username=u&password=hunter2"}))
    assert "hunter2" not in listed and "redis_url='rediss://h/0?username=u&password=***'" in listed


def test_websockets_are_pinged_as_often_as_sse_streams() -> None:
    assert hypercorn_config(GatewayConfig(sse_ping_seconds=7)).websocket_ping_interval == 7
    assert hypercorn_config(GatewayConfig(sse_ping_seconds=0)).websocket_ping_interval is None
