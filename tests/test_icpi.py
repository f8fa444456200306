"""ICPI: the six environments against their definitions, their text, the prompt builders, one ICPI step with a
scripted model, the baselines, and the command end to end (reference ../shared/reference/icrl_baselines.md C)."""

import json
import re

import numpy as np
import pytest

from envs.icpi import (
    ENVS,
    ChainEnv,
    DistractorChainEnv,
    MazeEnv,
    MiniCatchEnv,
    MiniInvadersEnv,
    PointMassEnv,
    TimeStep,
    maze_distances,
    maze_move,
)
from evaluation import icpi
from experiment_args import ENV_ARGUMENTS, ICPIArguments, IcpiArguments, UsageError
from llm.base import Backend, Generation

RNG = np.random.default_rng(0)
LEFT, TRY_GOAL, RIGHT = range(3)


def play(env, state, actions):
    """(states visited, rewards, dones) of ``actions`` from ``state`` through the pure transition."""
    states, rewards, dones = [state], [], []
    for a in actions:
        state, reward, done = env.transition(state, a, RNG)
        states.append(state)
        rewards.append(reward)
        dones.append(done)
    return states, rewards, dones


def start_at(env, state):
    env.reset(seed=0)
    env.state = env.start = state


# ---------------------------------------------------------------------------------------------------
# dynamics
# ---------------------------------------------------------------------------------------------------


def test_chain_goal_clipping_and_time_limit():
    env = ChainEnv()
    assert env.transition((0,), LEFT, RNG) == ((0,), 0.0, False)  # clipped at 0
    assert env.transition((7,), RIGHT, RNG) == ((7,), 0.0, False)  # and at 7
    assert env.transition((4,), TRY_GOAL, RNG) == ((4,), 1.0, True)
    assert env.transition((3,), TRY_GOAL, RNG) == ((3,), 0.0, True)  # try_goal off the goal ends it, no reward
    assert env.max_q_steps == 6 and env.time_limit == 8 and env.gamma == 0.8
    start_at(env, (0,))
    for t in range(1, 9):
        _, reward, terminated, truncated, info = env.step(LEFT)
        assert (reward, terminated, truncated) == (0.0, False, t == 8)
    assert not info["success"] and info["optimal"] == pytest.approx(0.8**4)
    with pytest.raises(RuntimeError):
        env.step(LEFT)


def test_distractor_is_redrawn_every_step_and_changes_nothing_else():
    env = DistractorChainEnv()
    states, rewards, _ = play(env, (2, 5), [RIGHT] * 20)
    assert [s[0] for s in states] == [2, 3, 4, 5, 6, 7] + [7] * 15
    assert len({s[1] for s in states[1:]}) > 3 and all(0 <= s[1] < 8 for s in states)
    assert env.transition((4, 6), TRY_GOAL, RNG)[1:] == (1.0, True)
    assert env.optimal_return((1, 0)) == pytest.approx(0.8**3)


def test_maze_walls_goal_before_move_and_distances():
    left, down, up, right = range(4)
    assert maze_move((1, 0), right) == (1, 0)  # wall (1,0)|(1,1)
    assert maze_move((1, 1), left) == (1, 1)
    assert maze_move((1, 1), down) == (1, 1)  # wall (1,1)|(2,1)
    assert maze_move((2, 1), up) == (2, 1)
    assert maze_move((0, 0), up) == (0, 0) and maze_move((2, 2), right) == (2, 2)  # the edge
    assert maze_move((1, 0), down) == (2, 0) and maze_move((1, 1), right) == (1, 2)
    env = MazeEnv()
    # stepping onto the goal pays nothing; the step taken while on it pays 1 and ends (even if it moves away)
    assert env.transition((0, 0), down, RNG) == ((1, 0), 0.0, False)
    assert env.transition((1, 0), up, RNG) == ((0, 0), 1.0, True)
    expected = {(1, 0): 0, (0, 0): 1, (2, 0): 1, (0, 1): 2, (2, 1): 2, (0, 2): 3, (1, 1): 3, (2, 2): 3, (1, 2): 4}
    assert maze_distances() == expected
    assert env.optimal_return((1, 2)) == pytest.approx(0.8**4) and env.optimal_return((1, 0)) == 1.0


def test_catch_terminates_the_step_after_the_ball_lands():
    env = MiniCatchEnv()
    left, stay, right = range(3)
    states, rewards, dones = play(env, (2, 0, 4), [left, left, left, stay, right])
    assert states == [(2, 0, 4), (1, 0, 3), (0, 0, 2), (0, 0, 1), (0, 0, 0), (0, 0, 0)]  # the last step moves nothing
    assert rewards == [0, 0, 0, 0, 1.0] and dones == [False] * 4 + [True]
    _, rewards, dones = play(env, (2, 3, 4), [stay] * 5)
    assert rewards[-1] == 0.0 and dones[-1]  # missed
    assert (env.gamma, env.max_q_steps, env.optimal_return((2, 1, 4))) == (1.0, 5, 1.0)
    starts = {env.start_state(np.random.default_rng(s)) for s in range(40)}
    assert starts == {(2, x, 4) for x in range(4)}


def test_invaders_shoot_land_descend_end_then_move():
    env = MiniInvadersEnv()
    left, shoot, right = range(3)
    # (1) the alien above the ship dies and pays 1, (3) the other descends, (5) the ship does not move on shoot
    assert env.transition((1, ((1, 3), (2, 3))), shoot, RNG) == ((1, (None, (2, 2))), 1.0, False)
    # (2) a live alien at y == 0 ends the episode; aliens still descend and the ship still moves
    assert env.transition((0, ((1, 0), (3, 2))), left, RNG) == ((0, ((1, -1), (3, 1))), 0.0, True)
    # shooting comes first: an alien shot at y == 0 has not landed; (4) none left ends it
    assert env.transition((1, ((1, 0), None)), shoot, RNG) == ((1, (None, None)), 1.0, True)
    assert env.transition((3, ((0, 4), (1, 4))), right, RNG)[0][0] == 3  # clipped
    # aliens spawn at y = 5 and land on the 6th step
    _, _, dones = play(env, (0, ((3, 5), (2, 5))), [left] * 6)
    assert dones == [False] * 5 + [True]
    for s in range(30):
        ship, aliens = env.start_state(np.random.default_rng(s))
        assert len({ship, *(a[0] for a in aliens)}) == 3 and all(a[1] == 5 for a in aliens)
    assert env.optimal_return((0, ((1, 5), (3, 5)))) == 2.0 and env.log_gamma == 1.0 and env.max_q_steps == 8


def test_point_mass_position_moves_with_the_old_velocity_and_success_is_checked_first():
    env = PointMassEnv()
    decel, accel = range(2)
    states, rewards, dones = play(env, (-3.0, 0), [accel, accel, decel, decel])
    assert states == [(-3.0, 0), (-3.0, 1), (-2.0, 2), (0.0, 1), (1.0, 0)]
    assert rewards == [0.0] * 4 and dones == [False] * 4  # (0.0, 1) is inside but moving
    assert env.transition((1.0, 0), decel, RNG) == ((1.0, -1), 1.0, True)  # at rest inside: pays, then moves
    assert env.transition((2.5, 0), decel, RNG)[1:] == (0.0, False)
    # 0.8^(2 ceil(sqrt(|pos0| - 2)))
    for pos, steps in ((-3.45, 4), (5.5, 4), (-6.0, 4), (-2.5, 2), (6.0, 4), (2.01, 2)):
        assert env.optimal_return((pos, 0)) == pytest.approx(0.8**steps)
    for s in range(50):
        pos, vel = env.start_state(np.random.default_rng(s))
        assert 2 <= abs(pos) <= 6 and vel == 0


@pytest.mark.parametrize("name", list(ENVS))
def test_the_search_oracle_reaches_the_optimal_return(name):
    env = ENVS[name]()
    for seed in range(12):
        env.reset(seed)
        rewards, done = [], False
        while not done:
            _, reward, terminated, truncated, info = env.step(env.oracle_action())
            rewards.append(reward)
            done = terminated or truncated
        assert icpi.discounted(rewards, env.log_gamma) == pytest.approx(info["optimal"])
        assert info["success"]


def test_text_env_reset_is_seeded_and_invalid_actions_are_random():
    env = ChainEnv()
    assert env.reset(3).text == env.reset(3).text
    assert len({env.reset(s).text for s in range(30)}) > 4
    obs = env.reset(1)
    assert obs.actions == ["left", "try_goal", "right"] and obs.text == env.state_text(env.state)
    assert env.has_expert and env.state_key() == env.state
    taken = set()
    for seed in range(20):
        env.reset(seed)
        *_, info = env.step(None)
        assert info["invalid_action"] and 0 <= info["action"] < 3
        taken.add(info["action"])
    assert len(taken) > 1
    assert ENV_ARGUMENTS["icpi"] is IcpiArguments and IcpiArguments.stages == tuple(ENVS)
    assert isinstance(IcpiArguments(icpi_stage="maze").make_env(), MazeEnv)
    with pytest.raises(UsageError, match="--icpi_stage 'nope'"):
        IcpiArguments(icpi_stage="nope")


# ---------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------


def test_text_of_known_states():
    chain = ChainEnv()
    assert chain.state_str((6,)) == "assert state == [6] and state != [4]\n"
    assert chain.state_str((4,)) == "assert state == [4] and state == [4]\n"
    assert chain.state_str((6,), hint=False) == "assert state == [6]\n"
    assert [chain.action_str(a) for a in range(3)] == [
        "state = left()\n", "reward = try_goal(state)\n", "state = right()\n",
    ]  # fmt: skip
    assert chain.initial_str == "\nstate, reward = reset()\n"
    assert DistractorChainEnv().state_str((6, 3)) == "assert state == [6, 3] and state != [4, 3]\n"
    maze = MazeEnv()
    assert maze.state_str((2, 1)) == "assert state == C(i=2, j=1) and state != C(i=1, j=0)\n"
    assert maze.action_str(0) == "state, reward = left()\n"
    catch = MiniCatchEnv()
    assert catch.state_str((2, 0, 4)) == (
        "assert paddle == C(2, 0) and ball == C(0, 4) and paddle.x == 2 and ball.x == 0 and paddle.x > ball.x "
        "and ball.y == 4\n"
    )
    assert catch.action_str(0) == "reward = paddle.left()\nball.descend()\n"
    assert catch.initial_str == "\npaddle, ball = reset()\n"
    inv = MiniInvadersEnv()
    assert inv.state_str((2, ((3, 5), (1, 5)))) == (
        "assert ship == C(2, 0) and aliens == [C(3, 5), C(1, 5)] and (ship.x, aliens[0].x, aliens[1].x) == "
        "(2, 3, 1) and ship.x < aliens[0].x and ship.x > aliens[1].x\n"
    )
    assert inv.state_str((2, (None, (2, 3)))) == (
        "assert ship == C(2, 0) and aliens == [None, C(2, 3)] and (ship.x, aliens[1].x) == (2, 2) "
        "and ship.x == aliens[1].x\n"
    )
    assert [inv.action_str(a) for a in range(3)] == [
        "ship.left()\n",
        "reward = ship.shoot(aliens)\n",
        "ship.right()\n",
    ]
    assert inv.reward_str(0) + inv.reward_stop == "assert reward == 0\nfor a in aliens:\n    a.descend()\n"
    pm = PointMassEnv()
    assert pm.state_str((-3.45, 0)) == "assert pos == -3.45 and vel == 0.00 and pos < -2 and vel == 0\n"
    assert pm.state_str((1.0, -1)) == "assert pos == 1.00 and vel == -1.00 and -2 <= pos <= 2 and vel != 0\n"
    assert pm.state_str((2.5, 1)).endswith("and 2 < pos and vel != 0\n")
    assert pm.action_str(0) == "pos, vel = decel(pos, vel)\n" and pm.initial_str == "\npos, vel = reset()\n"
    assert chain.done_str(True) == "assert done" and chain.done_str(False) == "assert not done"
    assert chain.reward_str(1.0) == "assert reward == 1"


def test_policy_examples_print_steps_as_the_original():
    chain = ChainEnv()
    assert chain.ts_to_string(TimeStep((3,), RIGHT, 0.0, False, (4,))) == (
        "assert state == [3] and state != [4]\nstate = right()\nassert reward == 0.0\n"
    )
    catch = MiniCatchEnv()
    last = TimeStep((1, 1, 0), 1, 1.0, True, (1, 1, 0))
    shown = catch.state_str((1, 1, 0))
    assert catch.ts_to_string(last) == shown + catch.action_str(1) + "assert reward == 1\nassert done\n" + shown
    inv = MiniInvadersEnv()
    end = TimeStep((1, ((1, 0), None)), 1, 1.0, True, (1, (None, None)))
    assert inv.ts_to_string(end).endswith("assert done\nassert ship == C(1, 0) and aliens == [None, None] and "
                                          "(ship.x) == (1)\n\n")  # fmt: skip
    pm = PointMassEnv()
    step = TimeStep((1.0, 0), 0, 1.0, True, (1.0, -1))
    assert pm.ts_to_string(step) == pm.state_str((1.0, 0)) + pm.action_str(0) + "assert reward == 1.0\n" + (
        pm.state_str((1.0, -1))
    )


@pytest.mark.parametrize("name", list(ENVS))
def test_parsers_round_trip_and_reject_malformed_text(name):
    env = ENVS[name]()
    for seed in range(10):
        env.reset(seed)
        while True:
            parsed = env.parse_state(env.state_text(env.state))
            assert parsed == (env.state if name != "point_mass" else (round(env.state[0], 2), env.state[1]))
            _, _, terminated, truncated, _ = env.step(env.oracle_action() if seed % 2 else None)
            if terminated or truncated:
                break
    assert env.parse_state("garbage") is None and env.parse_state("") is None
    for a in range(len(env.actions)):
        assert env.parse_action(env.action_str(a)) == a
        assert env.parse_action(" " + env.action_text(a) + "  ") == a
    assert env.parse_action("state = up()") is None and env.parse_action("") is None
    assert env.parse_done("assert done") is True and env.parse_done("assert not done") is False
    assert env.parse_done("assert donut") is None and env.parse_done("done") is None
    assert env.parse_reward("assert reward == 1") == 1.0 and env.parse_reward("reward 1") is None


def test_out_of_range_states_do_not_parse():
    assert ChainEnv().parse_state("assert state == [9] and state != [4]") is None
    assert ChainEnv().parse_state("assert state == [3, 2]") is None  # chain has no distractor
    assert MazeEnv().parse_state("assert state == C(i=3, j=0)") is None
    assert MiniCatchEnv().parse_state("assert paddle == C(4, 0) and ball == C(0, 4)") is None
    assert MiniInvadersEnv().parse_state("assert ship == C(1, 0) and aliens == [C(2, 3)]") is None
    assert MiniInvadersEnv().parse_state("assert ship == C(1, 0) and aliens == [None, C(2, 3)]") == (
        1, (None, (2, 3)),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------


def chain_buffer():
    """Three trajectories: 1 done and 3 not-done steps of try_goal/right, 2 of left."""
    return [
        [TimeStep((2,), RIGHT, 0.0, False, (3,)), TimeStep((3,), RIGHT, 0.0, False, (4,)),
         TimeStep((4,), TRY_GOAL, 1.0, True, (4,))],
        [TimeStep((5,), LEFT, 0.0, False, (4,)), TimeStep((4,), LEFT, 0.0, False, (3,)),
         TimeStep((3,), TRY_GOAL, 0.0, True, (3,))],
        [TimeStep((1,), RIGHT, 0.0, False, (2,))],  # cut by the time limit: stored as not done
    ]  # fmt: skip


def test_done_examples_are_constrained_and_balanced():
    env, buffer = ChainEnv(), chain_buffer()
    examples = icpi.done_examples(env, buffer, RIGHT, np.random.default_rng(0))
    assert len(examples) == 3 and all(e.endswith("assert not done\n\n") for e in examples)  # one group: no upsampling
    examples = icpi.done_examples(env, buffer, RIGHT, np.random.default_rng(0), constrain=False)
    # 2 done and 5 not-done steps: the done ones upsampled to 5, interleaved, shuffled
    assert len(examples) == 10 and sum(e.endswith("assert done\n\n") for e in examples) == 5
    assert len(set(examples)) == 7  # every step is there
    unbalanced = icpi.done_examples(env, buffer, RIGHT, np.random.default_rng(0), constrain=False, balance=False)
    assert len(unbalanced) == 7
    line = "assert state == [4] and state == [4]\nreward = try_goal(state)\nassert done\n\n"
    assert icpi.done_examples(env, buffer, TRY_GOAL, np.random.default_rng(0)).count(line) == 1


def test_reward_and_next_state_examples_follow_the_query():
    env, buffer = ChainEnv(), chain_buffer()
    rewards = icpi.reward_examples(env, buffer, TRY_GOAL, True, np.random.default_rng(1))
    assert len(rewards) == 2 and {e.split("\n")[2] for e in rewards} == {"assert reward == 1", "assert reward == 0"}
    assert all(e.endswith("\n\n") and "try_goal" in e for e in rewards)
    assert icpi.reward_examples(env, buffer, LEFT, True, np.random.default_rng(1)) == []  # left never ended one
    nexts = icpi.next_state_examples(env, buffer, LEFT, np.random.default_rng(1))
    assert sorted(nexts) == sorted([
        "assert state == [5] and state != [4]\nstate = left()\nassert state == [4] and state == [4]\n\n",
        "assert state == [4] and state == [4]\nstate = left()\nassert state == [3] and state != [4]\n\n",
    ])  # fmt: skip
    assert icpi.next_state_examples(env, buffer, TRY_GOAL, np.random.default_rng(1)) == []  # done steps never
    # invaders: the reward line is the three-line statement closed by "()\n", then the blank line
    inv = MiniInvadersEnv()
    (example,) = icpi.reward_examples(inv, [[TimeStep((1, ((1, 3), (2, 3))), 1, 1.0, False, (1, (None, (2, 2))))]],
                                      1, False, np.random.default_rng(0))  # fmt: skip
    assert example.endswith("reward = ship.shoot(aliens)\nassert reward == 1\nfor a in aliens:\n    a.descend()\n\n")


def test_policy_examples_are_every_sub_trajectory_shuffled():
    env, buffer = ChainEnv(), chain_buffer()
    first = icpi.policy_examples(env, buffer, np.random.default_rng(0))
    assert len(first) == 6 + 6 + 1 and all(e.startswith(env.initial_str) for e in first)
    whole = env.initial_str + "".join(env.ts_to_string(ts) for ts in buffer[0])
    assert whole in first
    second = icpi.policy_examples(env, buffer, np.random.default_rng(1))
    assert sorted(first) == sorted(second) and first != second  # reshuffled on every call


def test_clip_left_keeps_the_last_examples_that_fit():
    count = icpi.token_counter(None)  # characters / 4
    examples, query = ["a" * 40, "b" * 40, "c" * 40], "q" * 8  # 10 tokens each, query 2
    assert icpi.clip_left(examples, query, 1000, count) == "".join(examples) + query
    assert icpi.clip_left(examples, query, 25, count) == "b" * 40 + "c" * 40 + query
    assert icpi.clip_left(examples, query, 21, count) == "c" * 40 + query
    assert icpi.clip_left(examples, query, 1, count) == query


# ---------------------------------------------------------------------------------------------------
# one ICPI step with a scripted model
# ---------------------------------------------------------------------------------------------------


class ScriptedChain(Backend):
    """Answers chain's prompts from the true dynamics and the optimal policy (or garbage for ``broken`` kinds),
    after working out from the prompt which prediction it is. Records every call's prompts."""

    name = "scripted"

    def __init__(self, broken=()):
        super().__init__()
        self.broken = set(broken)
        self.calls: list[list[str]] = []

    @staticmethod
    def kind_and_query(prompt: str):
        lines = prompt.split("\n")
        if lines[-3] == "state, reward = reset()":
            return "action", lines[-2], None
        third = lines[2]  # the first example's prediction line
        kind = "done" if "done" in third else "reward" if third.startswith("assert reward") else "state"
        return kind, lines[-3], lines[-2]

    def _generate(self, prompts, **kwargs):
        self.calls.append(list(prompts))
        out = []
        for prompt in prompts:
            kind, state, action = self.kind_and_query(prompt)
            pos = int(re.match(r"assert state == \[(\d)\]", state).group(1))
            if kind in self.broken:
                text = "```python"
            elif kind == "action":
                text = ChainEnv().action_text(RIGHT if pos < 4 else LEFT if pos > 4 else TRY_GOAL)
            elif kind == "done":
                text = ChainEnv().done_str(action == "reward = try_goal(state)")
            elif kind == "reward":
                text = f"assert reward == {int(action == 'reward = try_goal(state)' and pos == 4)}"
            else:
                step = {"state = left()": -1, "state = right()": 1}[action]
                text = ChainEnv().state_text((min(max(pos + step, 0), 7),))
            out.append(Generation(text=text, prompt_tokens=len(prompt) // 4, completion_tokens=len(text) // 4))
        self._count(  # what a real backend's usage shows
            requests=len(out), prompt_tokens=sum(g.prompt_tokens for g in out),
            completion_tokens=sum(g.completion_tokens for g in out),
        )  # fmt: skip
        return out


def make_model(env, backend, buffer, **overrides):
    args = ICPIArguments(**{"prompt_tokens": 400, **overrides})
    return icpi.LanguageModel(env, backend, buffer, buffer, args, True, icpi.token_counter(backend))


def test_one_icpi_step_with_a_scripted_model():
    env, backend = ChainEnv(), ScriptedChain()
    model = make_model(env, backend, chain_buffer())
    rng = np.random.default_rng(0)
    values = icpi.q_values(env, model, (2,), rng)
    # left: [1] -> [2] -> [3] -> [4], try_goal pays at u = 4; try_goal: done, 0; right: pays at u = 2
    assert values == pytest.approx([0.8**4, 0.0, 0.8**2])
    assert icpi.argmax_random_tie(values, rng) == RIGHT
    # lockstep: one call per prediction and step over the rollouts still going (3, then 2, then left's alone)
    assert [len(c) for c in backend.calls] == [3, 3, 2, 2] + [2] * 4 + [2, 2, 1, 1] + [1] * 4 + [1, 1]
    for prompts in backend.calls:
        for prompt in prompts:
            kind, _, action = backend.kind_and_query(prompt)
            blocks = prompt.split("\n\n")[:-1] if kind != "action" else []
            assert all(block.split("\n")[1] == action for block in blocks)  # constrained to the queried action
            assert len(prompt) // 4 <= 400
    assert model.counters["llm/calls"] == 18 and model.counters["llm/prompts"] == 30
    assert sum(v for k, v in model.counters.items() if k.startswith(("model/unparsed", "model/invalid"))) == 0


def test_malformed_completions_are_counted_not_raised():
    env = ChainEnv()
    backend = ScriptedChain(broken={"state"})
    model = make_model(env, backend, chain_buffer())
    values = icpi.q_values(env, model, (2,), np.random.default_rng(0))
    assert values == [0.0, 0.0, 0.0]  # every rollout ended at the first next state, with G = 0 so far
    assert model.counters["model/unparsed/state"] == 2 and model.counters["model/invalid_tries/state"] == 2 * 3
    assert model.bad_completions[-1] == {"kind": "state", "completion": "```python"}
    # an unparseable policy gives random actions, counted; the rollouts go on to max_q_steps
    model = make_model(env, ScriptedChain(broken={"action"}), chain_buffer())
    icpi.q_values(env, model, (2,), np.random.default_rng(0))
    assert model.counters["model/unparsed/action"] >= 2


def test_a_completion_cut_by_max_tokens_is_resampled():
    class Rambling(ScriptedChain):
        def _generate(self, prompts, **kwargs):
            return [Generation(g.text, finish_reason="length") for g in super()._generate(prompts, **kwargs)]

    model = make_model(ChainEnv(), Rambling(), chain_buffer(), max_resamples=2)
    assert icpi.q_values(ChainEnv(), model, (4,), np.random.default_rng(0)) == [0.0, 0.0, 0.0]
    assert model.counters["model/unparsed/done"] == 3 and model.counters["model/invalid_tries/done"] == 6


# ---------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------


def run_args(tmp_path, name, stage="chain", **overrides):
    args = ICPIArguments(**{"output_dir": str(tmp_path / name), "total_steps": 60, **overrides})
    return args, IcpiArguments(icpi_stage=stage)


def test_icpi_with_a_perfect_scripted_model_acts_optimally(tmp_path):
    args, env_args = run_args(tmp_path, "scripted", method="icpi", total_steps=40, prompt_tokens=600)
    summary = icpi.run(args, env_args, backend=ScriptedChain())
    rows = [json.loads(line) for line in (tmp_path / "scripted" / "episodes.jsonl").read_text().splitlines()]
    oracle = ChainEnv()
    model_steps = [s for r in rows for s in r["steps"] if s["model"]]
    assert len(model_steps) > 10
    for step in model_steps:
        oracle.state = tuple(step["state"])
        oracle.t = 0
        assert step["action"] == oracle.oracle_action() and len(step["q_values"]) == 3
    assert summary["llm/calls"] > 0 and summary["llm/prompt_tokens"] > 0 and summary["model/unparsed/done"] == 0
    assert summary["episodes"] == len(rows) and summary["steps"] >= 40


def test_tabular_q_solves_chain(tmp_path):
    args, env_args = run_args(tmp_path, "tabular", method="tabular_q", total_steps=250)
    icpi.run(args, env_args)
    rows = [json.loads(line) for line in (tmp_path / "tabular" / "episodes.jsonl").read_text().splitlines()]
    assert all(r["regret"] == pytest.approx(0.0) for r in rows[-10:])
    assert icpi.TabularQ(3, 0.8).values((0,)) == [1.0, 1.0, 1.0]  # optimistic


def test_cli_end_to_end_resume_and_bad_flags(tmp_path, capsys):
    common = ["--icpi_stage", "maze", "--method", "matching"]
    full = icpi.main([*common, "--total_steps", "60", "--output_dir", str(tmp_path / "full")])
    assert full["finished"] and full["steps"] >= 60 and len(full["regret_curve"]) == full["episodes"]
    assert full["regret_curve"][-1][1] == pytest.approx(full["env/regret_total"])
    assert {p.name for p in (tmp_path / "full").iterdir()} == {"config.yaml", "episodes.jsonl", "summary.json"}
    row = json.loads((tmp_path / "full" / "episodes.jsonl").read_text().splitlines()[0])
    assert {"start", "steps", "return", "return_discounted", "return_undiscounted", "optimal", "regret"} <= set(row)
    assert row["regret"] == pytest.approx(row["optimal"] - row["return"])
    # a run stopped at 25 steps and continued to 60 takes the same steps as the one that never stopped
    part = tmp_path / "part"
    icpi.main([*common, "--total_steps", "25", "--output_dir", str(part)])
    with open(part / "episodes.jsonl", "a") as f:
        f.write('{"episode": 99, "cut mid-li')  # a crash mid-append
    resumed = icpi.main([*common, "--total_steps", "60", "--output_dir", str(part)])
    assert (part / "episodes.jsonl").read_text() == (tmp_path / "full" / "episodes.jsonl").read_text()
    assert resumed["env/regret_total"] == pytest.approx(full["env/regret_total"])
    assert resumed["model/unparsed/done"] == full["model/unparsed/done"]
    capsys.readouterr()
    for argv, message in (
        ([*common, "--total_steps", "60", "--seed", "1", "--output_dir", str(part)], "holds a different run"),
        (["--icpi_stage", "nope"], "--icpi_stage 'nope' is not one of chain"),
        (["--method", "sarsa"], "--method 'sarsa' is not one of icpi"),
        (["--prompt_tokens", "10"], "--prompt_tokens 10"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            icpi.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_with_the_tiny_local_model(tmp_path, tiny_model_dir):
    out = tmp_path / "tiny"
    argv = ["--method", "icpi", "--model", "tiny-gpt2", "--total_steps", "12", "--max_tokens", "4",
            "--prompt_tokens", "96", "--min_successes", "0", "--output_dir", str(out)]  # fmt: skip
    summary = icpi.main(argv)
    assert summary["agent/model_steps"] > 0 and summary["llm/calls"] > 0
    assert summary["llm/prompt_tokens"] == summary["backend_usage"]["prompt_tokens"] > 0
    with pytest.raises(UsageError, match="--prompt_tokens 2000"):
        icpi.run(*run_args(tmp_path, "wide", model="tiny-gpt2", prompt_tokens=2000))
