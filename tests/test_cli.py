import json
import subprocess
import sys

import pytest

from dbrx.cli import main


def run_cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "dbrx", *args], capture_output=True, text=True, input=input,
                          timeout=300)


def test_info_132b(capsys):
    assert main(["info", "dbrx-132b", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert abs(rep["params_total"] / 131.6e9 - 1) < 0.01
    assert abs(rep["params_active_per_token"] / 36e9 - 1) < 0.03
    assert rep["kv_cache_bytes_per_token_bf16"] == 160 * 1024
    m = rep["memory_bytes"]
    assert m["int4"] < m["int8"] < m["bf16"] == 2 * rep["params_total"]
    assert main(["info", "dbrx-9b", "--override", "n_layers=4"]) == 0
    assert "n_layers 4" in capsys.readouterr().out


def test_every_verb_has_help():
    from dbrx.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    verbs = set(sub.choices)
    assert {"info", "init", "generate", "chat", "convert", "prepare", "pretrain", "finetune", "plot",
            "bench"} <= verbs
    for verb in verbs:
        text = sub.choices[verb].format_help()
        assert "usage:" in text and len(text) > 100, verb


def test_bad_arguments_give_one_line_errors(tmp_path):
    r = run_cli("info", "dbrx-nope")
    assert r.returncode != 0 and "dbrx-132b" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("generate", "--model", str(tmp_path / "missing"), "hi", "--temperature", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "missing" in r.stderr
    r = run_cli("init", "--preset", "dbrx-tiny", str(tmp_path / "x"), "--override", "n_heads=5")
    assert r.returncode != 0 and "n_heads" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("info", "dbrx-tiny", "--no-such-flag")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_init_generate_and_chat(tmp_path):
    out = tmp_path / "ckpt"
    assert main(["init", "--preset", "dbrx-tiny", str(out), "--seed", "1"]) == 0
    assert (out / "config.json").exists()
    assert main(["init", "--preset", "dbrx-tiny", str(out)]) == 2  # refuses to overwrite
    r = run_cli("generate", "--model", str(out), "Hello", "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n")
    r2 = run_cli("generate", "--model", str(out), "Hello", "--max-new-tokens", "5", "--temperature", "0")
    assert r2.stdout == r.stdout  # greedy is deterministic
    r = run_cli("chat", "--model", str(out), "--max-new-tokens", "4", "--temperature", "0",
                input="hello there\n/reset\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("dbrx> ") == 2


def test_system_needs_chat(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "hi", "--system", "Be terse."]) == 2
    assert "--system only applies with --chat" in capsys.readouterr().err


def test_chat_survives_a_turn_that_does_not_fit(tmp_path, capsys, monkeypatch):
    import io

    out = tmp_path / "ckpt"
    assert main(["init", "--preset", "dbrx-tiny", str(out)]) == 0
    long_turn = "word " * 300  # over dbrx-tiny's max_seq_len of 256 tokens
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hi\n{long_turn}\nagain\n"))
    assert main(["chat", "--model", str(out), "--system", "", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "max_seq_len" in captured.err and captured.err.count("error") == 1
    assert captured.out.count("dbrx> ") == 2  # the turn after the error was answered; the refused one printed nothing
