"""The text the compact built-in tokenizer (``tiny-gpt2-compact``) is trained on.

Every prompt the toolkit writes for Taxi, in every setting that changes the text (the three stages,
with and without action history, coordinates and instructions): the policy prompt with its
rule-based reflection and the answer label, which contains the reflector's prompt as its prefix.
Episodes come from the SFT data generator itself (30% random detours, so off-path states and
their reflections appear too). The tokenizer is byte-level, so text outside this corpus still
encodes, only in more tokens.

The corpus is a pure function of this code: change it (or add an environment's text) and bump
``training.models.COMPACT_VERSION`` so cached copies of the old tokenizer are not reused.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from data_gen.taxi.gen_sft import run_episode
from data_gen.taxi.reflection import rule_reflection
from envs.prompt import action_labels, policy_prompt
from envs.taxi import STAGES, TaxiEnv
from experiment_args import DataGenArguments

EPISODES_PER_SETTING = 30


def taxi_texts(episodes: int = EPISODES_PER_SETTING) -> Iterator[str]:
    args = DataGenArguments(output_dir="", label_source="executed")
    for stage, history, coordinates, instructions in itertools.product(STAGES, *[(False, True)] * 3):
        env = TaxiEnv(stage=stage, history=history, coordinates=coordinates, instructions=instructions)

        def reflect(prev, action, state, obs, env=env):
            return rule_reflection(env, prev, action, state)

        rng = random.Random(0)
        for seed in range(episodes):
            for step in run_episode(env, seed, rng, args, reflect):
                labels = action_labels(len(step["obs"].actions))
                yield policy_prompt(step["obs"], labels, step["reflection"]) + labels[step["label"]]


def tokenizer_corpus() -> Iterator[str]:
    yield from taxi_texts()
