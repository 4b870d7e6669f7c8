"""gateway.errors: the 400s for bodies msgspec cannot parse say why in the client's terms."""

from __future__ import annotations

import logging
from typing import Literal

import msgspec
import pytest

from gateway.errors import ApiError, decode_json
from gateway.ws import decode_frame


class Body(msgspec.Struct):
    text: str


def _error(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode_json(raw, Body)
    return info.value


@pytest.mark.parametrize("escape", [rb"\ud83d", rb"\uD800", rb"\udbff"])
def test_a_lone_high_surrogate_is_named_not_called_truncated(escape: bytes) -> None:
    raw = b'{"text": "ab' + escape + b'"}'
    error = _error(raw)
    assert (error.status, error.code) == (400, "invalid_json")
    assert "truncated" not in error.message
    assert escape.decode() in error.message and f"byte {raw.index(escape)}" in error.message
    assert "surrogate" in error.message


def test_a_surrogate_pair_decodes_and_an_escaped_backslash_is_no_escape() -> None:
    assert decode_json(rb'{"text": "\ud83d\ude00"}', Body).text == "\U0001f600"
    assert decode_json(rb'{"text": "\\ud800"}', Body).text == "\\ud800"  # a backslash, then "ud800"
    # a truly cut body still says so; an escaped backslash before it is not an escape
    assert "truncated" in _error(rb'{"text": "\\ud800').message


def test_bad_utf8_is_an_encoding_error_on_every_decoder() -> None:
    error = _error(b'{"text": "\xff"}')
    assert (error.code, error.message) == ("invalid_encoding", "request body is not valid UTF-8")
    with pytest.raises(ApiError) as info:
        decode_frame(b'{"type": "cancel", "id": "\xff"}')
    assert (info.value.code, info.value.message) == ("invalid_encoding", "frame is not valid UTF-8")


def test_a_websocket_frame_names_its_lone_surrogate() -> None:
    with pytest.raises(ApiError) as info:
        decode_frame('{"type": "cancel", "id": "\\ud800"}')
    assert info.value.code == "invalid_json"
    assert info.value.message.startswith("malformed JSON frame: \\ud800 at byte 26")


class Roles(msgspec.Struct):
    role: Literal["user", "assistant"]


def test_a_huge_bad_value_is_not_echoed_whole() -> None:
    """msgspec quotes the whole bad value: a megabyte role came back as a megabyte 400 (to a
    1 kB gzip body). The value is cut; the field's path stays."""
    with pytest.raises(ApiError) as info:
        decode_json(b'{"role": "' + b"Z" * 1_000_000 + b'"}', Roles)
    assert info.value.status == 400 and len(info.value.message) < 500
    assert info.value.message.startswith("invalid request: Invalid enum value 'ZZZ")
    assert info.value.message.endswith("... - at `$.role`")
    with pytest.raises(ApiError) as info:
        decode_frame(b'{"type": "' + b"Z" * 1_000_000 + b'"}')
    assert info.value.code == "invalid_frame" and len(info.value.message) < 500
    # short ones stay as they were
    assert _error(b'{"text": 1}').message == "invalid request: Expected `str`, got `int` - at `$.text`"


def test_failed_requests_are_logged_at_most_ten_lines_a_second(monkeypatch, caplog) -> None:
    """A scanner's 404s or a tenant's 429s must not flood the log (a journal's rate limit
    would then drop the server's other lines): the lines over the budget are counted."""
    import gateway.errors as errors

    now = [1000.0]
    monkeypatch.setattr(errors.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(errors, "_failure_lines", errors._FailureLines())
    with caplog.at_level(logging.INFO, logger="lmgate.gateway"):
        for i in range(13):
            errors.log_failure("POST", "/v1/chat/completions", f"req_{i}", "t1",
                               ApiError(429, "slow down", code="rate_limit_exceeded"))
        errors.log_failure("GET", "/v1/y", "req_500", "-", ApiError(500, "m", code="internal_error"))  # (never dropped)
        now[0] += 1.0
        errors.log_failure("GET", "/v1/x\u2028forged\x85\u202egnp.exe\u2066", "req_z", "-",
                           ApiError(504, "m", code="not_cached"))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[:2] == [("INFO", f"request req_{i} POST /v1/chat/completions: 429 rate_limit_exceeded (tenant t1)")
                         for i in range(2)]
    assert len(lines) == 13 and "slow down" not in caplog.text
    assert lines[10] == ("WARNING", "request req_500 GET /v1/y: 500 internal_error (tenant -)")
    assert lines[11] == ("INFO", "3 more requests answered with errors were not logged (at most 10 lines a second)")
    assert lines[12] == ("INFO", "request req_z GET /v1/x\\u2028forged\\x85\\u202egnp.exe\\u2066: 504 not_cached "
                                 "(tenant -)")


async def test_a_burst_of_failures_is_reported_once_its_second_is_over(monkeypatch, caplog) -> None:
    """The lines a burst dropped are counted in the log when its second ends, not with the
    next failure's line (an audit: minutes later, with that line's time, or never)."""
    import trio

    import gateway.errors as errors

    now = [2000.0]
    monkeypatch.setattr(errors.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(errors, "_failure_lines", errors._FailureLines())
    with caplog.at_level(logging.INFO, logger="lmgate.gateway"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(errors.report_dropped_failures, 0.01)
            for i in range(40):
                errors.log_failure("POST", "/v1/completions", f"req_{i}", "-", ApiError(401, "no", code="invalid_api_key"))
            await trio.sleep(0.05)
            assert len(caplog.records) == 10  # (the second is not over)
            now[0] += 1.0
            await trio.sleep(0.05)
            assert caplog.records[-1].getMessage().startswith("30 more requests answered with errors were not logged")
            for i in range(12):
                errors.log_failure("POST", "/v1/completions", f"again_{i}", "-", ApiError(401, "no", code="invalid_api_key"))
            nursery.cancel_scope.cancel()  # (the server stops: what is left is reported)
    assert caplog.records[-1].getMessage().startswith("2 more requests answered with errors were not logged")
    assert len(caplog.records) == 10 + 1 + 10 + 1
