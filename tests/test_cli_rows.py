"""Input rows of the CLI: every kind of bad row is an error naming its line, with the rows before it scored and
written; over-long samples are reported in every output."""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
from pathlib import Path

import pytest

from steer_reward.cli import main

GOOD = json.dumps({"prompt": "What is 2+2?", "completion": "4"})
LONG = "answer " * 6000  # about 6000 tokens of the demo tokenizer: over the default max_length of 4096


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


BAD_ROWS = {
    "content-not-a-string": ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
                             "content must be a string, got 5"),
    "history-message-without-role": ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}',
                                     "must be a mapping with 'role' and 'content'"),
    "prompt-role-not-a-string": ('{"prompt": [{"role": 1, "content": "hi"}], "completion": "x"}',
                                 "role must be a string"),
    "lone-surrogate-completion": ('{"prompt": "p", "completion": "\\ud800"}', "lone surrogate"),
    "lone-surrogate-in-a-pair": ('{"prompt": "p", "chosen": "a", "rejected": "b \\udfff"}', "lone surrogate"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_row_names_its_line_and_the_rows_before_it_are_written(tmp_path, capsys, kind):
    bad, message = BAD_ROWS[kind]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join([GOOD, GOOD, GOOD, bad, GOOD]) + "\n", encoding="utf-8")
    assert main(["score", "--model", "demo", "--input", str(source), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{source}:4: " in err and message in err
    scored = _rows(out)
    assert len(scored) == 3 and all(isinstance(r["reward"], float) for r in scored)


def test_a_row_refused_while_formatting_names_its_line_and_keeps_the_chunk(tmp_path, capsys):
    """The row passes the row check and fails in the formatter (over-long under model.overlong: reject) in the
    middle of a chunk: the good rows of that chunk are still scored and written."""
    pair = json.dumps({"prompt": "p", "chosen": "short", "rejected": LONG})
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join([GOOD, GOOD, pair, GOOD]) + "\n")
    assert main(["score", "--model", "demo", "--input", str(source), "--output", str(out),
                 "--set", "model.overlong=reject"]) == 2
    err = capsys.readouterr().err
    assert f"{source}:3: rejected: the completion has" in err and "model.max_length 4096" in err
    assert len(_rows(out)) == 2


def test_a_lone_surrogate_is_one_line_without_traceback(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(GOOD + "\n" + '{"prompt": "p", "completion": "\\ud800"}\n')
    result = subprocess.run([sys.executable, "-m", "steer_reward.cli", "score", "--model", "demo", "--input",
                             str(source), "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and f"{source}:2: " in result.stderr
    assert len(_rows(out)) == 1


def test_invalid_utf8_names_its_line(tmp_path, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "p", "completion": "\xff"}\n')
    assert main(["score", "--model", "demo", "--input", str(source), "--output", str(out)]) == 2
    assert f"{source}:2: not valid UTF-8" in capsys.readouterr().err
    assert len(_rows(out)) == 1


def test_a_byte_order_mark_is_accepted(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(codecs.BOM_UTF8 + (GOOD + "\r\n" + GOOD + "\r\n").encode())
    assert main(["score", "--model", "demo", "--input", str(source), "--output", str(out)]) == 0
    assert [r["completion"] for r in _rows(out)] == ["4", "4"]


def test_over_long_samples_are_reported_in_every_score_row(tmp_path, capsys, make_reward):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "Write a lot.", "completion": LONG},
            {"prompt": "p", "chosen": LONG, "rejected": "no"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "--model", "demo", "--input", str(source), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 samples had their completion cut" in err
    short, long, pair = _rows(out)
    assert short["prompt_truncated_tokens"] == short["completion_truncated_tokens"] == 0
    expected = make_reward().scorer.encode(["Write a lot."], [LONG])[0]
    assert long["completion_truncated_tokens"] == expected.completion_truncated > 1000
    assert long["prompt_truncated_tokens"] == expected.prompt_truncated
    assert pair["chosen_completion_truncated_tokens"] > 0 and pair["rejected_completion_truncated_tokens"] == 0


def test_best_of_n_reports_truncation_per_candidate(tmp_path, make_reward):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me a long story about a printing press."}) + "\n")
    assert main(["best-of-n", "--policy", "demo", "--model", "demo", "--prompts", str(prompts), "--n", "3",
                 "--max-new-tokens", "12", "--output", str(out), "--set", "model.max_length=8"]) == 0
    (row,) = _rows(out)
    formatter = make_reward().scorer.formatter
    formatter_at_8 = type(formatter)(formatter.tokenizer, formatter.template, 8)
    for candidate in row["candidates"]:
        (sample,) = formatter_at_8.encode([row["prompt"]], [candidate["text"]])
        assert candidate["prompt_truncated_tokens"] == sample.prompt_truncated > 0
        assert candidate["completion_truncated_tokens"] == sample.completion_truncated


def test_demo_table_reports_cut_samples(capsys):
    assert main(["demo", "--set", "model.max_length=64"]) == 0
    assert "cut to fit model.max_length:" in capsys.readouterr().out
