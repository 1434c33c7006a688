"""Shaping arithmetic against hand-computed values, for every option; running statistics against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steer_reward.config import ConfigError, load_config
from steer_reward.decorrelation import fit_decorrelation, spearman
from steer_reward.schema import STEERLM9
from steer_reward.shaping import Moments, RewardShaper, RunningStats

# Two samples; outputs 0-3 are SteerLM's untrained ones and hold junk that must never leak into the reward.
A = torch.tensor([
    [9.0, 9.0, 9.0, 9.0, 3.0, 2.0, 4.0, 1.0, 2.0],
    [9.0, 9.0, 9.0, 9.0, 1.0, 4.0, 3.0, 2.0, 0.5],
])
LENGTHS = torch.tensor([100, 700])


def shaper(**shaping) -> RewardShaper:
    return RewardShaper(STEERLM9, load_config({"shaping": shaping}).shaping)


def test_default_weights_are_the_model_card_preset():
    expected = [0.65 * 3 + 0.8 * 2 + 0.45 * 4 + 0.55 * 1 - 0.4 * 2, 0.65 * 1 + 0.8 * 4 + 0.45 * 3 + 0.55 * 2 - 0.4 * 0.5]
    torch.testing.assert_close(shaper()(A, LENGTHS), torch.tensor(expected))


def test_custom_weights_and_bias():
    out = shaper(weights={"correctness": 2.0, "verbosity": -1.0}, bias=0.5)(A, LENGTHS)
    torch.testing.assert_close(out, torch.tensor([2 * 2.0 - 2.0 + 0.5, 2 * 4.0 - 0.5 + 0.5]))


def test_length_penalty():
    out = shaper(weights="helpfulness", length_penalty={"alpha": 2.0, "target_tokens": 200})(A, LENGTHS)
    # sample 0 is under target (no penalty); sample 1: 2 * (700 - 200) / 200 = 5
    torch.testing.assert_close(out, torch.tensor([3.0, 1.0 - 5.0]))
    with pytest.raises(ValueError, match="lengths"):
        shaper(length_penalty={"alpha": 1.0})(A, None)


def test_decorrelation():
    out = shaper(weights={"helpfulness": 1.0}, decorrelate={"helpfulness": 0.5})(A, LENGTHS)
    torch.testing.assert_close(out, torch.tensor([3.0 - 0.5 * 2.0, 1.0 - 0.5 * 0.5]))
    with pytest.raises(ConfigError, match="itself"):
        shaper(decorrelate={"verbosity": 0.5})


def test_fixed_normalization(tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"helpfulness": {"mean": 2.0, "std": 0.5}, "correctness": {"mean": 3.0, "std": 2.0}}))
    out = shaper(weights={"helpfulness": 1.0, "correctness": 1.0}, normalization="fixed", stats_file=str(stats),
                 eps=0.0)(A, LENGTHS)
    torch.testing.assert_close(out, torch.tensor([(3 - 2) / 0.5 + (2 - 3) / 2, (1 - 2) / 0.5 + (4 - 3) / 2]))
    stats.write_text(json.dumps({"helpfulness": {"mean": 0, "std": 0}}))
    with pytest.raises(ConfigError, match="positive"):
        shaper(normalization="fixed", stats_file=str(stats))


def test_running_normalization_updates_only_when_asked():
    s = shaper(weights={"helpfulness": 1.0}, normalization="running", eps=0.0)
    torch.testing.assert_close(s(A, LENGTHS), torch.tensor([3.0, 1.0]))  # no stats yet: identity
    assert s.attribute_stats.count == 0
    out = s(A, LENGTHS, update_stats=True)  # mean 2, std 1 over the two samples
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0]))
    assert s.attribute_stats.count == 2
    s(A, LENGTHS)
    assert s.attribute_stats.count == 2


def test_a_non_finite_sample_never_enters_the_running_statistics():
    # One broken sample (NaN from a bad forward, inf from an overflow) must not poison every later reward.
    s = shaper(weights={"helpfulness": 1.0}, normalization="running", reward_normalization="running", eps=0.0)
    broken = torch.cat([A, torch.tensor([[9.0, 9.0, 9.0, 9.0, float("nan"), 1.0, 1.0, 1.0, 1.0],
                                         [9.0, 9.0, 9.0, 9.0, 2.0, float("inf"), 1.0, 1.0, 1.0]])])
    out = s(broken, torch.tensor([1, 1, 1, 1]), update_stats=True)
    assert s.attribute_stats.count == 2 and s.reward_stats.count == 2
    assert torch.isfinite(out[:2]).all() and torch.isnan(out[2])
    assert torch.isfinite(s.attribute_stats.mean).all() and torch.isfinite(s.reward_stats.mean).all()
    later = s(A, LENGTHS)
    assert torch.isfinite(later).all()


def test_reward_normalization_and_clipping():
    s = shaper(weights={"helpfulness": 1.0}, reward_normalization="running", eps=0.0, clip=[-0.5, 0.5])
    torch.testing.assert_close(s(A, LENGTHS, update_stats=True), torch.tensor([0.5, -0.5]))
    s2 = shaper(weights={"helpfulness": 1.0}, clip=[0.0, 2.0])
    torch.testing.assert_close(s2(A, LENGTHS), torch.tensor([2.0, 1.0]))


def test_with_weights_shares_state():
    s = shaper(normalization="running")
    s(A, LENGTHS, update_stats=True)
    other = s.with_weights("helpfulness")
    assert other.attribute_stats is s.attribute_stats
    assert other.weights[4] == 1.0 and s.weights[4] == 0.65


def test_running_stats_equal_numpy_and_survive_state_dict():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(500, 9))
    stats = RunningStats(9)
    for chunk in np.array_split(data, 17):
        stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(stats.mean.numpy(), data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.var.numpy(), data.var(0), rtol=1e-10)
    restored = RunningStats(9)
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert restored.count == 500
    torch.testing.assert_close(restored.mean, stats.mean, rtol=0, atol=0)
    torch.testing.assert_close(restored.var, stats.var, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        RunningStats(3).load_state_dict(stats.state_dict())


def test_moments_merge_is_exact():
    x = torch.randn(100, 4, dtype=torch.float64)
    merged = Moments.of(x[:30]).merge(Moments.of(x[30:])).merge(Moments.of(x[:0]))
    whole = Moments.of(x)
    torch.testing.assert_close(merged.mean, whole.mean)
    torch.testing.assert_close(merged.m2, whole.m2)


def test_shaper_state_round_trip():
    s = shaper(normalization="running", reward_normalization="running")
    s(A, LENGTHS, update_stats=True)
    fresh = shaper(normalization="running", reward_normalization="running")
    fresh.load_state_dict(json.loads(json.dumps(s.state_dict())))
    torch.testing.assert_close(fresh(A, LENGTHS), s(A, LENGTHS))


def test_fit_decorrelation_removes_the_verbosity_correlation():
    torch.manual_seed(0)
    verbosity = torch.rand(400) * 4
    helpfulness = 0.6 * verbosity + torch.rand(400)
    attrs = torch.zeros(400, 9)
    attrs[:, 8], attrs[:, 4] = verbosity, helpfulness
    attrs[:, 5] = torch.rand(400)
    lambdas = fit_decorrelation(attrs, STEERLM9, threshold=0.03)
    assert spearman(helpfulness, verbosity) > 0.5
    assert spearman(helpfulness - lambdas["helpfulness"] * verbosity, verbosity) <= 0.03
    assert 0.3 < lambdas["helpfulness"] < 0.9
    assert lambdas["correctness"] == 0.0  # already uncorrelated


def test_running_statistics_lose_no_update_under_threads():
    """One shaper (and its with_weights clones, which share its statistics) called from several threads at once:
    every update lands, and a pickled copy of the pair still shares one lock and one state."""
    import pickle
    import sys
    import threading

    s = shaper(normalization="running", reward_normalization="running")
    pair = pickle.loads(pickle.dumps([s, s.with_weights("helpfulness")]))
    faces = [s, s.with_weights("helpfulness"), *pair]
    threads, calls = 4, 500
    row = A[:1]

    def work(face):
        for _ in range(calls):
            face(row, LENGTHS[:1], update_stats=True)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a lost update shows within a few calls
    try:
        for group in (faces[:2], faces[2:]):
            workers = [threading.Thread(target=work, args=(group[i % 2],)) for i in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    finally:
        sys.setswitchinterval(interval)
    for face in (s, pair[0]):
        assert face.attribute_stats.count == threads * calls
        assert face.reward_stats.count == threads * calls
    torch.testing.assert_close(s.attribute_stats.mean, A[0].double())
    assert pair[0].lock is pair[1].lock and pair[0].attribute_stats is pair[1].attribute_stats


@pytest.mark.parametrize("lengths, message", [
    ([[100], [700]], r"got shape \(2, 1\)"),  # before: broadcast against the rewards into a (2, 2) "reward"
    ([100], "got 1 lengths for 2 samples"),
    (["a", "b"], "must be 2 token counts"),
    ([True, False], "must be 2 token counts"),
    ([100.0, float("nan")], r"sample 1 has nan"),  # before: a NaN reward, which TRL's nansum reads as no reward
    ([float("inf"), 3], r"sample 0 has inf"),
    ([-1, 3], r"finite token counts >= 0; sample 0 has -1 \(1 such\)"),
])  # fmt: skip
def test_lengths_that_are_not_one_count_per_sample_are_refused(lengths, message):
    with pytest.raises(ValueError, match=message):
        shaper(length_penalty={"alpha": 0.5, "target_tokens": 200})(A, lengths)


class RecordingSync:
    """A cross-rank merge in one process that records the failures it was asked to carry."""

    def __init__(self) -> None:
        self.carried: list[tuple[str, int]] = []

    def __call__(self, moments: Moments) -> Moments:
        return moments

    def fail_together(self, error: BaseException, size: int) -> None:
        self.carried.append((str(error), size))


@pytest.mark.parametrize("shaping, update, size", [
    ({"normalization": "running"}, True, 9),  # the first merge is of the attributes: K columns
    ({"reward_normalization": "running"}, True, 1),  # only the reward's: one column
    ({"normalization": "running"}, False, None),  # no update, no merge the other ranks wait in
    ({}, True, None),  # nothing running, nothing merged
])  # fmt: skip
def test_a_refused_input_rides_the_first_merge_of_statistics_when_there_is_one(shaping, update, size):
    """A rank refused here would leave the others waiting in the merge: the sync carries the error to them (in a
    process group every rank then raises it; tests/test_rank_errors.py), else it is raised as it is."""
    sync = RecordingSync()
    refused = shaper(length_penalty={"alpha": 0.5, "target_tokens": 200}, **shaping)
    with pytest.raises(ValueError, match="got 1 lengths for 2 samples"):
        refused(A, [100], update_stats=update, sync=sync)
    assert sync.carried == ([("got 1 lengths for 2 samples", size)] if size else [])
    assert refused.attribute_stats.count == refused.reward_stats.count == 0
