"""dbrx.eval.code: pass@k against hand computations, HumanEval read offline, and the sandbox holding against programs
that loop, fork, allocate, delete files or connect. The adversarial cases also run without the in-process guard
(guard=False), to show the kernel's layers hold alone where this machine has them (sandbox_measures)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
from fractions import Fraction

import pytest
import torch
from conftest import randomize_

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.eval.code import (
    STOP_STRINGS,
    check_program,
    evaluate_completions,
    humaneval_program,
    pass_at_k,
    read_problems,
    run_humaneval,
    sandbox_measures,
    truncate_completion,
)
from dbrx.tokens import PADDED_VOCAB_SIZE

GUARDS = [pytest.param(True, id="guard"), pytest.param(False, id="kernel-only")]


def _needs(guard: bool, *layers: str) -> None:
    """Without the guard, a case needs one of `layers` on this machine."""
    if not guard and not set(layers) & set(sandbox_measures()):
        pytest.skip(f"this machine has none of the sandbox layers {layers} (has {sandbox_measures()})")


def _sandbox_processes() -> list[int]:
    """Pids of any sandbox child still alive."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"--sandbox-child" in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


# ---- pass@k --------------------------------------------------------------------------------------------------
def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 4) == 1.0  # n - c < k: every 4 of 5 samples include a passing one
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


@pytest.mark.parametrize("n,c,k", [(200, 10, 100), (200, 1, 1), (200, 3, 10), (1000, 7, 500), (50, 49, 1)])
def test_pass_at_k_matches_exact_binomials(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


# ---- HumanEval data ------------------------------------------------------------------------------------------
def test_read_problems_offline():
    problems = read_problems()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:2]] == ["HumanEval/0", "HumanEval/1"]
    assert len({p["task_id"] for p in problems}) == 164
    p = problems[0]
    program = humaneval_program(p, p["canonical_solution"])
    assert program.startswith(p["prompt"]) and program.rstrip().endswith(f"check({p['entry_point']})")


def test_read_problems_bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": "x", "prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing .*entry_point"):
        read_problems(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no problems"):
        read_problems(path)


def test_truncate_completion_at_stop_strings():
    assert truncate_completion("    return x\n\ndef other():\n") == "    return x\n"
    assert truncate_completion("    return x\n# note\nif y:") == "    return x"
    assert truncate_completion("    return x") == "    return x"
    assert set(STOP_STRINGS) == {"\ndef", "\nclass", "\nif", "\nprint", "\n#"}


def test_canonical_solutions_pass_and_empty_completions_fail():
    problems = read_problems()[:6]
    good = evaluate_completions(problems, [[p["canonical_solution"]] for p in problems], [1], timeout_s=10)
    assert good["pass@1"] == 1.0, [q["results"] for q in good["problems"]]
    empty = evaluate_completions(problems, [[""] for _ in problems], [1], timeout_s=10)
    assert empty["pass@1"] == 0.0


@pytest.mark.slow
def test_all_canonical_solutions_pass():
    problems = read_problems()
    out = evaluate_completions(problems, [[p["canonical_solution"]] for p in problems], [1], timeout_s=15)
    assert out["pass@1"] == 1.0, [(q["task_id"], q["results"]) for q in out["problems"] if not all(q["passed"])]


def test_pass_at_k_over_mixed_samples():
    problems = read_problems()[:2]
    right = [p["canonical_solution"] for p in problems]
    completions = [[right[0], "    return None\n", right[0]], ["    pass\n", "    pass\n", "    pass\n"]]
    out = evaluate_completions(problems, completions, [1, 2], timeout_s=10)
    assert [q["passed"] for q in out["problems"]] == [[True, False, True], [False, False, False]]
    assert out["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["pass@2"] == pytest.approx((1.0 + 0) / 2)  # 1 - C(1,2)/C(3,2) = 1 for the first problem
    with pytest.raises(ValueError, match="k must be in"):
        evaluate_completions(problems, completions, [4])


# ---- the sandbox ---------------------------------------------------------------------------------------------
def test_correct_program_passes_and_wrong_one_fails():
    assert check_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\nprint('ok')\n") == (True, "passed")
    ok, result = check_program("def f(x):\n    return x\n\nassert f(1) == 2, 'wrong'\n")
    assert not ok and result == "failed: AssertionError: wrong"
    ok, result = check_program("def f(:\n")
    assert not ok and "SyntaxError" in result


def test_exit_is_not_a_pass():
    assert check_program("import sys\nsys.exit(0)\n") == (False, "failed: SystemExit: 0")
    ok, _ = check_program("import os\nos._exit(0)\n")  # exits before the runner confirms the end
    assert not ok


def test_files_inside_the_working_directory_work():
    program = ("import os, shutil, tempfile\nopen('a.txt', 'w').write('x')\nos.makedirs('d/e')\n"
               "open('d/e/f', 'w').write('y')\nshutil.rmtree('d')\nos.remove('a.txt')\ntempfile.mkstemp()\n"
               "assert os.environ['HOME'] == os.getcwd()\n")
    assert check_program(program) == (True, "passed")


@pytest.mark.parametrize("guard", GUARDS)
def test_infinite_loop_times_out(guard):
    start = time.monotonic()
    assert check_program("while True:\n    pass\n", timeout_s=1.0, guard=guard) == (False, "timed out")
    assert time.monotonic() - start < 1.0 + 3.0
    assert _sandbox_processes() == []


@pytest.mark.parametrize("guard", GUARDS)
def test_fork_bomb_fails_and_leaves_nothing(guard):
    _needs(guard, "seccomp", "rlimits")
    if not guard and "seccomp" not in sandbox_measures() and os.geteuid() == 0:
        pytest.skip("without seccomp nothing bounds the processes of uid 0 (RLIMIT_NPROC does not apply to root)")
    program = "import os\nwhile True:\n    os.fork()\n"
    ok, result = check_program(program, timeout_s=3.0, guard=guard)
    assert not ok and result != "timed out", result
    ok, result = check_program("import subprocess\nsubprocess.run(['true'])\n", timeout_s=3.0, guard=guard)
    assert not ok
    ok, result = check_program("import threading\nthreading.Thread(target=print).start()\n", guard=guard)
    assert not ok
    assert _sandbox_processes() == []
    assert subprocess.run(["true"]).returncode == 0  # the machine can still start processes


@pytest.mark.parametrize("guard", GUARDS)
def test_unbounded_allocation_fails(guard):
    ok, result = check_program("x = []\nwhile True:\n    x.append(bytes(10**8))\n", memory_mb=256, guard=guard)
    assert (ok, result) == (False, "failed: MemoryError")
    assert check_program("x = bytearray(10**11)\n", guard=guard) == (False, "failed: MemoryError")


@pytest.mark.parametrize("guard", GUARDS)
def test_deleting_files_outside_fails_and_they_survive(tmp_path, guard):
    _needs(guard, "landlock-fs")
    folder = tmp_path / "keep"
    folder.mkdir()
    sentinel = folder / "sentinel.txt"
    sentinel.write_text("still here")
    attempts = [f"import os\nos.remove({str(sentinel)!r})\n", f"import shutil\nshutil.rmtree({str(folder)!r})\n",
                f"import os\nos.rename({str(sentinel)!r}, 'stolen.txt')\n",
                f"open({str(sentinel)!r}, 'w').write('overwritten')\n",
                f"print(open({str(sentinel)!r}).read())\n"]  # reading the user's files fails too
    for program in attempts:
        ok, result = check_program(program, guard=guard)
        assert not ok and "PermissionError" in result, (program, result)
    assert sentinel.read_text() == "still here"


@pytest.mark.parametrize("guard", GUARDS)
def test_network_is_unreachable(guard):
    _needs(guard, "netns", "seccomp", "landlock-net")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.3)
        port = server.getsockname()[1]
        program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')\n"
        ok, result = check_program(program, timeout_s=5.0, guard=guard)
        assert not ok and result != "timed out", result
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        check_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        check_program("pass", memory_mb=8)


# ---- HumanEval end to end on a tiny random model -------------------------------------------------------------
def test_run_humaneval_end_to_end():
    cfg = DbrxConfig.from_preset("dbrx-tiny", vocab_size=PADDED_VOCAB_SIZE, max_seq_len=256)
    torch.manual_seed(0)
    model = randomize_(DbrxForCausalLM.from_config(cfg), seed=3, std=0.05).eval()
    out = run_humaneval(model, None, n_samples=2, ks=[1, 2], limit=2, timeout_s=5.0, temperature=0.8,
                        max_new_tokens=12, seed=7)
    assert out["pass@1"] == 0.0 and out["pass@2"] == 0.0  # a random model solves nothing, but the flow runs
    assert [q["task_id"] for q in out["problems"]] == ["HumanEval/0", "HumanEval/1"]
    for q in out["problems"]:
        assert len(q["completions"]) == 2 and len(q["results"]) == 2 and q["passed"] == [False, False]
        assert all(not any(s in c for s in STOP_STRINGS) for c in q["completions"])
        assert all(r.startswith("failed") or r == "timed out" for r in q["results"])
    again = run_humaneval(model, None, n_samples=2, ks=[1], limit=1, timeout_s=5.0, temperature=0.8,
                          max_new_tokens=12, seed=7)
    assert again["problems"][0]["completions"] == out["problems"][0]["completions"]  # seeded: reproducible
    with pytest.raises(ValueError, match="k must be in"):
        run_humaneval(model, None, n_samples=1, ks=[2], limit=1)
