"""In-context agents: an LLM (local, or behind the local OpenAI-compatible server) playing an environment through
the same rollout and evaluation as the trained policies, answers parsed or counted, past episodes as context."""

import json
import threading

import pytest
import torch

from evaluation import compare, evaluate
from evaluation.in_context_agent import InContextAgent, PastEpisode, render_episode, split_policy_prompt
from evaluation.serve import make_server
from experiment_args import TaxiArguments
from llm.base import Backend, Generation
from llm.local import LocalBackend
from training.rollout import rollout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Scripted(Backend):
    """An API-like backend (free text, no constrained choice) answering each prompt with ``answer(messages)``."""

    name = "scripted"

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.prompts: list = []

    def _generate(self, prompts, **kwargs):
        self.prompts += prompts
        self._count(requests=len(prompts))
        return [Generation(text=self.answer(p)) for p in prompts]


def taxi_envs(n: int, **flags):
    args = TaxiArguments(taxi_stage="dropoff", taxi_reward="success", **flags)
    return [args.make_env() for _ in range(n)]


def test_the_policy_prompt_splits_into_state_and_actions():
    env = taxi_envs(1)[0]
    obs = env.reset(seed=3)
    from envs.prompt import policy_prompt

    prompt = policy_prompt(obs, [str(i) for i in range(len(obs.actions))], reflection="go south")
    state, actions = split_policy_prompt(prompt)
    assert state == obs.text  # the reflection is not part of the state
    assert actions == {str(i): a for i, a in enumerate(obs.actions)}


def test_answers_are_parsed_and_unparsable_ones_are_invalid_actions():
    answers = iter(["Action: 2", "3. move west", "move north", "I would rather not", "So: action: 1."] * 50)
    agent = InContextAgent(Scripted(lambda p: next(answers)), temperature=0.0)
    envs = taxi_envs(5)
    episodes = rollout(envs, [0, 1, 2, 3, 4], agent)
    first = [e.steps[0] for e in episodes]
    north = envs[0].current_actions().index("move north")
    assert [s.action for s in first] == [2, 3, north, None, 1]
    assert first[3].invalid and not any(s.invalid for s in first[:3])
    assert agent.unparsed == sum(s.action is None for e in episodes for s in e.steps) > 0
    # the prompt is the policy's, after the system prompt; no context yet
    messages = agent.backend.prompts[0]
    assert messages[0]["role"] == "system" and "# Actions:\n0. " in messages[1]["content"]
    assert "Earlier episodes" not in messages[1]["content"]


def test_past_episodes_enter_the_prompt_by_strategy():
    won = PastEpisode([("state A", "move east", 1.0)], True, 1.0)
    lost = PastEpisode([("state B", "move west", 0.0)], False, 0.0)

    def shown(context: str, history: list[PastEpisode]) -> str:
        agent = InContextAgent(Scripted(lambda p: "0"), context=context, max_episodes=2, context_tokens=10_000)
        agent.history = history[:-1]
        agent.observe([])  # (no new episode: recomputes the context of the history so far)
        agent.history = history
        agent._chosen = []
        agent.observe([])
        return agent.messages("now")[1]["content"]

    history = [won, lost, won, lost]
    assert shown("none", history) == "now"
    naive = shown("naive", history)
    assert "Episode 3: success" in naive and "Episode 4: failure" in naive and "Episode 2" not in naive
    positive = shown("only_positive", history)
    assert "Episode 1: success" in positive and "Episode 3: success" in positive and "failure" not in positive
    assert positive.index("Episode 1") < positive.index("Episode 3") < positive.index("The current episode")


def test_a_long_episode_loses_its_oldest_steps_to_the_budget():
    long = PastEpisode([(f"state {i} " + "x" * 200, "move east", 0.0) for i in range(10)], True, 1.0)
    agent = InContextAgent(Scripted(lambda p: "0"), context="naive", max_episodes=3, context_tokens=200)
    agent.history = [long, long]
    agent.observe([])
    text = agent._context_text
    assert text.startswith("Episode 2: success") and "Episode 1" not in text  # the older one does not fit
    assert "(its first" in text and "state 9" in text and "state 0 " not in text
    assert len(text) // 4 + 1 <= 200
    assert render_episode(1, long).count("Action taken") == 10


def test_approximate_contexts_only_ever_grow_and_hold_won_episodes():
    agent = InContextAgent(Scripted(lambda p: "0"), context="approximate", max_episodes=3, p_keep=0.5)
    for won in [True, False, True, True, False, True]:
        agent.observe([_episode(won)])
        assert all(agent.history[i].success for i in agent._chosen)
    contexts = agent._approximate.contexts
    assert any(contexts) and all(len(c) <= 3 and c == sorted(set(c)) for c in contexts)


def _episode(won: bool):
    from training.rollout import Episode, Step

    step = Step("s\n\n# Actions:\n0. wait\n\n# Action:\n", 1, 0, 0.0, 0.0, 0.0, 0.0, float(won), True, False, False)
    step.labels = ["0"]
    return Episode(seed=0, stage="dropoff", steps=[step], success=won)


def test_context_grows_between_batches_of_an_evaluation(tmp_path, monkeypatch):
    backend = Scripted(lambda p: "0")
    import evaluation.in_context_agent as module

    monkeypatch.setattr(module, "make_agent", lambda args, seed: InContextAgent(backend, context="naive", seed=seed))
    flags = ["--agent", "llm", "--agent_backend", "openai", "--agent_api_base", "http://127.0.0.1:9/v1"]
    flags += ["--num_episodes", "4", "--batch_size", "2", "--stages", "dropoff", "--taxi_horizon", "3"]
    flags += ["--agent_context", "naive"]
    summary = evaluate.main(["--output_dir", str(tmp_path / "e"), *flags])
    bodies = [p[1]["content"] for p in backend.prompts]
    assert "Earlier episodes" not in bodies[0] and "Episode 2:" in bodies[-1]
    assert summary["agent_stats"]["usage"]["requests"] == len(backend.prompts)
    assert summary["agent"] == "llm" and summary["agent_context"] == "naive"


def test_a_local_model_answers_only_labels(tiny_model_dir):
    agent = InContextAgent(LocalBackend("tiny-gpt2", batch_size=8), temperature=1.0)
    episodes = rollout(taxi_envs(4, taxi_horizon=4), [0, 1, 2, 3], agent, generator=torch.Generator().manual_seed(0))
    steps = [s for e in episodes for s in e.steps]
    assert steps and not any(s.invalid for s in steps) and agent.too_long == 0
    assert all(s.logprob < 0 for s in steps)  # the model's own log-prob of its label


def test_an_in_context_agent_plays_taxi_through_the_local_server(tiny_model_dir, tmp_path):
    """The issue's check: a model behind evaluation.serve plays Taxi through evaluation.evaluate, and the table
    has it beside a reference agent."""
    server = make_server(LocalBackend("tiny-gpt2", batch_size=8), "127.0.0.1", 0, served_name="tiny")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        flags = ["--agent", "llm", "--agent_backend", "openai", "--agent_api_base", server.url, "--agent_model"]
        flags += ["tiny", "--agent_cache_dir", "none", "--num_episodes", "6", "--batch_size", "3"]
        flags += ["--stages", "dropoff", "--taxi_horizon", "4", "--agent_context", "naive", "--greedy"]
        summary = evaluate.main(["--output_dir", str(tmp_path / "served"), *flags])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    stage = summary["stages"]["dropoff"]
    assert stage["episodes"] == 6
    stats = summary["agent_stats"]
    steps = [s for line in open(tmp_path / "served" / "episodes.jsonl") for s in json.loads(line)["steps"]]
    assert stats["usage"]["requests"] == len(steps) and stats["usage"]["failures"] == 0
    # a random model's free text rarely names a label: whatever it wrote was counted, never raised
    assert stats["unparsed_answers"] == sum(s["invalid"] for s in steps)
    evaluate.main(["--agent", "random", "--output_dir", str(tmp_path / "random"), "--num_episodes", "6"])
    rows = compare.main([str(tmp_path / "served"), str(tmp_path / "random")])
    assert [row["run"] for row in rows] == ["served", "random"]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--agent_context", "everything"], "--agent_context"),
        (["--agent_backend", "hf"], "--agent_backend"),
        (["--agent_p_keep", "0"], "--agent_p_keep"),
        (["--reflector_path", "runs/x"], "--reflector_api_base"),
    ],
)
def test_bad_agent_flags(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--agent", "llm", "--output_dir", str(tmp_path / "e"), *flags])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
