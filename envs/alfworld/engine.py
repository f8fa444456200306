"""The real ALFWorld engine (TextWorld's PDDL backend with fast-downward) in a worker process of its own.

Why a process: the engine is native code (fast-downward's ``libdownward``) that can crash the interpreter or
hang, and its PDDL translator rewrites ``sys.argv``; none of that may reach a training run. One
:class:`Engine` owns one worker, started on first use and reused for every game it loads (a load is ~0.1-0.3 s,
a step ~0.03 s, the worker's start ~1-2 s). Every request has a deadline: a worker that dies is an
:class:`EngineFault` ``crash``, one that misses the deadline is killed and is a ``timeout``, a game file the
engine cannot read is ``broken``. After a fault the next request starts a fresh worker.

Entity names follow ALFWorld's demangling: an id ``Cabinet_bar__plus_00_dot_68...`` is shown as ``cabinet N``,
the instances of one kind numbered from 1 in the reverse order of their sorted ids (as ``alfworld`` numbers
them, so official games read as in published transcripts).

Fault injection for tests: a game file whose JSON has ``"fault_injection": "crash"`` or ``"hang"`` makes the
worker kill itself with SIGSEGV, or sleep forever, on the first step of that game; ``"crash_on_load"`` does it
while loading.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any


class EngineFault(Exception):
    """The engine failed on a game: ``kind`` is ``crash``, ``timeout`` or ``broken``."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def entity_names(ids: list[str]) -> dict[str, str]:
    """Display names of PDDL entity ids: ``apple_bar_...`` -> ``apple 2``; ids without ``_bar_`` keep their id."""
    kinds = {}
    for entity in ids:
        head, sep, _ = entity.partition("_bar_")
        if sep:
            name = head.lower()
            if "basin" in entity.lower() and not name.endswith("basin"):
                name += "basin"  # Sink|...|SinkBasin is the sinkbasin
            kinds[entity] = name
    counts = Counter(kinds.values())
    names = {}
    for entity in sorted(ids):
        if entity in kinds:
            names[entity] = f"{kinds[entity]} {counts[kinds[entity]]}"
            counts[kinds[entity]] -= 1
        else:
            names[entity] = entity
    return names


# -- worker side ------------------------------------------------------------------------------------------------
def _state(env, game_state) -> dict[str, Any]:
    facts = [(f.name, *(v.name for v in f.arguments)) for f in game_state["_facts"]]
    return {
        "feedback": game_state.feedback,
        "admissible_commands": list(game_state["admissible_commands"]),
        "won": bool(game_state["won"]),
        "facts": facts,
        "names": {k: info.name for k, info in env._entity_infos.items()},
    }


def _inject(fault: str | None, when: str) -> None:
    if fault == when or (fault in ("crash", "hang") and when == "step"):
        if fault.startswith("crash"):
            os.kill(os.getpid(), signal.SIGSEGV)
        while True:
            time.sleep(3600)


def _serve(conn) -> None:
    """The worker's loop: ``("load", path)``, ``("step", command)``, ``("close", None)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import textworld
    from textworld.envs import PddlEnv

    env = PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True))
    fault = None
    while True:
        try:
            request, arg = conn.recv()
        except EOFError:
            return
        if request == "close":
            conn.send(("ok", None))
            return
        try:
            if request == "load":
                with open(arg) as f:
                    data = json.load(f)
                fault = data.get("fault_injection")
                _inject(fault, "crash_on_load")
                env.load(arg)
                names = entity_names(list(env._entity_infos))
                for key, info in env._entity_infos.items():
                    info.name = names[key]
                reply = _state(env, env.reset())
            elif request == "step":
                _inject(fault, "step")
                game_state, _, _ = env.step(arg)
                reply = _state(env, game_state)
            else:
                raise ValueError(f"unknown request {request!r}")
        except Exception as err:  # a game the engine cannot read or play: the parent marks it broken
            conn.send(("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
            continue
        conn.send(("ok", reply))


def main() -> None:
    """The worker's entry point: ``python -m envs.alfworld.worker READ_FD WRITE_FD``."""
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    _serve(_Pipe(Connection(read_fd, writable=False), Connection(write_fd, readable=False)))


class _Pipe:
    """Two one-way connections as one duplex one (``send``, ``recv``, ``poll``, ``close``)."""

    def __init__(self, incoming: Connection, outgoing: Connection):
        self.incoming, self.outgoing = incoming, outgoing

    def send(self, obj) -> None:
        self.outgoing.send(obj)

    def recv(self):
        return self.incoming.recv()

    def poll(self, timeout: float) -> bool:
        return self.incoming.poll(timeout)

    def close(self) -> None:
        self.incoming.close()
        self.outgoing.close()


# -- parent side ------------------------------------------------------------------------------------------------
class Engine:
    """A handle on one engine worker: :meth:`load` a game file, :meth:`step` a command, each with a deadline."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.process = None
        self.conn = None
        self.starts = 0  # workers started so far (1 unless faults forced restarts)

    def _start(self) -> None:
        # A fresh interpreter (`python -m envs.alfworld.worker`), not multiprocessing: spawn and forkserver
        # re-import the parent's main module (torch and all) in every worker, and fork copies torch's threads.
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "envs.alfworld.worker", str(from_parent), str(to_parent)],
            pass_fds=(from_parent, to_parent),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        os.close(from_parent)
        os.close(to_parent)
        self.conn = _Pipe(Connection(from_child, writable=False), Connection(to_child, readable=False))
        self.starts += 1

    def _request(self, request: str, arg) -> dict:
        if self.process is None or self.process.poll() is not None:
            self._stop()
            self._start()
        try:
            self.conn.send((request, arg))
            # the first request of a worker also waits for its start (imports of textworld and fast-downward)
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
