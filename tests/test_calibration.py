"""Calibration: ArmoRM's verbosity decorrelation against a hand-written copy of its rule (scipy's Spearman), the
λ grid and the not-reachable case, fixed normalization statistics, and the files ``steer-reward calibrate`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from steer_reward.cli import main
from steer_reward.config import load_config
from steer_reward.decorrelation import ARMORM_GRID, fit_decorrelation, fit_decorrelation_report, spearman, \
    spearman_columns
from steer_reward.schema import STEERLM9
from steer_reward.shaping import RewardShaper

ROOT = Path(__file__).resolve().parents[1]
V = STEERLM9.index("verbosity")


def armorm_rule(values: np.ndarray, verbosity_dim: int, dims: list[int], threshold: float) -> dict[int, float]:
    """ArmoRM's ``find_proper_verbosity_penalties`` (RLHFlow/RLHF-Reward-Modeling armo-rm/stage-2_train.py), written
    again from its description: penalties start at 1, the grid is walked upwards, an attribute keeps the first
    penalty whose Spearman correlation with verbosity is <= threshold."""
    grid = [0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65,
            0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    penalties = {d: 1.0 for d in dims}
    left = set(dims)
    for penalty in grid:
        adjusted = values - penalty * values[:, [verbosity_dim]]
        for d in sorted(left):
            if spearmanr(adjusted[:, d], values[:, verbosity_dim])[0] <= threshold:
                penalties[d] = penalty
                left.discard(d)
    return penalties


def synthetic_attributes(n: int = 500, seed: int = 0) -> torch.Tensor:
    """Verbosity v, and attributes with known relations to it: helpfulness = 0.3 v + noise (reachable),
    correctness independent (λ 0), coherence = −v + noise (λ 0), complexity = 2 v + small noise (no λ ≤ 0.95
    reaches the threshold: the not-reachable case)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g, dtype=torch.float64) * 4
    values = torch.zeros(n, 9, dtype=torch.float64)
    values[:, V] = v
    values[:, STEERLM9.index("helpfulness")] = 0.3 * v + torch.rand(n, generator=g, dtype=torch.float64)
    values[:, STEERLM9.index("correctness")] = torch.rand(n, generator=g, dtype=torch.float64) * 4
    values[:, STEERLM9.index("coherence")] = 4 - v + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    values[:, STEERLM9.index("complexity")] = 2 * v + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    return values


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (300,), generator=g).double()  # many ties
    y = torch.randint(0, 7, (300,), generator=g).double() + 0.3 * x
    assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    columns = torch.stack([x, y, torch.randn(300, generator=g, dtype=torch.float64)], 1)
    expected = [spearmanr(columns[:, k].numpy(), y.numpy())[0] for k in range(3)]
    assert spearman_columns(columns, y).tolist() == pytest.approx(expected, abs=1e-12)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # constant: 0 (scipy: nan)
    assert np.isnan(spearman([1.0, float("nan")], [1.0, 2.0])) and np.isnan(spearman([1.0], [2.0]))


def test_decorrelation_equals_armorms_rule_on_synthetic_attributes():
    values = synthetic_attributes()
    dims = [k for k in STEERLM9.live if k != V]
    for threshold in (0.03, 0.1, 0.0):
        expected = armorm_rule(values.numpy(), V, dims, threshold)
        fits = fit_decorrelation_report(values, STEERLM9, threshold)
        assert {STEERLM9.index(f.attribute): f.lam for f in fits} == expected
        assert fit_decorrelation(values, STEERLM9, threshold) == {STEERLM9.names[d]: lam for d, lam in expected.items()}
        for fit in fits:
            a = values[:, STEERLM9.index(fit.attribute)]
            assert fit.before == pytest.approx(spearmanr(a, values[:, V])[0], abs=1e-12)
            assert fit.after == pytest.approx(spearmanr(a - fit.lam * values[:, V], values[:, V])[0], abs=1e-12)
            assert fit.reached == (fit.after <= threshold and fit.lam in ARMORM_GRID)
    by_name = {f.attribute: f for f in fit_decorrelation_report(values, STEERLM9, 0.03)}
    assert 0.1 < by_name["helpfulness"].lam < 0.95 and by_name["helpfulness"].reached
    assert by_name["correctness"].lam == 0.0 and by_name["coherence"].lam == 0.0
    complexity = by_name["complexity"]
    assert not complexity.reached and complexity.lam == 1.0 and complexity.after > 0.9  # ArmoRM's fallback
    # The grid is walked in order: the λ chosen is the smallest that reaches the threshold.
    h = values[:, STEERLM9.index("helpfulness")]
    smaller = [g for g in ARMORM_GRID if g < by_name["helpfulness"].lam]
    assert all(spearman(h - g * values[:, V], values[:, V]) > 0.03 for g in smaller)


def test_custom_grid_and_unreached_value():
    values = synthetic_attributes()
    fits = {f.attribute: f for f in fit_decorrelation_report(values, STEERLM9, 0.03, grid=[0.5, 0.0, 2.5],
                                                             unreached=3.0)}
    assert fits["correctness"].lam == 0.0 and fits["complexity"].lam == 2.5 and fits["complexity"].reached
    assert fits["helpfulness"].lam == 0.5


def _write_score_rows(path: Path, values: torch.Tensor) -> None:
    """``steer-reward score``-shaped rows (pairs: chosen_attributes / rejected_attributes)."""
    dicts = [dict(zip(STEERLM9.names, row)) for row in values.tolist()]
    with path.open("w") as out:
        for i in range(0, len(dicts) - 1, 2):
            out.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_attributes": dicts[i],
                                  "rejected_attributes": dicts[i + 1]}) + "\n")


def test_calibrate_cli_writes_a_usable_shaping_section(tmp_path, capsys):
    values = synthetic_attributes(400)
    scored = tmp_path / "scored.jsonl"
    _write_score_rows(scored, values)
    out, plot = tmp_path / "shaping.yaml", tmp_path / "calibration.png"
    assert main(["calibrate", "--scored", str(scored), "--out", str(out), "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    assert "before" in captured.out and "after" in captured.out and "NO (λ = 1.0" in captured.out
    assert "complexity" in captured.err and "not reached" in captured.err
    assert plot.is_file() and plot.stat().st_size > 1000
    config = load_config(out)
    expected = fit_decorrelation(values, STEERLM9, 0.03)
    assert config.shaping.decorrelate == expected
    assert config.shaping.normalization == "fixed"
    assert Path(config.shaping.stats_file) == tmp_path / "shaping.stats.json"
    # Shaping the reference data with the written files: decorrelated, then exactly standardized.
    shaper = RewardShaper(STEERLM9, config.shaping)
    normalized = shaper.normalized(shaper.decorrelated(values))
    live = list(STEERLM9.live)
    torch.testing.assert_close(normalized[:, live].mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(normalized[:, live].std(0, unbiased=False), torch.ones(5, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    h = STEERLM9.index("helpfulness")
    by_hand = values[:, h] - expected["helpfulness"] * values[:, V]
    stats = json.loads(Path(config.shaping.stats_file).read_text())
    assert stats["helpfulness"]["mean"] == pytest.approx(float(by_hand.mean()))
    assert stats["helpfulness"]["std"] == pytest.approx(float(by_hand.std(unbiased=False)))
    assert stats["verbosity"]["mean"] == pytest.approx(float(values[:, V].mean()))  # verbosity itself unchanged


def test_calibrate_merges_into_a_base_config_and_reads_eval_files(tmp_path, capsys):
    from steer_reward.eval.pairs import PreferenceData, PreferenceRow
    from steer_reward.eval.scored import ScoredPreferences, write_scored

    values = synthetic_attributes(60, seed=3)
    rows = [PreferenceRow(str(i), "s", ("p", "p", "p"), ("a", "b", "c"), i + 1) for i in range(20)]
    offsets = list(range(0, 61, 3))
    scored = ScoredPreferences(STEERLM9, values, torch.full((60,), 5), torch.zeros(60, dtype=torch.bool), offsets,
                               [r.id for r in rows], ["s"] * 20, {"path": "x"})
    cache = tmp_path / "eval_scored.jsonl"
    write_scored(cache, scored, PreferenceData("pairs.jsonl", rows))
    out = tmp_path / "calibrated.yaml"
    base = ROOT / "configs" / "rewards" / "concise.yaml"
    assert main(["calibrate", "--scored", str(cache), "--out", str(out), "--config", str(base),
                 "--threshold", "0.05", "--no-normalization"]) == 0
    config = load_config(out)
    assert config.shaping.decorrelate == fit_decorrelation(values, STEERLM9, 0.05)
    assert config.shaping.weights == {"preset": "steerlm-70b", "verbosity": -1.2}  # the base's, kept
    assert config.shaping.length_penalty.alpha == 1.0 and config.shaping.normalization == "none"
    assert "# Everything else from" in out.read_text()
    assert not (tmp_path / "calibrated.stats.json").exists()


@pytest.mark.parametrize("setup, args, message", [
    ("unreachable", ["--strict"], "no λ on ArmoRM's grid brings these under 0.03: complexity"),
    ("empty", [], "empty file"),
    ("constant", [], "'verbosity' is constant"),
    ("nan", [], "not finite"),
    ("unreachable", ["--threshold", "2"], "--threshold must be a correlation"),
    ("rows", [], "no 'attributes'"),
])
def test_calibrate_bad_input_exits_2_with_one_line(tmp_path, capsys, setup, args, message):
    scored = tmp_path / "scored.jsonl"
    values = synthetic_attributes(40)
    if setup == "empty":
        scored.write_text("")
    elif setup == "rows":
        scored.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    else:
        if setup == "constant":
            values[:, V] = 2.0
        if setup == "nan":
            values[3, 4] = float("nan")
        _write_score_rows(scored, values)
    capsys.readouterr()
    assert main(["calibrate", "--scored", str(scored), "--out", str(tmp_path / "o.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
