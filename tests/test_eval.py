"""Pairwise evaluation: accuracy arithmetic by hand, RewardBench's section weighting, the scored cache (reused
with zero model forwards, refused when it belongs to other data or another scoring), sweeps and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steer_reward.cli import main
from steer_reward.config import load_config
from steer_reward.eval.accuracy import EXAMPLE_COUNTS, SUBSET_MAPPING, Bootstrap, accuracy_of, section_scores
from steer_reward.eval.pairs import NO_SUBSET, load_preferences
from steer_reward.eval.report import build_report
from steer_reward.eval.scored import ScoredPreferences
from steer_reward.eval.sweep import grid, pareto_front, parse_sweep, rewards_under, run_sweep
from steer_reward.errors import InputError
from steer_reward.schema import STEERLM9

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "steer_reward" / "data" / "llmbar_sample.jsonl"  # 40 rows, 5 LLMBar subsets
HELPFULNESS = load_config({"shaping": {"weights": "helpfulness"}}).shaping


def synthetic(rows: list[tuple[str, list[float]]], lengths: list[int] | None = None) -> ScoredPreferences:
    """Rows of (subset, [chosen helpfulness, rejected helpfulness...]); other attributes 0."""
    flat = [v for _, values in rows for v in values]
    values = torch.zeros(len(flat), 9, dtype=torch.float64)
    values[:, STEERLM9.index("helpfulness")] = torch.tensor(flat, dtype=torch.float64)
    offsets = [0]
    for _, vs in rows:
        offsets.append(offsets[-1] + len(vs))
    return ScoredPreferences(STEERLM9, values, torch.tensor(lengths or [10] * len(flat)),
                             torch.zeros(len(flat), dtype=torch.bool), offsets, [str(i) for i in range(len(rows))],
                             [s for s, _ in rows], {})


def test_ties_count_wrong_and_every_rejected_must_lose():
    scored = synthetic([
        ("a", [2.0, 1.0]),            # right
        ("a", [1.0, 1.0]),            # tie: wrong
        ("a", [3.0, 1.0, 2.5, 2.0]),  # beats all three: right
        ("a", [3.0, 1.0, 3.5, 2.0]),  # loses to one of three: wrong
        ("a", [2.0, 1.0, 2.0]),       # tie with one of two: wrong
    ])
    acc = accuracy_of(rewards_under(scored, HELPFULNESS), scored)
    assert acc.overall == pytest.approx(2 / 5) and acc.subsets == {"a": pytest.approx(2 / 5)}
    assert acc.sections == {} and acc.score is None and acc.metric("score") == acc.overall


def test_sections_use_rewardbench_counts_over_the_subsets_present():
    # RewardBench's own constants (rewardbench/constants.py): math-prm is counted 984 for its 447 rows.
    assert EXAMPLE_COUNTS["math-prm"] == 984 == 6 * EXAMPLE_COUNTS["hep-python"]
    assert EXAMPLE_COUNTS["llmbar-natural"] == 100 and EXAMPLE_COUNTS["mt-bench-hard"] == 37
    assert EXAMPLE_COUNTS["xstest-should-refuse"] == 154 and EXAMPLE_COUNTS["xstest-should-respond"] == 250
    assert sum(len(v) for v in SUBSET_MAPPING.values()) == len(EXAMPLE_COUNTS) == 23
    scored = synthetic([
        ("llmbar-natural", [1.0, 0.0]), ("llmbar-natural", [0.0, 1.0]),  # 1/2
        ("mt-bench-hard", [1.0, 0.0]),                                    # 1/1
        ("math-prm", [0.0, 1.0]), ("math-prm", [0.0, 1.0]), ("math-prm", [1.0, 0.0]),  # 1/3
        ("hep-python", [1.0, 0.0]),                                       # 1/1
        ("my-own-set", [0.0, 1.0]),                                       # 0/1: in overall, in no section
        (NO_SUBSET, [1.0, 0.0]),                                          # rows without a subset
    ])
    acc = accuracy_of(rewards_under(scored, HELPFULNESS), scored)
    chat_hard = (0.5 * 100 + 1.0 * 37) / (100 + 37)
    reasoning = (1 / 3 * 984 + 1.0 * 164) / (984 + 164)
    assert acc.sections == {"Chat Hard": pytest.approx(chat_hard), "Reasoning": pytest.approx(reasoning)}
    assert acc.score == pytest.approx((chat_hard + reasoning) / 2)  # sections absent are left out, not 0
    assert acc.overall == pytest.approx(5 / 9)
    assert acc.counts == {"llmbar-natural": 2, "mt-bench-hard": 1, "math-prm": 3, "hep-python": 1,
                          "my-own-set": 1, NO_SUBSET: 1}
    assert section_scores({"alpacaeval-easy": 0.5}) == {"Chat": 0.5}


def test_preferred_length_follows_the_reward():
    scored = synthetic([("a", [2.0, 1.0]), ("a", [1.0, 3.0, 0.0]), ("a", [1.0, 1.0])],
                       lengths=[10, 20, 30, 40, 50, 60, 70])
    acc = accuracy_of(rewards_under(scored, HELPFULNESS), scored)
    assert acc.preferred_tokens == pytest.approx((10 + 40 + (60 + 70) / 2) / 3)  # a tie: mean of the tied


def test_bootstrap_is_seeded_stratified_and_brackets_the_estimate():
    scored = synthetic([("a", [1.0, 0.0])] * 6 + [("a", [0.0, 1.0])] * 4 + [("b", [1.0, 0.0])] * 5)
    rewards = rewards_under(scored, HELPFULNESS)
    first = accuracy_of(rewards, scored, Bootstrap(scored.subsets, 500, seed=1)).intervals
    again = accuracy_of(rewards, scored, Bootstrap(scored.subsets, 500, seed=1)).intervals
    other = accuracy_of(rewards, scored, Bootstrap(scored.subsets, 500, seed=2)).intervals
    assert first == again and first != other
    assert first["subset:b"] == (1.0, 1.0)  # always right: no spread
    lo, hi = first["subset:a"]
    assert lo < 0.6 < hi
    # Stratified: every draw keeps 10 rows of a and 5 of b, so overall = (10·acc_a + 5·acc_b) / 15 per draw.
    assert first["overall"] == pytest.approx(((10 * lo + 5) / 15, (10 * hi + 5) / 15))
    assert accuracy_of(rewards, scored, Bootstrap(scored.subsets, 0)).intervals == {}


def test_sweep_grid_and_pareto_front():
    axes = parse_sweep("correctness=0:1:0.25, verbosity=-1:0:0.5")
    assert [a.values for a in axes] == [(0.0, 0.25, 0.5, 0.75, 1.0), (-1.0, -0.5, 0.0)]
    assert parse_sweep("helpfulness=0:0.3:0.1")[0].values == (0.0, 0.1, 0.2, 0.3)  # inclusive, no 0.30000000004
    points = grid(axes, STEERLM9.weight_dict("steerlm-70b"))
    assert len(points) == 15 and all(p["helpfulness"] == 0.65 and p["complexity"] == 0.55 for p in points)
    assert {(p["correctness"], p["verbosity"]) for p in points} == {(c, v) for c in axes[0].values
                                                                   for v in axes[1].values}
    # (length, accuracy): 1 is beaten by 0 (shorter, as accurate), 3 by 2; ties keep one
    assert pareto_front([(10, 0.5), (12, 0.5), (11, 0.7), (13, 0.6), (14, 0.9), (11, 0.7)]) == [0, 2, 4]


def test_running_normalization_sweep_points_do_not_share_state():
    torch.manual_seed(0)
    scored = synthetic([("a", [float(x), float(y)]) for x, y in torch.randn(20, 2).tolist()])
    scored.values[:, STEERLM9.index("verbosity")] = torch.randn(40, dtype=torch.float64)
    shaping = load_config({"shaping": {"weights": {"helpfulness": 1.0, "verbosity": -0.5},
                                       "normalization": "running", "reward_normalization": "running"}}).shaping
    axes = parse_sweep("verbosity=-1:1:1")
    points = run_sweep(scored, shaping, axes)
    again = run_sweep(scored, shaping, axes)
    for p, q in zip(points, again):
        fresh = accuracy_of(rewards_under(scored, shaping, p.weights), scored)
        assert p.accuracy.overall == q.accuracy.overall == fresh.overall


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "p", "chosen": ["a", "b"], "rejected": "c"}, "holds 2 responses"),
    ({"chosen": "a", "rejected": "b"}, "needs the row's 'prompt'"),
    ({"prompt": "p", "chosen": "a", "rejected": []}, "empty list"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "must be a string"),
])
def test_bad_rows_name_their_line(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=f"pairs.jsonl:2: .*{message}"):
        load_preferences(path)


def test_rewardbench2_and_message_rows(tmp_path):
    path = tmp_path / "pairs.jsonl"
    conversation = [{"role": "user", "content": "hi"}]
    rows = [{"prompt": "p", "chosen": ["a"], "rejected": ["b", "c", "d"], "subset": "Focus", "id": 7},
            {"chosen": conversation + [{"role": "assistant", "content": "hello"}],
             "rejected": conversation + [{"role": "assistant", "content": "go away"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_preferences(path)
    first, second = data.rows
    assert first.completions == ("a", "b", "c", "d") and first.subset == "Focus" and first.id == "7"
    assert second.prompts == (conversation, conversation) and second.completions == ("hello", "go away")
    assert second.subset == NO_SUBSET and second.id == "2"
    path.write_text("\n\n")
    with pytest.raises(InputError, match="empty"):
        load_preferences(path)


# -- end to end on the demo model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored_sample(demo_model_path, tmp_path_factory):
    """The bundled sample scored once by ``steer-reward eval`` (demo model), and ``steer-reward score``'s output
    for the same rows."""
    folder = tmp_path_factory.mktemp("eval")
    cache, score_out = folder / "scored.jsonl", folder / "score.jsonl"
    assert main(["eval", "--data", str(SAMPLE), "--model", demo_model_path, "--scored", str(cache),
                 "--bootstrap", "0", "--json"]) == 0
    assert main(["score", "--model", demo_model_path, "--input", str(SAMPLE), "--output", str(score_out)]) == 0
    return cache, score_out


def _eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", "--data", str(SAMPLE), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("config", ["nemotron-340b", "concise"])
def test_eval_agrees_with_score_output_reweighted_by_hand(scored_sample, capsys, config):
    cache, score_out = scored_sample
    rows = [json.loads(line) for line in score_out.read_text().splitlines()]
    shaping = load_config(ROOT / "configs" / "rewards" / f"{config}.yaml").shaping
    weights = STEERLM9.weight_dict(shaping.weights)
    penalty = shaping.length_penalty
    # Reward-model token counts of each response, from the cache (concise.yaml penalises past 256 tokens).
    cached = [json.loads(line) for line in cache.read_text().splitlines()[1:]]
    tokens = {r["id"]: (r["chosen"]["completion_tokens"], r["rejected"][0]["completion_tokens"]) for r in cached}

    def by_hand(attributes: dict, length: int) -> float:
        over = max(0, length - penalty.target_tokens) / penalty.target_tokens
        return sum(w * attributes[name] for name, w in weights.items()) - penalty.alpha * over

    wins: dict[str, list[bool]] = {}
    for row in rows:
        chosen_tokens, rejected_tokens = tokens[row["id"]]
        wins.setdefault(row["subset"], []).append(by_hand(row["chosen_attributes"], chosen_tokens)
                                                  > by_hand(row["rejected_attributes"], rejected_tokens))
    result = _eval_json(capsys, "--scored", str(cache), "--config", f"configs/rewards/{config}.yaml",
                        "--bootstrap", "0")
    (evaluated,) = result["configs"]
    assert evaluated["overall"] == pytest.approx(sum(sum(w) for w in wins.values()) / len(rows))
    for subset, w in wins.items():
        assert evaluated["subsets"][subset] == pytest.approx(sum(w) / len(w))
    chat_hard = sum(sum(w) / len(w) * EXAMPLE_COUNTS[s] for s, w in wins.items()) / sum(EXAMPLE_COUNTS[s] for s in wins)
    assert evaluated["sections"] == {"Chat Hard": pytest.approx(chat_hard)}


def test_sweeps_and_configs_run_no_model_after_the_first_scoring(scored_sample, tmp_path, monkeypatch, capsys):
    """Zero forwards: every nn.Module call is counted, and loading any model would fail."""
    import transformers

    import steer_reward.modeling

    cache, _ = scored_sample
    calls = []
    original_call = torch.nn.Module.__call__
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda self, *a, **k: calls.append(self) or
                        original_call(self, *a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("eval must not load a model when the scored file matches")

    monkeypatch.setattr(steer_reward.modeling, "load_reward_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    plot = tmp_path / "sweep.png"
    capsys.readouterr()
    assert main(["eval", "--data", str(SAMPLE), "--scored", str(cache), "--config", "configs/rewards/concise.yaml",
                 "--config", "configs/rewards/correctness-first.yaml", "--sweep",
                 "correctness=0:1:0.25,verbosity=-1:0:0.25", "--plot", str(plot), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert calls == []
    assert "25 weight vectors" in out and "Pareto front" in out and "correctness-first" in out
    assert "RANDOM weights" in out  # scored by the demo model: said next to the numbers
    assert plot.is_file() and plot.stat().st_size > 1000


def test_sweep_points_equal_reweighting_through_steer_reward(scored_sample, make_reward, capsys):
    cache, _ = scored_sample
    result = _eval_json(capsys, "--scored", str(cache), "--sweep", "helpfulness=0:1:0.5,verbosity=-1:0:1",
                        "--bootstrap", "0")
    data = load_preferences(SAMPLE)
    reward = make_reward({"weights": "steerlm-70b"})
    prompts = [r.prompts[0] for r in data.rows]
    chosen = reward.score(prompts, [r.completions[0] for r in data.rows]).attributes
    rejected = reward.score(prompts, [r.completions[1] for r in data.rows]).attributes
    assert len(result["sweep"]["points"]) == 6
    for point in result["sweep"]["points"]:
        variant = reward.with_weights(point["weights"])
        wins = (variant.rewards(chosen) > variant.rewards(rejected)).double().mean()
        assert point["overall"] == pytest.approx(float(wins))
    assert any(p["pareto"] for p in result["sweep"]["points"])
    assert len(result["sweep"]["best"]) == 6


def test_scored_file_must_match_the_data_and_the_scoring(scored_sample, tmp_path, capsys):
    cache, score_out = scored_sample
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rows[3]["chosen"] += " (edited)"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = [
        (["--data", str(edited), "--scored", str(cache)], "does not match"),
        (["--data", str(SAMPLE), "--scored", str(cache), "--set", "model.template=raw"],
         "was scored with model.template='chat_template'"),
        (["--data", str(SAMPLE), "--scored", str(cache), "--set", "model.schema=armorm19"],
         "was scored with schema 'steerlm9'"),
        (["--data", str(SAMPLE), "--scored", str(score_out)], "not a scored-preferences file"),
        (["--data", str(SAMPLE), "--scored", str(cache), "--model", "/elsewhere/rm"], "was scored with model.path"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["eval", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args, message", [
    (["--sweep", "corectness=0:1:0.5"], "did you mean 'correctness'"),
    (["--sweep", "correctness=0:1"], "expected START:STOP:STEP"),
    (["--sweep", "correctness=0:1:0"], "step must be positive"),
    (["--sweep", "correctness=0:1:x"], "is not a number"),
    (["--sweep", "humor=0:1:0.5"], "not a trained output"),
    (["--sweep", "correctness=0:1000000:1"], "at most"),
    (["--config", "configs/rewards/concise.yaml", "--config", "configs/rewards/concise.yaml"], "given twice"),
])
def test_bad_sweeps_and_configs_exit_2_with_one_line(scored_sample, capsys, args, message):
    cache, _ = scored_sample
    capsys.readouterr()
    assert main(["eval", "--data", str(SAMPLE), "--scored", str(cache), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_bad_data_exit_2_before_any_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_rejected = tmp_path / "bad.jsonl"
    no_rejected.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    for path, message in ((empty, "no preference rows"), (no_rejected, "bad.jsonl:1: a preference row needs"),
                          (tmp_path / "missing.jsonl", "does not exist")):
        capsys.readouterr()
        assert main(["eval", "--data", str(path), "--model", "/no/such/model"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    capsys.readouterr()
    assert main(["eval", "--data", str(SAMPLE)]) == 2  # nothing to score with
    assert "--model" in capsys.readouterr().err


def test_build_report_library_api(scored_sample):
    from steer_reward.eval.scored import read_scored

    cache, _ = scored_sample
    scored = read_scored(cache, load_preferences(SAMPLE))
    report = build_report(str(SAMPLE), scored, [("base", load_config(None))], parse_sweep("verbosity=-1:0:0.5"),
                          draws=50, top=2)
    assert report.metric == "score" and len(report.sweep) == 3 and len(report.best) == 2
    assert [p.name for p in report.presets] == list(STEERLM9.presets)
    best = max(p.accuracy.score for p in report.sweep)
    assert report.best[0].accuracy.score == best and "section:Chat Hard" in report.best[0].accuracy.intervals
