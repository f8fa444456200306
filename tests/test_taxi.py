"""DangerousTaxi rules, the BFS oracle and prompt rendering."""

from collections import deque

import numpy as np
import pytest

from envs import ENVS
from envs.prompt import ACTION_HEAD, ANALYZE_HEAD, action_labels, parse_label, policy_prompt, reflection_prompt
from envs.taxi import (
    ACTIONS,
    DANGER_REWARD,
    IN_TAXI,
    LOCS,
    TaxiEnv,
    action_values,
    decode,
    encode,
    goal_distances,
    oracle_action,
    transition,
)

SOUTH, NORTH, EAST, WEST, PICKUP, DROPOFF = range(6)


def start(env: TaxiEnv, state: int) -> None:
    """Put a freshly reset env into ``state``."""
    env.reset(seed=0)
    env.state = state
    env.picked_up = decode(state)[2] == IN_TAXI


def test_env_dict_and_reset_is_seeded():
    env = ENVS["taxi"]()
    assert env.reset(seed=3).text == env.reset(seed=3).text
    texts = {env.reset(seed=s).text for s in range(20)}
    assert len(texts) > 10


def test_wall_bump_is_dangerous_and_ends_episode():
    env = TaxiEnv()
    start(env, encode(0, 1, 2, 0))  # taxi at (0, 1): a wall to its east
    assert transition(env.state, EAST)[0] == env.state
    _, reward, terminated, truncated, info = env.step(EAST)
    assert reward == DANGER_REWARD == -0.5
    assert terminated and not truncated and not info["success"]


def test_illegal_pickup_and_dropoff_are_dangerous():
    for action in (PICKUP, DROPOFF):
        env = TaxiEnv()
        start(env, encode(2, 2, 0, 1))  # taxi in the middle, passenger at R
        _, reward, terminated, _, _ = env.step(action)
        assert (reward, terminated) == (DANGER_REWARD, True)


def test_danger_applies_on_first_step_and_can_be_disabled():
    env = TaxiEnv(danger=False)
    start(env, encode(0, 1, 2, 0))
    _, reward, terminated, _, _ = env.step(EAST)
    assert reward == pytest.approx(-1 / 20) and not terminated


def test_invalid_action_is_handled_not_raised():
    for bad in (None, 6, -1):
        env = TaxiEnv(danger=False)
        env.reset(seed=0)
        obs, reward, terminated, _, info = env.step(bad)
        assert info["invalid_action"] and terminated and reward == DANGER_REWARD
        assert "(invalid action)" in obs.text


def test_move_reward_is_gym_over_20():
    env = TaxiEnv()
    start(env, encode(2, 2, 0, 1))
    _, reward, terminated, _, info = env.step(NORTH)
    assert reward == pytest.approx(-0.05) and not terminated and not info["success"]


def test_pickup_stage_succeeds_on_pickup():
    env = TaxiEnv(stage="pickup")
    start(env, encode(*LOCS[0], 0, 1))  # taxi on the passenger
    _, reward, terminated, _, info = env.step(PICKUP)
    assert terminated and info["success"] and reward == pytest.approx(-0.05 + 1.0)


def test_full_stage_pickup_bonus_once_then_delivery():
    env = TaxiEnv(stage="full")
    start(env, encode(*LOCS[0], 0, 1))
    _, reward, terminated, _, info = env.step(PICKUP)
    assert reward == pytest.approx(0.95) and not terminated and not info["success"]
    env.state = encode(*LOCS[1], IN_TAXI, 1)  # carry the passenger to G
    _, reward, terminated, _, info = env.step(DROPOFF)
    assert terminated and info["success"] and reward == pytest.approx(1.0)


def test_dropoff_stage_starts_with_passenger_in_taxi():
    env = TaxiEnv(stage="dropoff")
    for seed in range(10):
        env.reset(seed=seed)
        row, col, passenger, _ = decode(env.state)
        assert passenger == IN_TAXI and (row, col) in LOCS
        assert "X" in env.observation().text


def test_horizon_truncates():
    env = TaxiEnv(horizon=2, danger=False)
    start(env, encode(2, 2, 0, 1))
    assert env.step(NORTH)[3] is False
    _, _, terminated, truncated, _ = env.step(SOUTH)
    assert truncated and not terminated and env.done
    with pytest.raises(RuntimeError):
        env.step(NORTH)


def bfs_distance(state: int, goal: str) -> float:
    """Independent breadth-first search over the transition table."""
    seen, queue = {state}, deque([(state, 0)])
    while queue:
        s, d = queue.popleft()
        if goal == "pickup" and decode(s)[2] == IN_TAXI:
            return d
        for a in range(6):
            ns, _, delivered = transition(s, a)
            if goal == "deliver" and delivered:
                return d + 1
            if ns != s and ns not in seen:
                seen.add(ns)
                queue.append((ns, d + 1))
    return np.inf


@pytest.mark.parametrize("goal", ["pickup", "deliver"])
def test_goal_distances_match_bfs(goal):
    dist = goal_distances(goal)
    for s in range(0, 500, 7):
        assert dist[s] == bfs_distance(s, goal)


@pytest.mark.parametrize("stage", ["pickup", "dropoff", "full"])
def test_oracle_is_optimal(stage):
    """From every start, following the oracle finishes in exactly the BFS distance."""
    env = TaxiEnv(stage=stage, horizon=50)
    goal = "pickup" if stage == "pickup" else "deliver"
    for seed in range(40):
        env.reset(seed=seed)
        expected = bfs_distance(env.state, goal)
        steps, info = 0, {}
        while not env.done:
            _, _, _, _, info = env.step(env.oracle_action())
            steps += 1
        assert info["success"] and steps == expected


def test_oracle_never_picks_a_noop():
    for s in range(500):
        if np.isfinite(goal_distances("deliver")[s]) and decode(s)[2] != decode(s)[3]:
            assert transition(s, oracle_action(s))[0] != s


def test_grid_marks():
    env = TaxiEnv(coordinates=True)
    start(env, encode(2, 2, 0, 1))
    text = env.observation().text
    grid = text.split("--- Current State ---\n")[1].split("\nTaxi at")[0]
    assert grid.count("T") == 1 and grid.count("P") == 1 and grid.count("D") == 1
    assert not any(ch in grid for ch in "RGYB")
    assert "Taxi at (2, 2), passenger at (0, 0), destination at (0, 4)." in text
    start(env, encode(*LOCS[0], 0, 1))
    assert "O" in env.observation().text.split("State ---")[1]


def test_history_lists_actions():
    env = TaxiEnv()
    start(env, encode(2, 2, 0, 1))
    obs, *_ = env.step(NORTH)
    assert "following actions:\nmove north\n" in obs.text


def test_prompt_layout_and_labels():
    env = TaxiEnv()
    obs = env.reset(seed=1)
    labels = action_labels(len(obs.actions))
    assert labels == ["0", "1", "2", "3", "4", "5"]
    plain = policy_prompt(obs, labels)
    assert ANALYZE_HEAD not in plain and plain.endswith("\n\n" + ACTION_HEAD)
    assert "0. move south\n" in plain and "5. drop off passenger\n" in plain
    with_reflection = policy_prompt(obs, labels, "Go north.")
    assert with_reflection.startswith(reflection_prompt(obs) + "Go north.\n\n# Actions:\n")
    assert with_reflection.endswith(plain[len(obs.text) :])


def test_parse_label_never_raises():
    labels = action_labels(6)
    assert parse_label("3", labels) == 3
    assert parse_label(" 3. move west\nmore", labels) == 3
    assert parse_label("Action 2", labels) == 2
    for bad in ("", "   ", "\n", "9", "move", "Action", "3x"):
        assert parse_label(bad, labels) is None
    assert parse_label(ACTIONS[0], labels) is None


def test_success_reward_pays_only_for_finishing():
    env = TaxiEnv(stage="pickup", reward="success")
    start(env, encode(2, 2, 0, 1))
    assert env.step(NORTH)[1] == 0.0
    env = TaxiEnv(stage="pickup", reward="success")
    start(env, encode(0, 1, 2, 0))
    _, reward, terminated, _, _ = env.step(EAST)  # a wall bump still ends the episode, at no cost
    assert (reward, terminated) == (0.0, True)
    env = TaxiEnv(stage="pickup", reward="success")
    start(env, encode(*LOCS[0], 0, 1))
    _, reward, terminated, _, info = env.step(PICKUP)
    assert (reward, terminated, info["success"]) == (1.0, True, True)
    with pytest.raises(ValueError):
        TaxiEnv(reward="shaped")


def test_success_danger_reward_keeps_only_the_crash_cost():
    env = TaxiEnv(stage="pickup", reward="success_danger")
    start(env, encode(2, 2, 0, 1))
    assert env.step(NORTH)[1] == 0.0  # no cost per step
    start(env, encode(0, 1, 2, 0))
    _, reward, terminated, _, _ = env.step(EAST)  # a wall bump: the paper's -10/20, and the episode ends
    assert (reward, terminated) == (-0.5, True)
    start(env, encode(*LOCS[0], 0, 1))
    _, reward, terminated, _, info = env.step(PICKUP)
    assert (reward, terminated, info["success"]) == (1.0, True, True)


def test_progress_reward_scores_each_move_by_the_distance_it_gains():
    env = TaxiEnv(stage="dropoff", reward="progress", dropoff_start="anywhere")
    state = encode(2, 2, IN_TAXI, 0)  # the destination is R at (0, 0)
    start(env, state)
    dist = env.distance_to_goal()
    closer = env.oracle_action()
    farther = next(a for a in range(4) if action_values(state, "dropoff")[a] == dist + 1)
    assert env.step(closer)[1] == pytest.approx(0.1)
    start(env, state)
    assert env.step(farther)[1] == pytest.approx(-0.1)
    start(env, encode(0, 1, IN_TAXI, 0))
    _, reward, terminated, _, _ = env.step(EAST)  # a wall bump gains nothing and ends the episode
    assert (reward, terminated) == (0.0, True)
    # Finishing pays 1 plus the distance covered: an oracle episode sums to 1 + 0.1 x its length.
    for seed in range(20):
        env.reset(seed=seed)
        length, total = env.distance_to_goal(), 0.0
        while not env.done:
            _, reward, _, _, info = env.step(env.oracle_action())
            total += reward
        assert info["success"] and total == pytest.approx(1 + 0.1 * length)
