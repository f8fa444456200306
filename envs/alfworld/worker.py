"""The engine's worker process: ``python envs/alfworld/worker.py READ_FD WRITE_FD`` (see engine.py).

Run as a script, not as ``-m envs.alfworld.worker``, so that it imports only TextWorld (not this repository's
``envs`` package). It answers ``("load", path)``, ``("step", command)`` and ``("close", None)`` with
``("ok", state)`` or ``("error", message)``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any


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


# -- the loop ------------------------------------------------------------------------------------------------
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
    import fast_downward
    import textworld
    from textworld.envs import PddlEnv

    # A reset re-translates the game's PDDL twice (fast-downward's Python translator: most of a reset's time);
    # the translation of the same text is the same, so the current game's is kept.
    translate, memo = fast_downward.pddl2sas, {}

    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
        key = (domain, problem, optimize)
        if key not in memo:
            if len(memo) >= 2:
                memo.clear()
            memo[key] = translate(domain, problem, verbose=verbose, optimize=optimize)
        return memo[key]

    fast_downward.pddl2sas = pddl2sas  # looked up at call time by textworld.envs.pddl.logic

    env = PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True))
    fault, loaded = None, None
    conn.send(("ready", None))  # imports done: from here on every request has the step deadline
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
                if arg != loaded:  # parsing the domain and the grammar is most of a load; a reset alone is ~0.05 s
                    loaded = None
                    with open(arg) as f:
                        data = json.load(f)
                    fault = data.get("fault_injection")
                    _inject(fault, "crash_on_load")
                    env.load(arg)
                    names = entity_names(list(env._entity_infos))
                    for key, info in env._entity_infos.items():
                        info.name = names[key]
                    loaded = arg
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
    """The worker's entry point (the two file descriptors of its pipes)."""
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    _serve(Pipe(Connection(read_fd, writable=False), Connection(write_fd, readable=False)))


class Pipe:
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


if __name__ == "__main__":
    sys.path.pop(0)  # this folder: its module names (env, generator, ...) must not shadow anything
    main()
