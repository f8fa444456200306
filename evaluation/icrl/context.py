"""Which past episodes go into the prompt at step t (Monea et al. 2024, reference A.5).

Every strategy returns the indices of history items (step numbers) in prompt order, which is always
chronological. The names are the original's ``--context_strategy_name`` values:

    random_biased_end                  Naive: all past episodes, the most recent that fit
    random_biased_end_only_positive    Naive+: the same over the rewarded episodes only
    random_unbiased_only_positive      Explorative / Stochastic: a fresh random subset of the rewarded
                                       episodes (each kept with --context_p_keep), at most max_examples
    random_unbiased                    supervised ICL upper bound (with --no_icrl: gold labels)
    random_biased_start[_only_positive], random_biased_end_only_negative, random_unbiased_only_negative
    approximate_only_positive          Approximate ICRL: K append-only contexts (--max_contexts)

A zero-shot run is ``max_context_examples 0``: every strategy then returns an empty context.

Randomness: a fresh ``np.random.default_rng(seed + t)`` at step t, drawn in the original's order
(one Bernoulli flag per candidate, then a permutation of the kept ones), so a step's context depends
only on the history and the step, never on what ran before in the process; this is what makes a run
resumable.
"""

from __future__ import annotations

import numpy as np

RANDOM_STRATEGIES = {
    # name: (which end is kept, reward filter)
    "random_biased_end": ("end", None),
    "random_biased_end_only_positive": ("end", 1),
    "random_biased_end_only_negative": ("end", 0),
    "random_biased_start": ("start", None),
    "random_biased_start_only_positive": ("start", 1),
    "random_unbiased": ("unbiased", None),
    "random_unbiased_only_positive": ("unbiased", 1),
    "random_unbiased_only_negative": ("unbiased", 0),
}
STRATEGIES = (*RANDOM_STRATEGIES, "approximate_only_positive")
SAMPLING_METHODS = ("uniform", "exact")


def random_context(
    feedbacks: list[int | None],
    rng: np.random.Generator,
    strategy: str,
    max_examples: int,
    p_keep: float = 1.0,
) -> list[int]:
    """One draw of a random-family strategy over the history's (shown) feedbacks; chronological indices.

    The candidates are the history items whose feedback passes the strategy's filter (all, 1 or 0). Each
    is kept with probability ``p_keep``; the kept ones are permuted, then ``unbiased`` takes the first
    ``max_examples`` of the permutation, ``end`` the latest and ``start`` the earliest.
    """
    bias, wanted = RANDOM_STRATEGIES[strategy]
    candidates = np.array([i for i, f in enumerate(feedbacks) if wanted is None or f == wanted], dtype=int)
    kept = candidates[rng.binomial(1, p_keep, size=len(candidates)) == 1]
    kept = rng.permutation(kept)
    if max_examples <= 0:  # zero-shot (the original's kept[-0:] would keep everything)
        return []
    if bias == "unbiased":
        chosen = np.sort(kept[:max_examples])
    elif bias == "end":
        chosen = np.sort(kept)[-max_examples:]
    else:
        chosen = np.sort(kept)[:max_examples]
    return [int(i) for i in chosen]


class ApproximateContexts:
    """Approximate ICRL: K contexts that only ever grow, so a backend can reuse their cached prefixes.

    At step t the episode of step t-1 is offered to every context that is not full: it is appended with
    probability ``p_keep`` (the context's log-probability grows by log p_keep), else skipped (log(1-p_keep)).
    Then one context is picked, uniformly or in proportion to exp(log-probability) (``exact``).

    Only the new episode is offered, and only if its feedback is positive. The original filters the
    whole history to its positive episodes and offers the last of them, so after a negative step it offers
    the previous positive episode again and a context can hold it twice (reference A.5, "Quirk"). Here
    each episode is offered once. Before the first positive episode every context is empty.
    """

    def __init__(self, max_contexts: int, max_examples: int, p_keep: float, sampling: str = "uniform"):
        if sampling not in SAMPLING_METHODS:
            raise ValueError(f"sampling {sampling!r} is not one of {SAMPLING_METHODS}")
        self.max_examples = max_examples
        self.p_keep = p_keep
        self.sampling = sampling
        self.contexts: list[list[int]] = [[] for _ in range(max_contexts)]
        self.log_probs = np.zeros(max_contexts)

    def step(self, t: int, feedbacks: list[int | None], rng: np.random.Generator) -> tuple[int, list[int]]:
        """Offer episode t-1 (the newest in ``feedbacks``, which holds steps 0..t-1), then pick a context.

        Returns (the picked context's index, its history indices). Call once per step, in order."""
        if t > 0 and feedbacks[t - 1] == 1 and self.max_examples > 0:
            for k, context in enumerate(self.contexts):
                if len(context) >= self.max_examples:
                    continue
                if rng.binomial(1, self.p_keep):
                    context.append(t - 1)
                    self.log_probs[k] += np.log(self.p_keep)
                else:
                    self.log_probs[k] += np.log1p(-self.p_keep)
        if self.sampling == "uniform":
            k = int(rng.choice(len(self.contexts)))
        else:
            probs = np.exp(self.log_probs - np.logaddexp.reduce(self.log_probs))
            k = int(rng.choice(len(self.contexts), p=probs))
        return k, list(self.contexts[k])


def step_rng(seed: int, t: int) -> np.random.Generator:
    """The generator of step t: fresh at every step, as the original's ``set_random_seed(seed + step)``."""
    return np.random.default_rng(seed + t)
