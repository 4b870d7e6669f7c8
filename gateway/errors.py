"""OpenAI-style errors: one exception type, one JSON shape, one mapping from status.

Every error the gateway returns (HTTP body, SSE event, WebSocket frame) is::

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Handlers raise `ApiError`; `install_error_handlers` turns it (and Quart/Werkzeug
HTTP errors, and anything unexpected) into that shape with the right status and a
``Retry-After`` header for 429/503. Unexpected exceptions are logged with their
traceback and become a 500 — bad input must never reach that path.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, TypeVar

import msgspec
from quart import Quart, Response, current_app, g, has_request_context, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("lmgate.gateway")
S = TypeVar("S")

# OpenAI's `type` for each status we produce.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
    504: "not_found_error",  # `only-if-cached` with no stored answer (RFC 9111's 504): none was found
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


# C0, DEL, C1, Unicode's line breaks, and its bidirectional marks, embeddings, overrides and
# isolates (a path holding U+202E would show the rest of its log line reversed: "Trojan Source")
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
FAILURE_LINES_PER_S = 10  # `log_failure` lines a second at most: a flood of 401s or 429s logs a count


def loggable(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, its control characters escaped (a newline in a
    path must not start a line of its own in the log)."""
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                              else f"\\u{ord(m.group()):04x}", text[:limit])


class _FailureLines:
    """The budget of `log_failure`: FAILURE_LINES_PER_S lines in each second; what is over
    it is counted, and the count logged with the next second's first line, or by
    `report_dropped_failures` once that second is over (a burst of refusals followed by
    none was reported only with the next error, minutes later, or never)."""

    def __init__(self) -> None:
        self.second = 0
        self.used = 0
        self.dropped = 0

    def take(self, now: float) -> tuple[bool, int]:
        """(whether a line may go out now, how many were dropped before it to report)."""
        second = int(now)
        if second != self.second:
            self.second, self.used = second, 0
        if self.used >= FAILURE_LINES_PER_S:
            self.dropped += 1
            return False, 0
        self.used += 1
        dropped, self.dropped = self.dropped, 0
        return True, dropped

    def overdue(self, now: float) -> int:
        """The lines dropped in a second that is over (to report now: taken), else 0."""
        if not self.dropped or (math.isfinite(now) and int(now) == self.second):
            return 0
        dropped, self.dropped = self.dropped, 0
        return dropped


_failure_lines = _FailureLines()


def _report_dropped(dropped: int) -> None:
    log.info("%d more requests answered with errors were not logged (at most %d lines a second)", dropped,
             FAILURE_LINES_PER_S)


async def report_dropped_failures(every_s: float = 1.0) -> None:
    """Run while the server does: log the count of `log_failure` lines a second's budget
    dropped once that second is over, not only with the next failure's line (and what is
    left when it stops)."""
    import trio

    try:
        while True:
            await trio.sleep(every_s)
            if dropped := _failure_lines.overdue(time.monotonic()):
                _report_dropped(dropped)
    finally:
        if dropped := _failure_lines.overdue(math.inf):
            _report_dropped(dropped)


def log_failure(method: str, path: str, request_id: str, tenant: str, error: ApiError,
                answer_id: str | None = None) -> None:
    """One log line for a request answered with an error, naming its request id (what a
    caller quotes from `X-Request-Id`) and, once it has one, the id of its answer (the
    `chatcmpl-`, `cmpl-`, `resp_` or `embd-` id the server's own lines about it name),
    tenant ("-" before it is known), status, code and
    param; never the message, which may echo part of the request. INFO, as a refusal is
    the caller's to act on (and a 503 of an outage is logged by what failed); WARNING for
    a 500, the server's own failure. At most FAILURE_LINES_PER_S INFO lines a second: a
    flood (a scanner's 404s, a tenant's 429s) is counted in the next line, not logged line
    by line; the 500s are all logged."""
    level = logging.WARNING if error.status == 500 else logging.INFO
    if not log.isEnabledFor(level):
        return
    allowed, dropped = (True, 0) if level > logging.INFO else _failure_lines.take(time.monotonic())
    if not allowed:
        return
    if dropped:
        _report_dropped(dropped)
    param = f" param {loggable(error.param, 100)}" if error.param else ""
    answer = f" ({answer_id})" if answer_id else ""
    log.log(level, "request %s%s %s %s: %d %s%s (tenant %s)", loggable(request_id, 200), answer, method,
            loggable(path, 200),
            error.status, error.code or error.type, param, tenant)


class ApiError(Exception):
    """An error with an HTTP status, rendered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        admission_saw: bool = False,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        # OpenAI's type for a spent quota is the code itself
        self.type = type or ("insufficient_quota" if code == "insufficient_quota" else error_type(status))
        # admission refused the request (and counted it) or ran it (its failure is no refusal)
        self.admission_saw = admission_saw
        # False: `x-should-retry: false` whatever the status (a change whose outcome is unknown)
        self.should_retry = should_retry

    @property
    def refused_before_admission(self) -> bool:
        """A refusal the gateway made before admission saw the request (a body or parameter it
        refuses, an unknown model, a server draining): what `lmgate_rejections_total` counts
        beside admission's own refusals. A 401 has no tenant to count it under; a 5xx other
        than 503 is a failure, not a refusal."""
        return not self.admission_saw and self.status != 401 and (self.status < 500 or self.status == 503)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def event_body(self) -> dict[str, Any]:
        """`body()` as a stream event carries it: with `retry_after` (seconds) beside the
        error, as a WebSocket frame does, since a stream's headers went out before it."""
        return self.body() if self.retry_after is None else {**self.body(), "retry_after": round(self.retry_after, 3)}

    def headers(self) -> dict[str, str]:
        """`Retry-After`; and `x-should-retry: false` (which the OpenAI SDKs obey before their
        default of retrying every 429) on a 429 that retrying soon cannot help: a spent daily
        budget, a request larger than a limit; and on any answer made with `should_retry=False`."""
        out = {}
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.should_retry is False or (
                self.status == 429 and (self.retry_after is None or self.code == "insufficient_quota")):
            out["x-should-retry"] = "false"
        return out

    def response(self) -> Response:
        return Response(
            msgspec.json.encode(self.body()),
            status=self.status,
            headers=self.headers(),
            content_type="application/json",
        )


def from_http_exception(exc: HTTPException) -> ApiError:
    status = exc.code or 500
    codes = {
        404: "not_found",
        405: "method_not_allowed",
        413: "request_too_large",
        400: "bad_request",
        408: "request_timeout",
    }
    message = exc.description or exc.name
    if status == 413:  # Werkzeug's "The data value transmitted exceeds the capacity limit." says neither
        message = _too_large_message()
    elif status == 404 and has_request_context() and "//" in request.path:
        # (paths are not merged: a base URL ending in "/" joined to a path starting with one)
        message = f"no route {request.path[:100]!r}: its path has a doubled slash"
    return ApiError(status, message, code=codes.get(status))


def _too_large_message() -> str:
    """The 413's message: the limit that applied to this request, and what sets it. That is
    `--max-body-bytes` (the app's MAX_CONTENT_LENGTH) unless the request class gave the
    route its own (an admin's `PUT /admin/predictor`: `app.MAX_PREDICTOR_BYTES`), which
    that flag does not control."""
    limit = request.max_content_length if has_request_context() else None
    if not limit:
        return "the request body is larger than the server takes"
    if limit == current_app.config.get("MAX_CONTENT_LENGTH"):
        return f"the request body is larger than the server takes ({limit} bytes; its operator sets --max-body-bytes)"
    return f"the request body is larger than {request.method} {request.path} takes ({limit} bytes)"


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        g.api_error = exc  # `lmgate_rejections_total` counts it if refused before admission (gateway.app)
        return exc.response()

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        g.api_error = error = from_http_exception(exc)
        response = error.response()
        for name, value in exc.get_headers():  # a 405's Allow (RFC 9110 §15.5.6)
            if name.lower() == "allow":
                response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error while serving request %s", getattr(g, "request_id", "-"))
        return ApiError(500, "internal server error", code="internal_error").response()


def decode_json(raw: bytes, kind: type[S]) -> S:
    """A JSON body decoded into `kind` (a msgspec Struct), or the 400 that says why not:
    wrong types or missing fields naming the field (`param_of`), malformed JSON, bad UTF-8,
    nesting deeper than the decoder recurses."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, invalid_request(exc), code=code_of(exc), param=param_of(exc)) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise malformed_json(raw, exc) from exc
    except RecursionError as exc:  # msgspec's decoder recurses per nesting level
        raise ApiError(400, "malformed JSON: nested too deeply", code="invalid_json") from exc


# A \uD800-\uDBFF escape (not itself escaped: an even run of backslashes before it) that no
# \uDC00-\uDFFF escape follows: msgspec reports such a lone high surrogate as "Input data
# was truncated", which sends a client looking for a cut body.
_LONE_HIGH_SURROGATE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def malformed_json(raw: bytes | str, exc: Exception, *, frame: bool = False) -> ApiError:
    """The 400 for a request body (or WebSocket `frame`) msgspec could not parse, saying
    why in the client's terms: not UTF-8 (`invalid_encoding`), a lone UTF-16 surrogate
    escape, or msgspec's own message. Runs on the error path only."""
    what = "JSON frame" if frame else "JSON"
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return ApiError(400, f"{'frame' if frame else 'request body'} is not valid UTF-8", code="invalid_encoding")
    lone = _LONE_HIGH_SURROGATE.search(data)
    if lone is not None:
        escape = lone.group().lstrip(b"\\").decode("ascii")
        return ApiError(400, f"malformed {what}: \\{escape} at byte {lone.end() - 6} is half of a UTF-16 surrogate "
                             "pair (a lone surrogate is not text)", code="invalid_json")
    return ApiError(400, f"malformed {what}: {exc}", code="invalid_json")


MAX_ECHO_CHARS = 200  # of a client's value echoed in a 400's message


def invalid_request(exc: msgspec.ValidationError, what: str = "invalid request") -> str:
    """A msgspec validation error as a 400's message, `what` first. msgspec quotes the whole
    bad value ("Invalid enum value 'ZZZ…'"), and a role of a megabyte came back whole (a
    gzip body of 1 kB got an answer of 1 MB): the value and its path are cut to
    `MAX_ECHO_CHARS` each, as a model name is."""
    text = str(exc)
    said, sep, where = text.rpartition(" - at `")
    if not sep:
        said, where = text, ""
    if len(said) > MAX_ECHO_CHARS:
        said = said[:MAX_ECHO_CHARS] + "..."
    if len(where) > MAX_ECHO_CHARS:
        where = where[:MAX_ECHO_CHARS] + "..."
    return f"{what}: {said}{sep}{where}"


def code_of(exc: msgspec.ValidationError) -> str:
    """A msgspec validation error's code: a field missing is OpenAI's
    `missing_required_parameter` (as the routes' own checks say it), else `invalid_value`."""
    return "missing_required_parameter" if "missing required field `" in str(exc) else "invalid_value"


def param_of(exc: msgspec.ValidationError) -> str | None:
    """The top-level request field a msgspec validation error is about (an error's
    `param`): its path ("... - at `$.messages[0].content`" → "messages"), or, at the top
    level, the missing or unknown field ("Object missing required field `prompt`" → "prompt",
    "Object contains unknown field `rpm`" → "rpm")."""
    text = str(exc)
    marker = "at `$."
    if marker in text:
        path = text.split(marker, 1)[1].rstrip("`")
        return path.split("[", 1)[0].split(".", 1)[0] or None
    for marker in ("missing required field `", "contains unknown field `"):
        if marker in text:
            return text.split(marker, 1)[1].split("`", 1)[0] or None
    return None
