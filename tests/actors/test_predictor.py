"""Generation-length predictor: cold quantiles, online ridge, runaways, user history, Redis persistence."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import trio

from actors.messages import ChatMessage, GenerateCall, StreamEvent, TenantContext
from actors.predictor import (
    SHARE_KEY,
    LengthModelConfig,
    LengthPredictor,
    PredictorBlobError,
    PredictorService,
    RequestFeatures,
    RunningLengthEstimator,
    instruction_of,
    inverse_mills,
    survival_quantiles,
)
from actors.state import RequestState
from gpu.sampling import SamplingParams

RNG = np.random.default_rng(0)
APP_EMB = {a: v / np.linalg.norm(v) for a, v in zip("ab", RNG.normal(size=(2, 384)), strict=True)}


def feats(app: str, prompt: int, user: str | None = None, max_tokens: int = 512) -> RequestFeatures:
    return RequestFeatures("t", app, user, prompt, max_tokens, APP_EMB[app].astype(np.float32))


def truth(app: str, prompt: int, user: str | None = None) -> int:
    """App a: output follows input (2×); app b: short and flat, except user 'verbose'."""
    if app == "a":
        return 2 * prompt
    return 200 if user == "verbose" else 20


def train(p: LengthPredictor, n: int = 300, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        app = "ab"[int(rng.integers(2))]
        user = ["terse", "verbose"][int(rng.integers(2))] if app == "b" else None
        prompt = int(rng.integers(20, 200))
        p.observe(feats(app, prompt, user), truth(app, prompt, user))
        if p.num_samples % 100 == 0:  # a few online refits (each is O(n³))
            p.fit()


def test_running_estimator_keeps_its_interface():
    est = RunningLengthEstimator()
    assert est.predict("t", "app", 64).source == "prior"
    for n in (10, 12, 14):
        est.observe("t", "app", n)
    assert est.predict("t", "app", 64).tokens == pytest.approx(12)


def test_cold_start_answers_with_per_app_quantiles():
    p = LengthPredictor(LengthModelConfig(min_fit_samples=1000))
    assert p.predict(feats("a", 50)).source == "prior"
    for n in (10, 20, 30, 40, 50):
        p.observe(feats("a", 50), n)
    pred = p.predict(feats("a", 50))
    assert pred.source == "app-quantile"
    assert pred.tokens == pytest.approx(30)
    assert pred.std > 0


def test_cold_quantiles_take_lengths_cut_short_as_lower_bounds():
    """An app whose requests were all cut at max_tokens 2 predicted 2 ± 0 tokens for a
    story (an audit): a history of cut lengths has no median, and the next level answers
    (here app a's, through the tenant's). With some cut, its Kaplan-Meier median answers."""
    p = LengthPredictor(LengthModelConfig(min_fit_samples=1000))
    for n in (100, 120, 140, 160, 180):
        p.observe(feats("a", 50), n)
    for _ in range(6):
        p.observe(feats("b", 50, max_tokens=2), 2, "length")
    pred = p.predict(feats("b", 50))
    assert pred.source == "tenant-quantile" and pred.tokens >= 100, pred
    for n in (30, 40, 50, 60):  # b's own: 6 cut at 2, then these
        p.observe(feats("b", 50), n)
    pred = p.predict(feats("b", 50))
    assert (pred.source, pred.tokens) == ("app-quantile", 40), pred  # (read as lengths, six 2s: a median of 2)
    restored = LengthPredictor.from_bytes(p.to_bytes(), p.config)  # (the blob keeps which were cut)
    assert restored.predict(feats("b", 50)) == pred
    restored.observe(feats("b", 50), 70)
    assert restored.predict(feats("b", 50)).tokens == 50


def test_survival_quantiles_are_kaplan_meiers() -> None:
    assert survival_quantiles([1, 2, 3, 4], [False] * 4, (0.25, 0.5, 0.75)) == [1, 2, 3]
    assert survival_quantiles([2, 2, 2], [True] * 3, (0.5,)) == [None]
    # one cut at 10 beside an end at 10: the end counts first; the cut leaves 20 alone at risk
    assert survival_quantiles([5, 10, 10, 20], [False, True, False, False], (0.25, 0.5, 0.75)) == [5, 10, 20]
    assert survival_quantiles([2, 2, 2, 10, 20, 30], [True] * 3 + [False] * 3, (0.25, 0.5, 1.0)) == [10, 20, 30]
    assert survival_quantiles([3, 8], [False, True], (0.5, 0.75)) == [3, None]


def test_online_model_learns_length_from_input_and_application():
    p = LengthPredictor()
    train(p)
    assert p.model is not None
    for prompt in (40, 100, 180):
        pred = p.predict(feats("a", prompt))
        assert pred.source == "model"
        assert abs(pred.tokens - 2 * prompt) <= 0.25 * 2 * prompt, (prompt, pred)
    assert p.predict(feats("b", 150, "terse")).tokens < 40  # long input, short app: not fooled


def test_user_history_separates_users_of_the_same_app():
    p = LengthPredictor()
    train(p)
    verbose = p.predict(feats("b", 100, "verbose")).tokens
    terse = p.predict(feats("b", 100, "terse")).tokens
    assert verbose > 3 * terse


def test_predictions_carry_uncertainty_and_respect_max_tokens():
    p = LengthPredictor()
    train(p)
    pred = p.predict(feats("a", 190, max_tokens=100))
    assert pred.tokens <= 100
    assert pred.std > 0


def test_round_trip_through_bytes_predicts_the_same():
    p = LengthPredictor()
    train(p, n=120)
    q = LengthPredictor.from_bytes(p.to_bytes())
    for app, prompt, user in (("a", 77, None), ("b", 50, "verbose"), ("b", 50, "terse")):
        assert q.predict(feats(app, prompt, user)) == p.predict(feats(app, prompt, user))
    assert q.num_samples == p.num_samples


def test_runaways_are_learned_as_the_chance_of_running_to_the_cap():
    """App b's 'verbose' user never stops (cut at max_tokens 512); 'terse' stops at 20.
    The hurdle model predicts the cap for the one and the stop length for the other,
    and scales the runaway's prediction with the request's own cap."""
    p = LengthPredictor()
    rng = np.random.default_rng(2)
    for _ in range(200):
        user = ["terse", "verbose"][int(rng.integers(2))]
        prompt = int(rng.integers(20, 200))
        if user == "verbose":
            p.observe(feats("b", prompt, user), 512, "length")
        else:
            p.observe(feats("b", prompt, user), 20, "stop")
        p.observe(feats("a", prompt), 2 * prompt, "stop")
    p.fit()
    assert p.model is not None and p.model.runaway is not None
    verbose = p.predict(feats("b", 100, "verbose"))
    assert verbose.tokens > 0.8 * 512
    assert p.predict(feats("b", 100, "verbose", max_tokens=300)).tokens > 0.8 * 300
    terse = p.predict(feats("b", 100, "terse"))
    assert terse.tokens < 40
    assert abs(p.predict(feats("a", 100)).tokens - 200) <= 50  # the stop lengths are not pulled up


def test_a_request_cut_at_a_small_cap_is_censored_not_a_runaway():
    """Cut at max_tokens 32, app a's requests (which stop at 2x their input) teach neither
    model: the prediction at a large cap still comes from the ones that stopped."""
    p = LengthPredictor()
    rng = np.random.default_rng(3)
    for _ in range(150):
        prompt = int(rng.integers(20, 200))
        p.observe(feats("a", prompt), 2 * prompt, "stop")
        p.observe(feats("a", prompt, max_tokens=32), 32, "length")
    p.fit()
    assert p.model is not None and p.model.runaway is None  # no runaway seen
    assert abs(p.predict(feats("a", 150)).tokens - 300) <= 75
    assert p.num_stopped == 150 and p.num_samples == 300


def capped_at(p: LengthPredictor, cap: int, n: int = 300, median: float = 150.0, seed: int = 4) -> None:
    """App b's answers run log-normally around `median` tokens; its clients cap max_tokens
    at `cap` (< runaway_min_tokens): an answer past it is cut there (censored)."""
    rng = np.random.default_rng(seed)
    for length in np.exp(rng.normal(np.log(median), 0.4, size=n)).astype(int):
        f = feats("b", int(rng.integers(20, 200)), max_tokens=cap)
        p.observe(f, int(length), "stop") if length < cap else p.observe(f, cap, "length")


def test_requests_cut_at_a_small_cap_teach_that_they_ran_at_least_that_long():
    """Clients capping max_tokens at 100 for answers of ~150 tokens: only the answers
    shorter than 100 stop (a sixth of them), so a model fitted on those alone predicted
    ~80 for every request of the app, whatever its cap, for as long as the clients
    capped (an audit: ~40 against a true mean of 123). Each cut one says it ran at least
    100 tokens: with them, the prediction at a larger cap is the answers' own median."""
    p = LengthPredictor()
    capped_at(p, 100)
    p.fit()
    assert 0.05 * p.num_samples < p.num_stopped < 0.3 * p.num_samples
    assert 150 / 1.25 <= p.predict(feats("b", 100)).tokens <= 150 * 1.25
    stopped_only = LengthPredictor(LengthModelConfig(censored_rounds=0))
    capped_at(stopped_only, 100)
    stopped_only.fit()
    assert stopped_only.predict(feats("b", 100)).tokens < 100  # (what it was: the lengths under the cap)


def test_the_censored_fit_reaches_its_fixed_point() -> None:
    """With most requests cut (at 64, answers of ~120), plain EM stopped 50 rounds short of
    its optimum (by 7% in a review's case); accelerated, a fit started from its own result
    moves no prediction by more than 0.1% (a row of its own, the app's first request, may
    move more: its features are the prior's, a direction only it spans)."""
    from actors.predictor import CENSORED, STOP, LengthModel

    p = LengthPredictor(LengthModelConfig(max_samples=1500))
    capped_at(p, 64, n=1500, median=120)
    x, y, kind = p.snapshot()
    model = p.train((x, y, kind))
    xs, ys, xc, cut = x[kind == STOP], y[kind == STOP], x[kind == CENSORED], y[kind == CENSORED]
    assert 0.9 * len(x) < len(xc) < len(x) - p.config.min_fit_samples
    again = p._with_censored(xs, ys, xc, cut, model.length)
    p.install(model)
    first = [p.predict(feats("b", prompt)).tokens for prompt in (30, 100, 180)]
    p.install(LengthModel(again, model.runaway))
    assert np.allclose([p.predict(feats("b", prompt)).tokens for prompt in (30, 100, 180)], first, rtol=1e-3)
    assert all(t > 75 for t in first), first  # (past the cut; below the truth, 120: `sigma` is the stopped ones')


def test_a_cut_request_brings_the_next_refit_nearer_only_when_it_says_something() -> None:
    """One cut near or past the model's prediction counts toward the next refit (the
    refit takes it longer); one cut far below it (max_tokens 2 for ~150-token answers)
    moves nothing and counts for nothing."""
    p = LengthPredictor(LengthModelConfig(refit_every=8, refit_fraction=0.0))
    capped_at(p, 100)
    p.fit()
    for k in range(40):
        p.observe(feats("b", 30 + k, max_tokens=2), 2, "length")
    assert not p.needs_refit()
    for k in range(7):
        p.observe(feats("b", 30 + k, max_tokens=200), 200, "length")
    assert not p.needs_refit()
    p.observe(feats("b", 40, max_tokens=200), 200, "length")
    assert p.needs_refit()


def test_the_inverse_mills_ratio_is_the_mean_above_a_cut() -> None:
    z = np.array([-40.0, -2.0, 0.0, 1.0, 5.0, 29.0, 31.0, 1e6])
    got = inverse_mills(z)
    assert got[0] == pytest.approx(0.0, abs=1e-300) and got[2] == pytest.approx(np.sqrt(2 / np.pi))
    assert got[1] == pytest.approx(0.05524, rel=1e-3) and got[3] == pytest.approx(1.52514, rel=1e-4)
    assert got[4] == pytest.approx(5.18650, rel=1e-4)
    assert np.all(got[4:] > z[4:]) and np.all(np.diff(got) > 0) and np.all(np.isfinite(got))
    assert got[5] == pytest.approx(got[6] - 2.0, rel=1e-3)  # (continuous where the asymptote takes over)


def test_mean_point_prediction_sits_between_the_modes_and_bad_points_are_refused():
    p = LengthPredictor(LengthModelConfig(point="mean"))
    for k in range(60):
        user = "verbose" if k % 2 else "terse"
        p.observe(feats("b", 30 + k, user), 512 if user == "verbose" else 20, "length" if user == "verbose" else "stop")
    p.fit()
    both = p.predict(feats("b", 50, "new-user"))  # no history: the model is unsure
    assert 20 < both.tokens < 512 and both.std > 0
    with pytest.raises(ValueError, match="point"):
        LengthModelConfig(point="mode")


def test_round_trip_keeps_the_runaway_model():
    p = LengthPredictor()
    for k in range(60):
        p.observe(feats("b", 30 + k, "verbose"), 512, "length")
        p.observe(feats("b", 30 + k, "terse"), 20, "stop")
    p.fit()
    assert p.model.runaway is not None
    q = LengthPredictor.from_bytes(p.to_bytes())
    for user in ("verbose", "terse"):
        assert q.predict(feats("b", 50, user)) == p.predict(feats("b", 50, user))
    assert q.num_stopped == p.num_stopped


def state(app: str, prompt_len: int, user: str) -> RequestState:
    send, _ = trio.open_memory_channel[StreamEvent](4)
    params = SamplingParams(max_tokens=512)
    msgs = [ChatMessage("system", "sys"), ChatMessage("user", "hello"), ChatMessage("user", "later")]
    call = GenerateCall("r", TenantContext("t"), "m", params, messages=msgs, user=user, app=app)
    return RequestState(call, list(range(prompt_len)), params, 0, send)


def test_instruction_is_system_prompt_and_first_user_turn():
    assert instruction_of(state("a", 3, "u").call) == "sys\nhello"


def test_a_lora_adapter_is_the_application_when_no_tag_names_one():
    st = state(None, 3, "u")  # type: ignore[arg-type]
    st.adapter = "support-bot"
    assert st.app == "support-bot"
    tagged = state("billing", 3, "u")
    tagged.adapter = "support-bot"
    assert tagged.app == "billing"


class _GatedTrain(LengthPredictor):
    """A predictor whose first refit is held in its worker thread until released, so
    the test sees a prediction served *during* a refit without depending on timing."""

    def __init__(self, config: LengthModelConfig) -> None:
        super().__init__(config)
        self.gate = threading.Event()

    def train(self, *args, **kwargs):
        self.gate.wait(timeout=30)
        return super().train(*args, **kwargs)


async def test_service_refits_in_the_background_and_persists_in_redis(store):
    predictor = _GatedTrain(LengthModelConfig(min_fit_samples=16, refit_every=8))
    svc = PredictorService(predictor, store=store)
    served_during_refit = 0
    async with trio.open_nursery() as nursery:
        for k in range(40):
            st = state("a", 20 + k, "u")
            with trio.fail_after(5):  # predictions never wait for a refit (one is held open)
                pred, f = await svc.predict(st)
            assert pred.tokens > 0
            if svc.refitting:
                served_during_refit += 1
                predictor.gate.set()
            await svc.observe(f, 2 * (20 + k), nursery)
            await trio.sleep(0.02)  # requests arrive over time; a refit runs meanwhile
    assert svc.refits >= 1
    assert served_during_refit > 0
    assert svc.predictor.model is not None
    expected = svc.predictor.predict(svc.features(state("a", 50, "u"), None))
    restarted = PredictorService(store=store)
    assert await restarted.load()
    got = restarted.predictor.predict(restarted.features(state("a", 50, "u"), None))
    assert got == expected


async def test_a_refit_that_raises_is_counted_and_the_model_goes_on_answering() -> None:
    """A refit raising in the background must not escape into the nursery that started it
    (the predictor actor's: an audit saw it cancel the actor mid-batch, and requests hang)."""

    class Failing(LengthPredictor):
        def train(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise RuntimeError("simulated refit bug")

    svc = PredictorService(Failing(LengthModelConfig(min_fit_samples=4, refit_every=4)))
    async with trio.open_nursery() as nursery:
        for k in range(12):
            pred, f = await svc.predict(state("a", 20 + k, "u"))
            await svc.observe(f, 40 + k, nursery)
            await trio.sleep(0)
    assert svc.refit_failures >= 1 and svc.refits == 0 and not svc.refitting
    failures = svc.refit_failures
    async with trio.open_nursery() as nursery:  # the next observation tries again
        await svc.observe(f, 40, nursery)
    assert svc.refit_failures == failures + 1
    assert svc.predictor.model is None  # (the quantiles go on answering)


async def test_load_without_anything_stored_is_false(store):
    assert not await PredictorService(store=store).load()


@pytest.mark.parametrize("n", [40, 390, 391, 900])
def test_ridge_loo_residuals_are_exact_in_either_space(n: int) -> None:
    """The primal (d×d) form used once samples outnumber features gives the kernel form's
    leave-one-out residuals, which equal refitting without each sample."""
    from actors.predictor import ridge_loo_residuals

    rng = np.random.default_rng(n)
    d = 390
    x = rng.normal(size=(n, d))
    y = x[:, :6] @ rng.normal(size=6) + rng.normal(size=n)
    pen = np.full(d, 3.0)
    pen[:6] = 1e-3
    got = ridge_loo_residuals(x, y, pen)
    xs = x / np.sqrt(pen)
    k = xs @ xs.T
    h = k @ np.linalg.inv(k + np.eye(n))
    np.testing.assert_allclose(got, (y - h @ y) / (1 - np.diag(h)), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ridge_loo_residuals(x, y, pen, x.T @ x), got, rtol=1e-12, atol=1e-12)
    for i in (0, n - 1):  # by definition: fit on the others, predict the one left out
        keep = np.arange(n) != i
        w = np.linalg.solve(x[keep].T @ x[keep] + np.diag(pen), x[keep].T @ y[keep])
        assert got[i] == pytest.approx(y[i] - x[i] @ w, rel=1e-6, abs=1e-8)


# ---------------------------------------------------------------- blobs, seeds, offline training
def trained(n: int = 120, seed: int = 1) -> LengthPredictor:
    p = LengthPredictor()
    train(p, n=n, seed=seed)
    p.fit()
    return p


@pytest.mark.parametrize("blob", [b"", b"not a predictor", b"PK\x03\x04 truncated zip"], ids=["empty", "text", "zip"])
def test_from_bytes_refuses_what_is_not_a_predictor(blob: bytes) -> None:
    with pytest.raises(PredictorBlobError, match="not a length-predictor blob") as err:
        LengthPredictor.from_bytes(blob)
    assert "pickle" not in str(err.value)  # np.load's guess at what the bytes are is not the user's problem


def test_from_bytes_refuses_an_npz_that_is_not_a_predictor_and_one_of_another_embedding_size() -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, weights=np.ones(3))
    with pytest.raises(PredictorBlobError, match="no 'y' array"):
        LengthPredictor.from_bytes(buf.getvalue())
    small = LengthPredictor(LengthModelConfig(emb_dim=8))
    for k in range(30):
        small.observe(RequestFeatures("t", "a", None, 10 + k, 256, np.ones(8, dtype=np.float32) / np.sqrt(8)), 20 + k)
    small.fit()
    with pytest.raises(PredictorBlobError, match="embedding size 384"):
        LengthPredictor.from_bytes(small.to_bytes())


def test_summary_counts_what_was_learned() -> None:
    p = LengthPredictor(LengthModelConfig(runaway_min_tokens=256))
    assert p.summary()["fitted"] is False and p.summary()["samples"] == 0
    train(p, n=60)
    p.observe(feats("a", 100, max_tokens=512), 512, "length")  # a runaway
    p.observe(feats("a", 100, max_tokens=64), 64, "length")  # censored: cut at a small cap
    p.fit()
    s = p.summary()
    assert (s["samples"], s["stopped"], s["runaways"], s["censored"]) == (62, 60, 1, 1)
    assert s["fitted"] and s["answers_from"] == "model" and s["fitted_on"] == 61  # (the cut one too)
    assert s["length_sigma"] > 0 and not s["runaway_model"]  # one runaway is below min_runaway_samples
    assert sum(s["apps"].values()) == 62 and set(s["apps"]) == {"t/a", "t/b"}
    assert s["users"] == 2  # the two users of app b


def test_train_offline_learns_a_log_as_online_serving_would() -> None:
    rng = np.random.default_rng(3)
    log = []
    for _ in range(200):
        app = "ab"[int(rng.integers(2))]
        user = ["terse", "verbose"][int(rng.integers(2))] if app == "b" else None
        prompt = int(rng.integers(20, 200))
        log.append((feats(app, prompt, user), truth(app, prompt, user), "stop"))
    p = LengthPredictor()
    p.train_offline(log)
    assert p.model is not None and p.num_samples == 200
    assert abs(p.predict(feats("a", 150)).tokens - 300) / 300 < 0.25
    assert p.predict(feats("b", 50, "verbose")).tokens > 3 * p.predict(feats("b", 50, "terse")).tokens
    few = LengthPredictor()
    few.train_offline([(feats("a", 100), 200, "stop")] * 5)  # below min_fit_samples: quantiles answer
    assert few.model is None and few.predict(feats("a", 150)).source == "app-quantile"


async def test_load_or_seed_never_overwrites_what_redis_holds(store) -> None:
    first, other = trained(seed=1), trained(n=60, seed=7)
    assert await PredictorService(store=store).load_or_seed(None) == "cold"
    svc = PredictorService(store=store)
    assert await svc.load_or_seed(first.to_bytes()) == "seeded"
    assert svc.predictor.num_samples == first.num_samples
    restarted = PredictorService(store=store)
    assert await restarted.load_or_seed(other.to_bytes()) == "restored"  # the deployment's own, not the seed
    f = feats("b", 50, "verbose")
    assert restarted.predictor.predict(f) == first.predict(f) != other.predict(f)
    with pytest.raises(PredictorBlobError):
        await PredictorService().load_or_seed(b"garbage")


async def test_replace_serves_the_new_predictor_and_discards_a_refit_that_was_running(store) -> None:
    gated = _GatedTrain(LengthModelConfig(min_fit_samples=16, refit_every=8))
    train(gated, n=40)
    svc = PredictorService(gated, store=store)
    replacement = trained(seed=5)
    f = feats("a", 120)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.refit)
        await trio.sleep(0.05)
        assert svc.refitting
        assert await svc.replace(replacement.to_bytes())  # saved to Redis
        gated.gate.set()
    assert svc.predictor is not gated and svc.predictor.predict(f) == replacement.predict(f)
    assert svc.refits == 0  # the old predictor's refit finished after the swap and was dropped
    assert LengthPredictor.from_bytes(svc.export()).predict(f) == replacement.predict(f)
    reloaded = PredictorService(store=store)
    assert await reloaded.load() and reloaded.predictor.predict(f) == replacement.predict(f)
    with pytest.raises(PredictorBlobError):
        await svc.replace(b"not a predictor")
    assert svc.predictor.predict(f) == replacement.predict(f)  # unchanged


def test_blobs_store_rows_as_head_and_float32_embedding_and_rebuild_them_bit_for_bit() -> None:
    import io

    p = trained(n=120)
    blob = p.to_bytes()
    with np.load(io.BytesIO(blob)) as z:
        assert "x" not in z.files and z["emb"].dtype == np.float32 and z["head"].shape == (120, 6)
    full_rows = 120 * (6 + 2 * 384) * 8
    assert len(blob) < full_rows / 3
    q = LengthPredictor.from_bytes(blob)
    assert all(np.array_equal(a, b) for a, b in zip(p._x, q._x, strict=True))
    # an embedding given in float64 does not survive float32: those rows are kept whole
    r = LengthPredictor()
    rng = np.random.default_rng(2)
    for k in range(30):
        e = rng.normal(size=384)
        r.observe(RequestFeatures("t", "a", None, 10 + k, 256, e / np.linalg.norm(e)), 20 + k)
    with np.load(io.BytesIO(r.to_bytes())) as z:
        assert "x" in z.files and "emb" not in z.files
    s = LengthPredictor.from_bytes(r.to_bytes())
    assert all(np.array_equal(a, b) for a, b in zip(r._x, s._x, strict=True))


def test_blobs_of_earlier_versions_still_load() -> None:
    """Before the eighteenth session a blob held whole rows (`x`), compressed."""
    import io

    p = trained(n=120)
    x, y = np.stack(list(p._x)), np.asarray(p._y)
    keys = list(p._lengths)
    meta = {"lengths_keys": ["\x1f".join(k) if k else "\x1e" for k in keys],
            "users_keys": ["\x1f".join(k) for k in p._users]}
    arrays = {"x": x, "y": y, "kind": np.asarray(p._kind, dtype=np.int8), "w": p.model.length.w,
              "model": np.array([p.model.length.sigma, p.model.length.n]), "wr": np.zeros(0),
              "runaway": np.array([]), "meta": np.frombuffer(repr(meta).encode(), dtype=np.uint8)}
    arrays.update({f"l{i}": np.asarray(p._lengths[k]) for i, k in enumerate(keys)})
    arrays.update({f"u{i}": np.asarray(p._users[k]) for i, k in enumerate(p._users)})
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    q = LengthPredictor.from_bytes(buf.getvalue())
    f = feats("b", 50, "verbose")
    assert q.predict(f) == p.predict(f) and q.num_samples == 120


def _samples(n: int, seed: int = 5) -> LengthPredictor:
    """A predictor holding `n` observations (stops and a few runaways), no model yet."""
    rng = np.random.default_rng(seed)
    p = LengthPredictor(LengthModelConfig(min_fit_samples=8, min_runaway_samples=2))
    for k in range(n):
        app = "ab"[int(rng.integers(2))]
        prompt = int(rng.integers(20, 200))
        if k % 7 == 3:
            p.observe(feats(app, prompt), 512, "length")
        else:
            p.observe(feats(app, prompt), int(truth(app, prompt) * rng.uniform(0.7, 1.3)))
    return p


def test_a_refit_keeps_the_ridge_penalty_its_last_search_picked(monkeypatch) -> None:
    import actors.predictor as predictor_mod

    calls = []
    real = predictor_mod.ridge_loo_residuals

    def counting(x, y, pen, gram=None):
        calls.append(float(pen[-1]))
        return real(x, y, pen, gram)

    monkeypatch.setattr(predictor_mod, "ridge_loo_residuals", counting)
    p = _samples(120)
    grid = p.config.ridge_grid
    first = p.train(p.snapshot())  # no previous model: both halves search the grid
    assert len(calls) == 2 * len(grid)
    assert first.length.penalty in grid and first.length.searched_on == first.length.n
    assert first.runaway is not None and first.runaway.penalty in grid
    for k in range(10):  # grow by less than research_growth: keep the penalty
        p.observe(feats("a", 30 + k), 60)
    calls.clear()
    kept = p.train(p.snapshot(), first)
    assert calls == [first.length.penalty, first.runaway.penalty]  # one LOO solve per half
    assert (kept.length.penalty, kept.length.searched_on, kept.length.refits_since_search) == (
        first.length.penalty, first.length.searched_on, 1)
    assert kept.length.n == first.length.n + 10  # the weights are fitted on every sample
    # the same weights and uncertainty as a fit whose grid is that one penalty
    only = LengthPredictor(LengthModelConfig(min_fit_samples=8, min_runaway_samples=2,
                                             ridge_grid=(first.length.penalty,)))
    ref = only._ridge(*_stopped(p))
    np.testing.assert_allclose(kept.length.w, ref.w)
    assert kept.length.sigma == pytest.approx(ref.sigma)


def _stopped(p: LengthPredictor) -> tuple[np.ndarray, np.ndarray]:
    x, y, kind = p.snapshot()
    return x[kind == 0], y[kind == 0]


def test_the_ridge_grid_is_searched_again_after_growth_or_every_few_refits() -> None:
    p = _samples(80)
    c = p.config
    model = p.train(p.snapshot())
    stopped = model.length.n
    for _ in range(c.research_every - 1):
        model = p.train(p.snapshot(), model)
        assert model.length.searched_on == stopped and model.length.refits_since_search > 0
    assert model.length.refits_since_search == c.research_every - 1
    model = p.train(p.snapshot(), model)  # the research_every-th refit searches again
    assert model.length.refits_since_search == 0
    grown = _samples(int(80 * c.research_growth) + 20)
    regrown = grown.train(grown.snapshot(), model)  # samples grew by research_growth: search
    assert regrown.length.searched_on == regrown.length.n > stopped
    assert regrown.length.refits_since_search == 0
    # a model restored from a blob does not know its penalty: the next refit searches
    restored = LengthPredictor.from_bytes(p.to_bytes(), p.config)
    assert restored.model is None or not np.isfinite(restored.model.length.penalty)
    assert p.train(p.snapshot(), restored.model).length.refits_since_search == 0


def test_refits_come_every_refit_every_or_a_fraction_of_the_samples_held() -> None:
    p = LengthPredictor(LengthModelConfig(min_fit_samples=4, refit_every=4, refit_fraction=0.25))
    for k in range(8):
        p.observe(feats("a", 20 + k), 40 + k)
    assert p.needs_refit()  # no model yet
    p.fit()
    for k in range(4):
        p.observe(feats("a", 30 + k), 60)
    assert p.num_samples == 12 and p.needs_refit()  # 4 new >= max(4, ceil(0.25 * 12) = 3)
    p.fit()
    for k in range(40):
        p.observe(feats("a", 30 + k), 60)
    p.fit()  # 52 samples held: the next refit waits for m new ones, m >= 0.25 * (52 + m): 18
    for k in range(17):
        p.observe(feats("a", 30 + k), 60)
        assert not p.needs_refit()
    p.observe(feats("a", 50), 60)
    assert p.needs_refit()
    p.fit()
    # requests cut at a small max_tokens teach neither model: no refit for them (an audit:
    # 240 of them ran 4 refits of the same model)
    for k in range(40):
        p.observe(feats("a", 30 + k, max_tokens=2), 2, "length")
    assert not p.needs_refit()


@pytest.mark.parametrize("kwargs", [{"refit_every": 0}, {"refit_fraction": 1.0}, {"research_growth": 1.0},
                                    {"research_every": 0}])
def test_refit_knobs_are_checked(kwargs) -> None:
    with pytest.raises(ValueError):
        LengthModelConfig(**kwargs)


async def test_the_service_refit_keeps_the_penalty_between_searches() -> None:
    p = _samples(60)
    p.fit()
    searched = p.model.length
    svc = PredictorService(p)
    for k in range(20):
        await svc.observe(feats("a", 40 + k), 80)
    assert svc.refits >= 1
    assert svc.predictor.model.length.penalty == searched.penalty
    assert svc.predictor.model.length.refits_since_search == svc.refits


def test_statistics_per_app_and_user_are_bounded(monkeypatch):
    """Apps and users are whatever clients send: the tables keyed by them keep the most
    recently fed MAX_KEYS entries, so a client inventing a new tag per request cannot grow
    the process without bound."""
    import actors.predictor as predictor

    monkeypatch.setattr(predictor, "MAX_KEYS", 50)
    est = RunningLengthEstimator()
    for i in range(500):
        est.observe("t", f"app-{i}", 10)
    assert len(est._stats) == 50
    assert ("t", "app-499") in est._stats and ("t", "app-0") not in est._stats
    assert ("t",) in est._stats and () in est._stats  # fed every time: never the oldest
    lp = LengthPredictor()
    for i in range(500):
        lp.observe(RequestFeatures("t", f"app-{i}", f"user-{i}", 10, 100), 10)
    assert len(lp._lengths) == 50 and len(lp._users) == 50
    assert ("t", "user-499") in lp._users and ("t",) in lp._lengths


# ---------------------------------------------------------------- untrusted blobs (uploads, seed files, Redis)
def _arrays(p: LengthPredictor) -> dict[str, np.ndarray]:
    """The arrays of `p.to_bytes()`, to make variants of a real blob from."""
    import io

    with np.load(io.BytesIO(p.to_bytes())) as z:
        return {k: z[k] for k in z.files}


def _npz(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    import io

    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _meta(value: object) -> np.ndarray:
    return np.frombuffer(repr(value).encode(), dtype=np.uint8)


def _full_window() -> LengthPredictor:
    """A predictor holding a whole window (max_samples rows) and a fitted model."""
    rng = np.random.default_rng(4)
    p = LengthPredictor()
    e = rng.normal(size=(p.config.max_samples + 10, 384)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    for i, v in enumerate(e):
        p.observe(RequestFeatures("t", f"app-{i % 40}", f"user-{i}", 10 + i % 500, 512, v), 20 + i % 300)
    return p


def _peak_bytes(fn) -> int:
    """The most memory Python and NumPy held at once while `fn()` ran (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_blob_holds_at_most_a_full_window_of_samples() -> None:
    """The caps are what a predictor can hold (max_samples rows): a full window loads, one
    row more is refused by its .npy header's shape."""
    p = _full_window()
    assert LengthPredictor.from_bytes(p.to_bytes()).num_samples == p.config.max_samples
    arrays = _arrays(p)
    for name in ("y", "kind", "head", "emb"):
        arrays[name] = np.concatenate([arrays[name], arrays[name][:1]])
    with pytest.raises(PredictorBlobError, match=r"'y' array has shape \(4097,\), more than the 4096 values"):
        LengthPredictor.from_bytes(_npz(arrays))


def test_a_zip_bomb_is_refused_before_it_is_decompressed() -> None:
    """A 1 MB upload of deflated zeros held a 1 GB `y`: the zip entry's declared size is
    checked before a byte of it is inflated."""
    arrays = _arrays(trained(n=40))
    arrays["y"] = np.zeros(4_000_000)  # 32 MB of float64 zeros, ~30 KB deflated
    blob = _npz(arrays, compressed=True)
    del arrays
    assert len(blob) < 1_000_000

    def load() -> None:
        with pytest.raises(PredictorBlobError, match=r"'y' array is 32000128 bytes uncompressed, more than a "
                                                     r"predictor writes there \(42768 at most\)"):
            LengthPredictor.from_bytes(blob)

    assert _peak_bytes(load) < 4_000_000


def test_a_npy_header_declaring_more_values_than_a_predictor_holds_is_refused_before_allocating() -> None:
    """A small zip entry whose .npy header declares 10M values: refused by the shape, not by
    allocating 80 MB and finding the data short."""
    import io
    import zipfile

    arrays = _arrays(trained(n=40))
    del arrays["y"]
    buf = io.BytesIO(_npz(arrays))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10_000_000,)})
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("y.npy", header.getvalue() + bytes(16))
    blob = buf.getvalue()

    def load() -> None:
        with pytest.raises(PredictorBlobError, match=r"'y' array has shape \(10000000,\), more than the 4096 values"):
            LengthPredictor.from_bytes(blob)

    assert _peak_bytes(load) < 4_000_000


def _malformed(change) -> bytes:
    arrays = _arrays(trained(n=40))
    change(arrays)
    return _npz(arrays)


_WIDTH = 6 + 2 * 384
MALFORMED = {  # what the audit's uploads held: each was a 500, a traceback, or accepted (and served NaN)
    "meta int key": (lambda a: a.update(meta=_meta({"lengths_keys": [1], "users_keys": []})),
                     r"meta\['lengths_keys'\] is not a list of strings"),
    "meta None key": (lambda a: a.update(meta=_meta({"lengths_keys": [], "users_keys": [None]})),
                      r"meta\['users_keys'\] is not a list of strings"),
    "model n infinite": (lambda a: a.update(model=np.array([0.5, np.inf])), r"'model' array holds NaN or infinity"),
    "model n not a count": (lambda a: a.update(model=np.array([0.5, 1e300])), r"not a residual std .* sample count"),
    "sigma infinite": (lambda a: a.update(model=np.array([np.inf, 40.0])), r"'model' array holds NaN or infinity"),
    "sigma negative": (lambda a: a.update(model=np.array([-1.0, 40.0])), r"not a residual std"),
    "weights NaN": (lambda a: a.update(w=np.full(_WIDTH, np.nan)), r"'w' array holds NaN or infinity"),
    "weights infinite": (lambda a: a.update(w=np.full(_WIDTH, np.inf)), r"'w' array holds NaN or infinity"),
    "runaway weights NaN": (lambda a: a.update(wr=np.full(_WIDTH, np.nan), runaway=np.array([0.3, 40.0])),
                            r"'wr' array holds NaN or infinity"),
    "y NaN": (lambda a: a["y"].__setitem__(0, np.nan), r"'y' array holds NaN or infinity"),
    "y negative": (lambda a: a["y"].__setitem__(0, -5.0), r"'y' array must hold log lengths \(>= 0"),
    "y complex": (lambda a: a.update(y=a["y"].astype(np.complex128)), r"'y' array holds complex128 values"),
    "y strings": (lambda a: a.update(y=a["y"].astype("U10")), r"'y' array holds <U10 values"),
    "head NaN": (lambda a: a["head"].__setitem__((0, 1), np.nan), r"'head' array holds NaN or infinity"),
    "embedding infinite": (lambda a: a["emb"].__setitem__((0, 0), np.inf), r"'emb' array holds NaN or infinity"),
    "kind 99": (lambda a: a["kind"].__setitem__(0, 99), r"'kind' array must hold one of 0, 1, 2"),
    "app history NaN": (lambda a: a["l0"].__setitem__(0, np.nan), r"'l0' array holds NaN or infinity"),
    "user history negative": (lambda a: a["u0"].__setitem__(0, -1.0), r"'u0' array must hold output lengths"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_blob_is_a_predictor_blob_error_naming_what_is_wrong(case: str) -> None:
    change, message = MALFORMED[case]
    with pytest.raises(PredictorBlobError, match=message):
        LengthPredictor.from_bytes(_malformed(change))


def test_any_failure_to_decode_a_blob_is_a_predictor_blob_error() -> None:
    """Whatever the zip layer raises (here NotImplementedError: a compression method zipfile
    lacks) is a bad blob, not a 500 or a traceback."""
    blob = bytearray(trained(n=40).to_bytes())
    last = blob.rfind(b"PK\x01\x02")  # the last central-directory entry: its compression method
    blob[last + 10:last + 12] = (99).to_bytes(2, "little")
    with pytest.raises(PredictorBlobError, match="NotImplementedError"):
        LengthPredictor.from_bytes(bytes(blob))


async def test_an_upload_with_infinite_values_is_refused_and_the_summary_stays_strict_json() -> None:
    """An infinite sigma was served as `"length_sigma": Infinity`, which is not JSON."""
    import json

    svc = PredictorService(trained(n=40))
    before = svc.predictor.summary()
    with pytest.raises(PredictorBlobError, match="'model' array holds NaN or infinity"):
        await svc.replace(_malformed(lambda a: a.update(model=np.array([np.inf, 40.0]))))
    assert json.loads(json.dumps(svc.predictor.summary(), allow_nan=False)) == before


class _SlowFirstSet:
    """The parts of a `RedisStore` that `PredictorService.save` uses, whose first SET lands
    only once a second SET has begun (or after a second): the first upload's slower save."""

    def __init__(self) -> None:
        self.client = self
        self.held: dict[str, bytes] = {}
        self.sets = 0
        self._second = trio.Event()

    def key(self, name: str) -> str:
        return f"lmgate:{name}"

    def guard(self):
        import contextlib

        return contextlib.nullcontext()

    async def set(self, key: str, value: bytes) -> None:
        self.sets += 1
        if self.sets == 1:
            with trio.move_on_after(1):
                await self._second.wait()
        else:
            self._second.set()
        self.held[key] = value


@pytest.mark.parametrize("first", ["replace", "refit"])
async def test_overlapping_saves_leave_redis_holding_the_predictor_served(first: str) -> None:
    """Two overlapping uploads (or a refit's save and an upload) both answered saved, while
    Redis kept the first one's predictor and the second was served: a restart brought back
    the one that lost."""
    store = _SlowFirstSet()
    old, new = _samples(30), _samples(50, seed=6)
    svc = PredictorService(old, store=store)
    async with trio.open_nursery() as nursery:
        if first == "replace":
            nursery.start_soon(svc.replace, old.to_bytes())
        else:
            nursery.start_soon(svc.refit)
        while store.sets == 0:  # the first save's SET has begun
            await trio.sleep(0.01)
        assert await svc.replace(new.to_bytes())
    assert store.sets == 2
    stored = LengthPredictor.from_bytes(store.held[store.key(svc.key)])
    assert svc.predictor.num_samples == stored.num_samples == 50


def test_other_replicas_observations_do_not_count_toward_a_refit() -> None:
    """Each replica refits at the pace of its own traffic (on everyone's samples): counted,
    each replica's refits and multi-MB saves grew with the whole fleet's traffic."""
    p = LengthPredictor(LengthModelConfig(min_fit_samples=8, refit_every=8))
    train(p, n=40)
    p.install(p.train(p.snapshot()))
    for k in range(30):
        p.observe(feats("a", 20 + k), 40 + 2 * k, counts=False)
    assert p.num_samples == 70 and not p.needs_refit()
    for k in range(8):
        p.observe(feats("a", 20 + k), 40 + 2 * k)
    assert p.needs_refit()


def test_a_shared_observation_of_another_size_or_not_finite_is_not_learned() -> None:
    from actors.predictor import SharedObservation

    good = SharedObservation.of(feats("a", 20), 40, "stop")
    assert good.features(384) is not None and good.features(128) is None
    nan = np.full(384, np.nan, dtype=np.float32).tobytes()
    assert SharedObservation("t", "a", None, 20, 512, nan, 40, "stop").features(384) is None


def sharing(store, config: LengthModelConfig, count: int = 1) -> list[PredictorService]:
    """`count` replicas' predictor services on one Redis, sharing every 50 ms."""
    services = [PredictorService(LengthPredictor(config), store=store) for _ in range(count)]
    for svc in services:
        svc.share_every_s = 0.05
    return services


async def test_replicas_of_one_redis_learn_each_others_observations(store) -> None:
    """Two replicas' predictors, each fed half of the traffic, both learn all of it (each
    learned only its own before, and Redis kept the last writer's); a replica that starts
    later learns what comes after it starts, from both."""
    config = LengthModelConfig(min_fit_samples=8, refit_every=8)
    a, b = sharing(store, config, 2)
    async with trio.open_nursery() as nursery:
        for svc in (a, b):
            await nursery.start(svc.share)
        for k in range(20):
            await a.observe(feats("a", 20 + k), 2 * (20 + k), nursery)
            await b.observe(feats("b", 20 + k, "verbose"), 200, nursery, "length")
        with trio.fail_after(10):
            while a.predictor.num_samples < 40 or b.predictor.num_samples < 40:
                await trio.sleep(0.05)
        assert (a.shared_in, b.shared_in) == (20, 20)  # nobody learns its own twice
        for svc in (a, b):
            summary = svc.predictor.summary()
            # b's requests ran into their cap (512, a runaway's): the finish reason travels too
            assert summary["apps"] == {"t/a": 20, "t/b": 20} and summary["runaways"] == 20
        # a batch sent twice (its first XADD landed, its answer was lost, the client retried): once
        entries = await store.client.xrange(store.key(SHARE_KEY))
        [again] = [e for e in entries if e.field_values[b"r"] == a.replica.encode()][-1:]
        await store.client.xadd(store.key(SHARE_KEY), dict(again.field_values))
        # what no replica writes is skipped (it crashed the task), and sharing goes on
        await store.client.xadd(store.key(SHARE_KEY), {"r": b"\xff\xfe", "o": b"x"})
        await trio.sleep(0.3)
        assert b.sharing()["applied_from_others"] == 20
        assert a.sharing()["applied_from_others"] == 20 and a.sharing()["waiting_to_publish"] == 0
        [late] = sharing(store, config)
        await nursery.start(late.share)
        await a.observe(feats("a", 99), 198, nursery)
        with trio.fail_after(10):
            while b.predictor.num_samples < 41 or late.predictor.num_samples < 1:
                await trio.sleep(0.05)
        await trio.sleep(0.2)
        assert late.predictor.num_samples == 1  # what came before it started is in Redis's saved predictor
        nursery.cancel_scope.cancel()


async def six_saved_then_four_more(a: PredictorService, b: PredictorService, nursery: trio.Nursery) -> None:
    """`a` and `b` share; `a` observes 6 requests, `b` learns them and saves (its predictor
    and how far it read the stream), then `a` observes and publishes 4 more."""
    for svc in (a, b):
        await nursery.start(svc.share)
    for k in range(6):
        await a.observe(feats("a", 20 + k), 40 + 2 * k, nursery)
    with trio.fail_after(10):
        while b.predictor.num_samples < 6:
            await trio.sleep(0.05)
    assert await b.save()
    for k in range(4):  # observed after the save (while b is "down")
        await a.observe(feats("b", 30 + k, "terse"), 20, nursery)
    with trio.fail_after(10):
        while a.sharing()["waiting_to_publish"]:
            await trio.sleep(0.05)


async def test_a_restored_replica_learns_what_the_fleet_observed_after_the_save(store) -> None:
    """The saved predictor says how far it had read the shared stream: a replica restarted
    from it learns what the others observed since (it lost that before)."""
    config = LengthModelConfig(min_fit_samples=100)  # no refits (and their saves) here
    a, b = sharing(store, config, 2)
    async with trio.open_nursery() as nursery:
        await six_saved_then_four_more(a, b, nursery)
        [restarted] = sharing(store, config)
        assert await restarted.load() and restarted.predictor.num_samples == 6
        await nursery.start(restarted.share)
        with trio.fail_after(10):
            while restarted.predictor.num_samples < 10:
                await trio.sleep(0.05)
        await trio.sleep(0.3)
        assert restarted.predictor.num_samples == 10 and restarted.sharing()["applied_from_others"] == 4
        nursery.cancel_scope.cancel()


async def test_an_imported_predictor_does_not_learn_the_fleets_earlier_observations_again(store) -> None:
    """`lmgate predictor import` (a service that does not share) stores a predictor made
    elsewhere: a server started on it reads the shared stream from the import on. Left at
    the replaced predictor's position, it learned what the stream held then on top of a
    blob that held it already (an audit: 61 requests learned twice or three times)."""
    config = LengthModelConfig(min_fit_samples=100)
    a, b = sharing(store, config, 2)
    async with trio.open_nursery() as nursery:
        await six_saved_then_four_more(a, b, nursery)
        nursery.cancel_scope.cancel()
    exported = a.export()  # holds all 10
    importer = PredictorService(LengthPredictor(config), store=store)  # (the CLI's: it does not share)
    assert await importer.replace(exported)
    [started] = sharing(store, config)
    assert await started.load() and started.predictor.num_samples == 10
    async with trio.open_nursery() as nursery:
        await nursery.start(started.share)
        await trio.sleep(0.3)
        assert started.predictor.num_samples == 10  # nothing learned twice
        nursery.cancel_scope.cancel()


async def test_a_redis_that_refuses_the_stream_holds_neither_the_start_nor_the_predictor(
        store, caplog: pytest.LogCaptureFixture) -> None:
    """A key of another type (or an ACL without stream commands): the task started (the
    server's start waited on it) and warns once; the predictor learns on."""
    await store.client.set(store.key(SHARE_KEY), b"not a stream")
    [svc] = sharing(store, LengthModelConfig())
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(svc.share)
        await svc.observe(feats("a", 20), 40, nursery)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert svc.predictor.num_samples == 1
    assert sum("sharing failed" in r.getMessage() for r in caplog.records) == 1
