"""Reflections for SFT data from a chat model behind any OpenAI-compatible API, through the shared ``llm`` layer.

An environment's episode generator does not wait for the API: its ``reflect`` callback returns a
:class:`PendingReflection` (the chat messages), and :meth:`APIReflections.fill` then sends every pending request
of a split at once, ``--reflector_concurrency`` at a time, and writes the answers in. Trajectories never
depend on a reflection's text, so this gives the data a one-request-at-a-time run gives. Each request carries a
seed derived from (data seed, split, episode, step): servers that honour seeds answer it reproducibly, and a
seeded request is cached on disk (keyed by the full request), so a re-run or a run resumed after a crash costs
nothing. Retries, backoff and keeping the key out of errors and files are :class:`llm.openai_api.OpenAIBackend`'s.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from experiment_args import DataGenReflectorArguments


@dataclass(frozen=True)
class PendingReflection:
    """A reflection still to be asked for: the chat messages of its request."""

    messages: list[dict]


class APIReflections:
    """The ``--reflector api`` side of one data set: ``pending(messages)`` for an episode's steps, then
    ``fill(split, episodes)`` before they are written, and ``stats()`` (request and token counts) at the end."""

    def __init__(self, args: DataGenReflectorArguments, cache_dir: str | Path, data_seed: int):
        self.args, self.data_seed = args, data_seed
        self.backend = args.reflector_backend(cache_dir)

    @staticmethod
    def pending(messages: list[dict]) -> PendingReflection:
        return PendingReflection(messages)

    def fill(self, split: str, episodes: list[list[dict]]) -> None:
        """Replace every :class:`PendingReflection` in ``episodes`` (lists of step dicts) by the API's answer,
        in place, sending the requests concurrently in chunks (one progress bar tick a chunk)."""
        pending = [
            (i, j)
            for i, steps in enumerate(episodes)
            for j, step in enumerate(steps)
            if isinstance(step["reflection"], PendingReflection)
        ]
        chunk = 4 * self.args.reflector_concurrency
        with tqdm(total=len(pending), desc=f"{split} reflections", unit="req", disable=not pending) as bar:
            for start in range(0, len(pending), chunk):
                part = pending[start : start + chunk]
                answers = self.backend.generate(
                    [episodes[i][j]["reflection"].messages for i, j in part],
                    max_tokens=self.args.reflector_max_tokens,
                    temperature=self.args.reflector_temperature,
                    seed=[request_seed(self.data_seed, split, i, j) for i, j in part],
                )
                for (i, j), answer in zip(part, answers):
                    episodes[i][j]["reflection"] = answer.text.strip()
                bar.update(len(part))

    def stats(self) -> dict:
        return self.backend.usage.to_dict()


def request_seed(data_seed: int, split: str, episode: int, step: int) -> int:
    """A stable 31-bit seed for one reflection request (the same in every run of the same data)."""
    digest = hashlib.sha256(f"{data_seed}:{split}:{episode}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
