"""`lmgate predictor ...`: train, inspect, export and import the Magnus length predictor.

    lmgate predictor train -o seed.npz [--requests LOG.jsonl] [--tenant NAME] [--held-out]
    lmgate predictor show seed.npz            (or --redis-url URL: the one a deployment holds)
    lmgate predictor export --redis-url URL -o FILE
    lmgate predictor import FILE --redis-url URL [--force]

Why: a new deployment's predictor is blind for its first ~100 requests (it answers
with a prior, then per-application quantiles, until enough requests have finished to
fit the regressor; docs/scheduling.md measured it), and magnus orders by noise
meanwhile. `train` fits one offline from a log of finished requests — by default the
shipped workload (`ops/workload/requests.jsonl`), whose format any log can take —
and `lmgate serve --predictor-seed FILE` starts from it when Redis holds none.
`export`/`import` move what one deployment learned to another.

The blob is `LengthPredictor.to_bytes()` (a NumPy .npz): the training samples, the
per-application and per-user length histories, and the fitted weights. It holds no
prompt text, but it does hold the tenant, application and user names of the requests
it learned from.

`import` writes to Redis, which a server reads at start-up: import into a stopped
deployment (or restart it after). A running server takes one live through
`PUT /admin/predictor` (docs/api.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from actors.predictor import LengthPredictor, PredictorBlobError


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="predictor_command", required=True, metavar="ACTION")

    p = sub.add_parser("train", help="fit a predictor offline from a log of finished requests",
                       description="Fit the Magnus length predictor offline from a JSONL log of finished "
                                   "requests (one object per line with the keys of ops/workload/requests.jsonl: "
                                   "id, app, tenant, user, messages, prompt_tokens, output_tokens, "
                                   "finish_reason, max_tokens), in log order, as serving would have learned it.")
    p.add_argument("-o", "--output", required=True, help="file to write the predictor to")
    p.add_argument("--requests", default=None,
                   help="the log (default: the shipped multi-application workload, ops/workload/requests.jsonl)")
    p.add_argument("--tenant", default=None,
                   help="take every request to come from this tenant (the one it will serve: per-tenant "
                        "length histories answer for it; e.g. 'dev', the development tenant)")
    p.add_argument("--held-out", action="store_true",
                   help="train on a seeded half of the log and report accuracy on the other half "
                        "(MAE and share within ±25%%, against the per-application mean)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the --held-out split (0 = ops.bench_sched's and bench serve's split)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the embedder (0 = torch default)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("show", help="what a predictor has learned (JSON)")
    p.add_argument("file", nargs="?", default=None, help="a predictor file")
    p.add_argument("--redis-url", default=None, help="instead: the predictor a deployment holds in this Redis")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("export", help="write the predictor a deployment holds in Redis to a file")
    p.add_argument("--redis-url", required=True)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="store a predictor file in a deployment's Redis (read at start-up)")
    p.add_argument("file")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--force", action="store_true", help="replace a predictor Redis already holds")
    p.set_defaults(func=cmd_import)


def _fail(action: str, message: str, code: int = 2) -> int:
    print(f"lmgate predictor {action}: {message}", file=sys.stderr)
    return code


def _read_file(action: str, path: str) -> tuple[tuple[bytes, LengthPredictor] | None, int]:
    """((blob, predictor), 0) from a predictor file, or (None, exit code) with the error printed."""
    try:
        blob = Path(path).read_bytes()
        return (blob, LengthPredictor.from_bytes(blob)), 0
    except OSError as e:
        return None, _fail(action, f"cannot read {path}: {e.strerror or e}")
    except PredictorBlobError as e:
        return None, _fail(action, f"{path}: {e}")


def _read_redis(action: str, url: str) -> tuple[bytes | None, int]:
    """(blob, 0) of the predictor the Redis at `url` holds, or (None, exit code) with the
    error printed (Redis unreachable, or holding none)."""
    blob, code = _run_redis(action, url, _load)
    if not code and blob is None:
        code = _fail(action, f"{url} holds no predictor", 1)
    return blob, code


def _output_problem(path: str) -> str | None:
    """Why `path` cannot be written (checked before a command spends minutes training), or None."""
    folder = Path(path).resolve().parent
    if Path(path).is_dir():
        return f"{path} is a folder"
    if not folder.is_dir():
        return f"no such folder: {folder}"
    if not os.access(folder, os.W_OK):
        return f"cannot write into {folder}"
    return None


def _write(action: str, path: str, blob: bytes) -> int:
    try:
        Path(path).write_bytes(blob)
    except OSError as e:
        return _fail(action, f"cannot write {path}: {e.strerror or e}", 1)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cache.tenants import is_tenant_id
    from ops.bench_sched import features_of, fixture_max_tokens, train_and_evaluate
    from ops.workload.fixture import FIXTURE, FixtureError, load_fixture, split_fixture

    if (problem := _output_problem(args.output)) is not None:
        return _fail("train", problem)
    if args.tenant is not None and not is_tenant_id(args.tenant):
        return _fail("train", f"--tenant {args.tenant!r} is not a tenant id (1-64 of A-Z a-z 0-9 _ . -): "
                              "no tenant could ever read what it learns")
    path = Path(args.requests) if args.requests else FIXTURE
    if not path.is_file():
        return _fail("train", f"no such file: {path}")
    try:
        log = load_fixture(path)
    except FileNotFoundError as e:
        return _fail("train", str(e))
    except (FixtureError, UnicodeDecodeError) as e:
        return _fail("train", f"{path}: not a request log: {e}")
    if not log:
        return _fail("train", f"{path} holds no requests")
    if args.held_out and len(log) < 2:
        return _fail("train", f"--held-out: {path} holds {len(log)} request; half of it cannot train and "
                              "the other half be measured (it needs at least 2)")
    if args.tenant is not None:
        log = [dataclasses.replace(r, tenant=args.tenant) for r in log]
    elif (bad := next((r for r in log if not is_tenant_id(r.tenant)), None)) is not None:
        return _fail("train", f"{path}: request {bad.id!r}: tenant {bad.tenant!r} is not a tenant id (1-64 of "
                              "A-Z a-z 0-9 _ . -): no tenant could ever read what it learns (or give --tenant)")
    from actors.embeddings import SentenceEmbedder

    embedder = SentenceEmbedder(threads=args.threads)
    vectors = embedder.embed([r.instruction for r in log])
    embeddings = {r.id: v for r, v in zip(log, vectors, strict=True)}
    report: dict = {"requests": str(path)}
    if args.held_out:
        train, test = split_fixture(log, seed=args.split_seed)
        try:
            cap = fixture_max_tokens(log)
        except ValueError as e:
            return _fail("train", f"--held-out: {e}")
        predictor, ev = train_and_evaluate(train, test, embeddings, cap)
        report["held_out"] = {"train": ev.n_train, "test": ev.n_test, "mae": round(ev.mae, 1),
                              "within_25pct": round(ev.within_25pct, 3),
                              "per_app_mean_mae": round(ev.baseline_mae, 1),
                              "per_app_mean_within_25pct": round(ev.baseline_within_25pct, 3)}
    else:
        predictor = LengthPredictor()
        predictor.train_offline((features_of(r, r.max_tokens, embeddings[r.id]), r.output_tokens, r.finish_reason)
                                for r in log)
    if code := _write("train", args.output, predictor.to_bytes()):
        return code
    report["output"] = args.output
    report["predictor"] = predictor.summary()
    print(json.dumps(report, indent=2))
    return 0


async def _redis(url: str, fn):
    from cache.store import RedisStore

    async with RedisStore(url, connect_timeout_s=5.0, stream_timeout_s=10.0) as store:
        return await fn(store)


def _run_redis(action: str, url: str, fn) -> tuple[object, int]:
    """`fn(store)` against the Redis at `url`; (result, 0) or (None, exit code) with the
    error printed."""
    import trio

    from cache.store import CacheUnavailable
    from gateway.config import ConfigError, check_redis_url, redis_refusal

    try:
        check_redis_url(url)  # (coredis asserts on, or misreads, what it does not take)
    except ConfigError as e:
        return None, _fail(action, f"--{e}".replace("--redis_url", "--redis-url", 1))
    try:
        try:
            return trio.run(_redis, url, fn), 0
        except BaseExceptionGroup as group:  # coredis runs its connection in a nursery
            raise _first_leaf(group) from group
    except CacheUnavailable as e:
        return None, _fail(action, str(e), 1)
    except PredictorBlobError as e:
        return None, _fail(action, f"Redis holds something that is not a predictor: {e}", 1)
    except (ValueError, OSError) as e:  # a malformed URL, a refused connection
        return None, _fail(action, f"{url}: {e}", 1)
    except Exception as e:
        refused = redis_refusal(e)  # a database the server does not have, credentials it refuses
        if refused is None:
            raise
        return None, _fail(action, refused, 1)


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first exception in a (nested) group that is not itself a group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _load(store) -> bytes | None:
    """The predictor blob Redis holds (validated), or None."""
    from actors.predictor import PredictorService

    blob = await PredictorService(store=store).stored_blob()
    if blob is not None:
        LengthPredictor.from_bytes(blob)
    return blob


def cmd_show(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.redis_url is None):
        return _fail("show", "give a predictor file or --redis-url (one of them)")
    if args.file is not None:
        read, code = _read_file("show", args.file)
        if code:
            return code
        predictor = read[1]
    else:
        blob, code = _read_redis("show", args.redis_url)
        if code:
            return code
        predictor = LengthPredictor.from_bytes(blob)
    print(json.dumps(predictor.summary(), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if (problem := _output_problem(args.output)) is not None:
        return _fail("export", problem)
    blob, code = _read_redis("export", args.redis_url)
    if code:
        return code
    if code := _write("export", args.output, blob):
        return code
    print(json.dumps({"output": args.output, "predictor": LengthPredictor.from_bytes(blob).summary()}, indent=2))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    read, code = _read_file("import", args.file)
    if code:
        return code
    blob, predictor = read
    outcome, code = _run_redis("import", args.redis_url, lambda store: _store(store, blob, args.force))
    if code:
        return code
    if outcome == "held":
        return _fail("import", f"{args.redis_url} already holds a predictor (what that deployment learned); "
                               "--force replaces it", 1)
    if outcome == "changed":
        return _fail("import", f"{args.redis_url} holds another predictor than the one just written (another "
                               "writer, e.g. a running server saving after a refit?); check it with `lmgate "
                               "predictor show --redis-url`", 1)
    print(json.dumps({"imported": args.file, "predictor": predictor.summary()}, indent=2))
    return 0


async def _store(store, blob: bytes, force: bool) -> str:
    """Store the predictor file `blob` as a server saves one: "stored", "held" (Redis holds
    one and not `force`: nothing written) or "changed" (written, but Redis holds other bytes
    when read back). Raises `CacheUnavailable` if Redis did not take the write.

    What is written is the file re-packed (`PredictorService.replace`: the canonical .npz of
    what it holds), not the file: a compressed or earlier-version file is stored as this
    version writes it, so the read-back compares with that."""
    from actors.predictor import PredictorService
    from cache.store import CacheUnavailable

    service = PredictorService(store=store)
    key = store.key(service.key)
    with store.guard():
        held = await store.client.exists([key])
    if held and not force:
        return "held"
    if not await service.replace(blob):  # its save swallows a Redis outage
        raise CacheUnavailable(f"Redis at {store.url} did not take the write ({store.last_error}): the predictor "
                               "was not stored")
    written = service.export()
    with store.guard():
        stored = await store.client.get(key)
    return "stored" if stored == written else "changed"
