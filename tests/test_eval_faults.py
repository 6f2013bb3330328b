"""`safekey-trl eval` under hostile and careless use: options refused by name before anything loads, an output that
cannot be written found before generating, Ctrl-C that stops at once and keeps what was generated."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback import ChatCompletionsServer, completion
from typer.testing import CliRunner

from safekey_trl.cli import app
from safekey_trl.evaluation import read_results

runner = CliRunner()
PROMPTS = [{"prompt": f"How do I do thing {i}?", "id": str(i)} for i in range(4)]


class Judge(ChatCompletionsServer):
    """A judge that answers `reply`, after `delay` seconds (60: it never answers in time)."""

    def __init__(self, reply: str = '{"score": 1}', delay: float = 0.0):
        super().__init__()
        self.reply, self.delay = reply, delay

    def respond(self, body: dict) -> tuple[float, int, bytes]:
        return self.delay, 200, completion(self.reply)


def eval_command(model_dir: Path, prompts: Path, out: Path, judge_url: str, *extra: str) -> list[str]:
    return [
        "eval", str(model_dir), "--suite", str(prompts), "--out", str(out), "--backend", "transformers",
        "--max_new_tokens", "4", "--batch_size", "2", "--judge_url", judge_url, "--judge_model", "j",
        "--judge_backoff", "0", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--limit", "-1"], "error: --limit must be at least 1, got -1"),
        (["--judge_workers", "0"], "error: --judge_workers must be at least 1, got 0"),
        (["--samples", "0"], "error: --samples must be at least 1, got 0"),
        (["--judge_timeout", "0"], "error: --judge_timeout must be a number of seconds > 0, got 0.0"),
    ],
)
def test_eval_options_that_cannot_work_are_refused_by_name_at_once(tmp_path, monkeypatch, options, message):
    monkeypatch.setattr("safekey_trl.evaluation.make_generator", lambda *a, **k: pytest.fail("the model was loaded"))
    result = runner.invoke(app, ["eval", "tiny:qwen2", "--suite", "xstest", *options])
    assert result.exit_code == 2 and result.output.strip() == message


def test_a_generation_longer_than_the_models_positions_is_refused(tmp_path, model_dir, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    monkeypatch.setattr("safekey_trl.evaluation.make_generator", lambda *a, **k: pytest.fail("the model was loaded"))
    command = eval_command(model_dir, prompts, tmp_path / "r.jsonl", "http://127.0.0.1:9/v1")
    command[command.index("--max_new_tokens") + 1] = "1000000000"
    result = runner.invoke(app, command)
    assert result.exit_code == 2
    assert result.output.replace("\n", "") == (
        f"error: --max_new_tokens 1000000000 is not below {model_dir}'s 16384 positions (max_position_embeddings): "
        "the prompt and the generation must fit in them"
    )


def test_an_output_that_cannot_be_written_is_found_before_generating(tmp_path, model_dir, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    out = tmp_path / "ro" / "r.jsonl"
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out.parent)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr("safekey_trl.evaluation.make_generator", lambda *a, **k: pytest.fail("the model was loaded"))
    result = runner.invoke(app, eval_command(model_dir, prompts, out, "http://127.0.0.1:9/v1"))
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --out {out.parent}: cannot write there (Read-only file system)"


def test_ctrl_c_during_eval_stops_at_once_keeping_what_was_generated(tmp_path, model_dir, monkeypatch):
    prompts, out = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    cli = str(Path(sys.executable).parent / "safekey-trl")
    with Judge(delay=60.0) as judge:  # never answers in time
        command = [cli, *eval_command(model_dir, prompts, out, judge.url, "--judge_timeout", "50")]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while len(judge.requests) < 4 and time.monotonic() < deadline:  # everything generated, judging hangs
            time.sleep(0.1)
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("eval kept running after Ctrl-C")
    assert time.monotonic() - interrupted < 10
    assert process.returncode == 130, output
    flat = output.replace("\n", "")
    assert f"interrupted: {out} holds 0 judged rollout(s) of 4, and 4 generated but not yet judged" in flat
    assert "Run the same command again to resume." in flat
    rows = read_results(out)
    assert len(rows) == 4 and all(row["error"] == "interrupted before it was judged" for row in rows)

    # The same command judges them from the stored responses, without generating again
    def no_generation(self, *args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr("safekey_trl.evaluation.generation.TransformersGenerator.generate", no_generation)
    with Judge() as judge:
        result = runner.invoke(app, eval_command(model_dir, prompts, out, judge.url))
    assert result.exit_code == 0, result.output
    judged = read_results(out)
    assert [row["score"] for row in judged] == [1, 1, 1, 1]
    assert [row["response"] for row in judged] == [row["response"] for row in rows]


@pytest.mark.parametrize(
    ("max_length", "message"),
    [
        ("100000", "error: --max_length 100000 is more than {model}'s 16384 positions"),
        ("0", "error: --max_length must be at least 1, got 0"),
    ],
)
def test_eval_probes_refuses_a_max_length_beyond_the_models_positions(model_dir, monkeypatch, max_length, message):
    monkeypatch.setattr("safekey_trl.evaluation.load_eval_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = runner.invoke(app, ["eval-probes", str(model_dir), "--data", "x.jsonl", "--max_length", max_length])
    assert result.exit_code == 2 and result.output.replace("\n", "").startswith(message.format(model=model_dir))
