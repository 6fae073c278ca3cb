"""The served process of the benchmarks that run real servers (bench_abuse, bench_login,
bench_service, bench_revocation): starting ``thallus serve`` and its CLI, the environment they get,
which ``thallus`` they import, the process's output, and what ``/proc`` says about it.

``thallus serve`` is started by ``tests.server`` (the helper the black-box tests use), so importing
this module puts the repository root on ``sys.path``; the benchmarks import from ``tests``, never the
other way round.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

from common import ROOT, BenchmarkError

if str(ROOT) not in sys.path:  # tests.server is imported from the repository root
    sys.path.insert(0, str(ROOT))

from tests.bodies_support import memory_kib
from tests.server import THALLUS, Server, running_server, stop_process

# -- the environment and the source ----------------------------------------------------------------


def clean_environment(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without ``THALLUS_*`` (the developer's own), plus ``settings``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("THALLUS_")}
    env.update(settings)
    return env


def shown_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """``settings`` as a report may show them: without the secret key."""
    return {name: value for name, value in settings.items() if name != "THALLUS_SECRET_KEY"}


def source_of_thallus(settings: Mapping[str, str], *, package_tree: bool = False) -> dict[str, Any]:
    """Which ``thallus`` package servers started with ``settings`` import (``PYTHONPATH`` may point
    at another tree, such as a clone at a fixed commit), a commit, and the number of ``src/`` files
    changed since (a tree may be mid-change: another engineer's work, measured as it stands). The
    commit is this repository's; with ``package_tree``, a package outside it is described by the
    git tree it lives in (its commit, and its files changed since)."""
    done = subprocess.run(
        [sys.executable, "-c", "import thallus; print(thallus.__file__)"],
        env=clean_environment(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    package = Path(done.stdout.strip()).parent if done.returncode == 0 else None
    in_tree = package is not None and package.is_relative_to(ROOT / "src")
    outside = package_tree and not in_tree
    tree = (package or ROOT) if outside else ROOT
    commit = changed = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=tree if outside else ROOT / "src",
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        changed = len(status.splitlines())
    except (OSError, subprocess.SubprocessError):  # not in a git tree: the commit is unknown
        pass
    return {"package": str(package) if package else None, "commit": commit, "src_changed": changed, "in_tree": in_tree}


def describe_import(source: Mapping[str, Any]) -> str:
    """One report line: where the server's ``thallus`` came from (:func:`source_of_thallus`), and
    whether it was this tree's ``src/``."""
    tree = (
        f"src/ of {source['commit']} with {source['src_changed']} file(s) changed since (the tree may be mid-change)"
        if source["in_tree"]
        else f"NOT this tree's src/ (this repository is at {source['commit']})"
    )
    return f"thallus imported from {source['package']}: {tree}"


def describe_source(source: Mapping[str, Any]) -> str:
    """One report line: the commit (:func:`source_of_thallus` with ``package_tree``), and whether the
    servers ran it as committed."""
    changed = f", {source['src_changed']} files changed since" if source["src_changed"] else ""
    where = "this tree's src/" if source["in_tree"] else f"{source['package']}, not this tree's src/"
    return f"thallus at commit {source['commit'] or '? (not in a git tree)'}{changed} ({where})"


# -- starting thallus -------------------------------------------------------------------------------


def thallus_cli(env: Mapping[str, str], *args: str, stdin: str | None = None) -> str:
    """``thallus ARGS`` (the venv's), its output; a failure is a :class:`BenchmarkError`."""
    done = subprocess.run(
        [THALLUS, *args], env=dict(env), input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise BenchmarkError(f"thallus {' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def serve(stack: ExitStack, settings: Mapping[str, str], what: str = "thallus serve") -> Server:
    """``thallus serve`` with ``settings`` (``tests.server.running_server``), stopped when ``stack``
    closes; a server that exits or never answers is a :class:`BenchmarkError` naming ``what``."""
    try:
        return stack.enter_context(running_server(settings))
    except RuntimeError as exc:  # running_server's report of a server that exited or never answered
        raise BenchmarkError(f"{what} did not start: {exc}") from None


@dataclass
class Served:
    """A running server process: its pid, its last output lines (:attr:`output`) and the count of
    the lines that matter (:attr:`lines`, by the rules of :attr:`counted`), read by :meth:`drain`."""

    process: subprocess.Popen[str]
    output: deque[str] = field(default_factory=lambda: deque(maxlen=60), kw_only=True)
    lines: Counter[str] = field(default_factory=Counter, kw_only=True)
    #: ``(name, fragments)`` in order: a line holding any of the fragments counts once, under the
    #: name of the first rule it matches
    counted: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()

    @property
    def pid(self) -> int:
        return self.process.pid

    def drain(self, server: Server | None = None) -> None:
        """Follow the server's output in a thread, so a chatty server can never block on a full pipe;
        keep the last lines and count the ones that matter. A ``tests.server`` server already reads
        its pipe (``Server.lines``): then that is followed, for one reader on a pipe sees every line."""
        stream = self.process.stdout
        if server is None and stream is None:
            return

        def take(raw: str) -> None:
            line = raw.rstrip()
            self.output.append(line)
            for name, fragments in self.counted:
                if any(fragment in line for fragment in fragments):
                    self.lines[name] += 1
                    break

        def read(stream: IO[str] | None = stream) -> None:
            if server is None:
                assert stream is not None
                for raw in stream:
                    take(raw)
                return
            seen = 0
            while seen < len(server.lines) or self.process.poll() is None:
                if seen == len(server.lines):
                    time.sleep(0.01)
                    continue
                for raw in server.lines[seen:]:
                    take(raw)
                    seen += 1

        threading.Thread(target=read, name=f"drain-{self.pid}", daemon=True).start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        stop_process(self.process, 15)

    def started(self, settings: Mapping[str, str], since: float) -> dict[str, Any]:
        """For the report: the pid, the settings (not the secret) and the seconds since ``since``
        (``time.monotonic()`` before the start)."""
        return {"pid": self.pid, "settings": shown_settings(settings), "start_seconds": time.monotonic() - since}

    def stopped(self) -> dict[str, Any]:
        """Stop the server and give its exit code, last output lines and counted lines, for the report."""
        self.stop()
        time.sleep(0.2)  # the drain thread's last lines
        return {"exit_code": self.process.returncode, "output": list(self.output), "log_lines": dict(self.lines)}


def settle(served: Served, limit: float = 30.0, fds: int | None = None) -> float:
    """Wait until the server is idle (under 5 % of a CPU over 0.5 s) and, given ``fds``, holds at most
    that many file descriptors again; at most ``limit`` seconds. The wait."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = process_cpu_seconds(served.pid)
        time.sleep(0.5)
        idle = process_cpu_seconds(served.pid) - before < 0.025
        if idle and (fds is None or open_fds(served.pid) <= fds):
            break
    return time.monotonic() - started


# -- what /proc says ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds over a measured stretch: the server's, this client's, and the rest of the machine's."""

    wall: float
    server: float
    client: float
    other: float

    def document(self) -> dict[str, float]:
        return {
            "wall_seconds": self.wall,
            "server_cpu_seconds": self.server,
            "client_cpu_seconds": self.client,
            "other_cpu_seconds": self.other,
            "other_cpu_share": self.other / self.wall if self.wall else 0.0,
        }


class CpuMeter:
    """Reads the three CPU clocks at the start; :meth:`stop` gives the :class:`CpuUse` since."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = (time.perf_counter(), process_cpu_seconds(pid), own_cpu_seconds(), machine_busy_seconds())

    def stop(self) -> CpuUse:
        wall, server, client, busy = (
            time.perf_counter(),
            process_cpu_seconds(self.pid),
            own_cpu_seconds(),
            machine_busy_seconds(),
        )
        server -= self.start[1]
        client -= self.start[2]
        return CpuUse(wall - self.start[0], server, client, max(0.0, busy - self.start[3] - server - client))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent busy (``/proc/stat``: user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's children that have been waited for (``wrk``)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Sampler:
    """A process's ``VmRSS`` every ``interval`` seconds on a thread, over a ``with`` block: each
    sample (seconds after the start, KiB), the peak, and with ``fds`` the peak of its open file
    descriptors. It stops at the block's end, or when the process is gone."""

    def __init__(self, pid: int, interval: float, fds: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.fds = fds
        self.samples: list[tuple[float, int]] = []
        self.peak_rss_kib = 0
        self.peak_fds = 0
        self._started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                rss = memory_kib(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.samples.append((round(time.perf_counter() - self._started, 3), rss))
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            if self.fds:
                self.peak_fds = max(self.peak_fds, open_fds(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Sampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def open_fds(pid: int) -> int:
    """The process's open file descriptors (``-1`` when ``/proc`` does not say)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1
