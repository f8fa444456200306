"""The real ALFWorld engine (TextWorld's PDDL backend with fast-downward) in a worker process of its own.

Why a process: the engine is native code (fast-downward's ``libdownward``) that can crash the interpreter or
hang, and its PDDL translator rewrites ``sys.argv``; none of that may reach a training run. One
:class:`Engine` owns one worker, started on first use and reused for every game it loads (a load is ~0.1-0.3 s,
a step ~0.03 s, the worker's start ~1-2 s; loading the game it already holds only resets it). Every request has
a deadline: a worker that dies is an :class:`EngineFault` ``crash``, one that misses the deadline is killed and is
a ``timeout``, a game file the engine cannot read is ``broken``. After a fault the next request starts a fresh
worker.

Entity names follow ALFWorld's demangling: an id ``Cabinet_bar__plus_00_dot_68...`` is shown as ``cabinet N``,
the instances of one kind numbered from 1 in the reverse order of their sorted ids (as ``alfworld`` numbers
them, so official games read as in published transcripts).

Fault injection for tests: a game file whose JSON has ``"fault_injection": "crash"`` or ``"hang"`` makes the
worker kill itself with SIGSEGV, or sleep forever, on the first step of that game; ``"crash_on_load"`` does it
while loading.
"""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

from envs.alfworld.worker import Pipe


class EngineFault(Exception):
    """The engine failed on a game: ``kind`` is ``crash``, ``timeout`` or ``broken``."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


# -- parent side ------------------------------------------------------------------------------------------------
class Engine:
    """A handle on one engine worker: :meth:`load` a game file, :meth:`step` a command, each with a deadline."""

    def __init__(self, timeout: float = 60.0, startup_timeout: float = 300.0, start: bool = True):
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.process = None
        self.conn = None
        self.ready = False
        self.starts = 0  # workers started so far (1 unless faults forced restarts)
        if start:  # at once: the workers of a batch of environments then start side by side
            self._launch()

    def _launch(self) -> None:
        # A fresh interpreter running worker.py as a script, not multiprocessing: spawn and forkserver re-import
        # the parent's main module (torch and all) in every worker, and fork would copy torch's threads.
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("worker.py")), str(from_parent), str(to_parent)],
            pass_fds=(from_parent, to_parent),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        os.close(from_parent)
        os.close(to_parent)
        self.conn = Pipe(Connection(from_child, writable=False), Connection(to_child, readable=False))
        self.ready = False
        self.starts += 1

    def _wait_ready(self) -> None:
        # the interpreter's start and the imports (seconds on a busy machine) are not a step's time
        try:
            self.ready = self.conn.poll(self.startup_timeout) and self.conn.recv()[0] == "ready"
        except (EOFError, OSError):
            self.ready = False
        if not self.ready:
            self._stop()
            raise EngineFault("crash", f"the engine worker did not start within {self.startup_timeout:g} s")

    def _request(self, request: str, arg) -> dict:
        if self.process is None or self.process.poll() is not None:
            self._stop()
            self._launch()
        if not self.ready:
            self._wait_ready()
        try:
            self.conn.send((request, arg))
            if not self.conn.poll(self.timeout):
                self._stop()
                raise EngineFault("timeout", f"no answer to {request} {arg!r} within {self.timeout:g} s")
            status, reply = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as err:
            code = self.process.poll() if self.process is not None else None
            self._stop()
            raise EngineFault("crash", f"the engine died during {request} {arg!r} (exit code {code})") from err
        if status == "error":
            raise EngineFault("broken", reply)
        return reply

    def load(self, path: str) -> dict:
        """Load and reset a game; its first state (``feedback``, ``admissible_commands``, ``won``, ``facts``,
        ``names``)."""
        return self._request("load", str(path))

    def step(self, command: str) -> dict:
        return self._request("step", command)

    def _stop(self) -> None:
        self.ready = False
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        """End the worker (politely, then by force)."""
        if self.process is not None and self.process.poll() is None and self.conn is not None:
            try:
                self.conn.send(("close", None))
                self.conn.poll(2)
            except (BrokenPipeError, OSError):
                pass
        self._stop()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
