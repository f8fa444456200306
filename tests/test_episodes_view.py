"""visualization.episodes: the page from hand-written episodes.jsonl files, the policy's distribution that
rollouts record for it, and (where Chromium is installed) the page's filters in a headless browser."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from visualization import episodes as view

HOSTILE = "</script><b>x</b><!-- <script>document.title='pwned'</script>"
ACTIONS = ["move south", "move north", "pick up"]


def make_prompt(state: str) -> str:
    """A policy prompt as envs.prompt renders it: state, reflection, labelled actions."""
    listed = "".join(f"{i}. {a}\n" for i, a in enumerate(ACTIONS))
    return f"{state}\n\n# Analyze:\nGo south first.\n\n# Actions:\n{listed}\n# Action:\n"


def episode(seed: int, stage: str, success: bool, state: str = "", iteration: int | None = None) -> dict:
    """An Episode.transcript() row: two steps, the second one invalid when the episode fails."""
    steps = [
        {
            "prompt": make_prompt(state or f"seed {seed} step {t}"),
            "reflection": "Go south first.",
            "action": t % 3,
            "label": str(t % 3),
            "prob": 0.5,
            "reward": 1.0 if success and t == 1 else 0.0,
            "invalid": not success and t == 1,
            "probs": [0.5, 0.3, 0.2] if t == 0 else [0.2, 0.5, 0.3],
        }
        for t in range(2)
    ]
    row = {"seed": seed, "stage": stage, "success": success, "return": 1.0 if success else 0.0, "length": 2}
    row["steps"] = steps
    return row if iteration is None else {"iteration": iteration, **row}


def write_folder(folder, rows: list[dict], name: str | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if name:
        (folder / "summary.json").write_text(json.dumps({"name": name, "stages": {}}))


class Node:
    def __init__(self, tag: str, attrs: dict, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], []

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class TreeParser(HTMLParser):
    """Python's own HTML tokenizer, into a small tree (text kept per element)."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self, text: str):
        super().__init__()
        self.root = self.node = Node("#root", {})
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        child = Node(tag, dict(attrs), self.node)
        self.node.children.append(child)
        if tag not in self.VOID:
            self.node = child

    def handle_endtag(self, tag):
        node = self.node
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.text.append(data)


def embedded_data(page: str) -> dict:
    root = TreeParser(page).root
    (block,) = [n for n in root.walk() if n.tag == "script" and n.attrs.get("type") == "application/json"]
    return json.loads(block.all_text())


def without_actions(rows: list[dict]) -> list[dict]:
    return [{**ep, "steps": [{k: v for k, v in s.items() if k != "actions"} for s in ep["steps"]]} for ep in rows]


def test_page_embeds_every_episode_and_pairs_two_folders(tmp_path):
    sft = [episode(0, "pickup", False), episode(1, "pickup", True, HOSTILE), episode(2, "pickup", False)]
    sft.append(episode(0, "dropoff", True))
    rl = [
        episode(3, "pickup", True),
        episode(2, "pickup", True),
        episode(1, "pickup", True),
        episode(0, "dropoff", False),
    ]
    write_folder(tmp_path / "sft_only", sft, "SFT-only")
    write_folder(tmp_path / "reflect_rl", rl, "Reflect-RL")
    out = tmp_path / "plots" / "episodes.html"
    assert view.main([str(tmp_path / "sft_only"), str(tmp_path / "reflect_rl"), "--output", str(out)]) == out
    page = out.read_text()

    data = embedded_data(page)
    assert without_actions(data["episodes"][0]) == sft and without_actions(data["episodes"][1]) == rl
    assert data["episodes"][0][0]["steps"][0]["actions"] == [[str(i), a] for i, a in enumerate(ACTIONS)]
    assert [s["name"] for s in data["sources"]] == ["SFT-only", "Reflect-RL"]
    assert data["stages"] == ["pickup", "dropoff"]
    # pairs by (seed, stage) in the first folder's order, then the unpaired of each side
    assert data["rows"] == [[1, 2], [2, 1], [3, 3], [0, None], [None, 0]]

    # the hostile prompt is data in the JSON block, never markup: no <b> element, one JSON block, the
    # text round-trips exactly, and the raw page has no "</script><b>" outside the two real scripts
    root = TreeParser(page).root
    tags = [n.tag for n in root.walk()]
    assert "b" not in tags and tags.count("script") == 2
    assert data["episodes"][0][1]["steps"][0]["prompt"].startswith(HOSTILE)
    assert "<b>x" not in page and page.count("</script>") == 2
    title = next(n for n in root.walk() if n.tag == "title").all_text()
    assert title == "Episodes: SFT-only vs Reflect-RL"
    header = next(n for n in root.walk() if n.tag == "header").all_text()
    assert (
        "Paired by (seed, stage): 3; unpaired: 1 in SFT-only, 1 in Reflect-RL" in header
        and "1/3 (33%)" in header
        and "3/3 (100%)" in header
    )


def test_one_run_folder_keeps_its_latest_episodes(tmp_path, capsys):
    rows = [episode(i, "pickup", i % 2 == 0, iteration=1 + i // 2) for i in range(6)]
    write_folder(tmp_path / "run", rows)
    out = view.main([str(tmp_path / "run"), "--max_episodes", "4"])
    assert out == tmp_path / "run" / "episodes.html"
    data = embedded_data(out.read_text())
    assert data["sources"][0]["kind"] == "run" and data["rows"] == [[0], [1], [2], [3]]
    assert without_actions(data["episodes"][0]) == rows[2:]
    assert "showing the last 4" in capsys.readouterr().err


def test_pairs_repeated_keys_in_order():
    left = [episode(0, "full", True), episode(0, "full", False), episode(1, "full", True)]
    right = [episode(0, "full", True), episode(2, "full", True)]
    assert view.pair_episodes(left, right) == [[0, 0], [1, None], [2, None], [None, 1]]


def test_prompt_actions_reads_the_last_action_block():
    assert view.prompt_actions(make_prompt("grid")) == [["0", "move south"], ["1", "move north"], ["2", "pick up"]]
    assert view.prompt_actions("no actions here") == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "is not a folder"),
        ("no_jsonl", "has no episodes.jsonl"),
        ("bad_line", "line 2 is not valid JSON"),
        ("not_episode", "line 1 is not an episode"),
        ("three", "give one folder, or two"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, message):
    folder = tmp_path / "eval"
    folder.mkdir()
    good = json.dumps(episode(0, "pickup", True))
    if case == "bad_line":
        (folder / "episodes.jsonl").write_text(good + "\n{not json\n" + good + "\n")
    elif case == "not_episode":
        (folder / "episodes.jsonl").write_text('{"seed": 0, "steps": "none"}\n')
    else:
        (folder / "episodes.jsonl").write_text(good + "\n")
    dirs = {"missing": [str(tmp_path / "nope")], "no_jsonl": [str(tmp_path)], "three": [str(folder)] * 3}
    with pytest.raises(SystemExit) as exit_info:
        view.main([*dirs.get(case, [str(folder)]), "--output", str(tmp_path / "page.html")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "page.html").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_rollout_records_the_policy_distribution(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from envs.taxi import TaxiEnv
    from training.models import load_tokenizer
    from training.rollout import LMPolicy, RandomAgent, rollout

    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = LMPolicy(model, tokenizer)
    envs = [TaxiEnv(stage="pickup"), TaxiEnv(stage="pickup")]
    episodes = rollout(envs, [0, 1], policy, generator=torch.Generator().manual_seed(0))
    rows = [ep.transcript() for ep in episodes]
    for ep, row in zip(episodes, rows):
        assert len(ep.steps) == row["length"] >= 1
        for step, record in zip(ep.steps, row["steps"]):
            assert len(step.probs) == step.n_actions == 6
            assert sum(step.probs) == pytest.approx(1.0, abs=1e-5)
            assert record["probs"] == step.probs
            if step.action is not None:
                assert record["prob"] == pytest.approx(step.probs[step.action], rel=1e-5)
    # the page reads them back, with the labels from each prompt
    write_folder(tmp_path / "eval", rows)
    data = embedded_data(view.main([str(tmp_path / "eval")]).read_text())
    for step in data["episodes"][0][0]["steps"]:
        assert len(step["actions"]) == len(step["probs"]) == 6
    # agents without a distribution leave it out
    (random_ep,) = rollout([TaxiEnv(stage="pickup")], [0], RandomAgent(0))
    assert all(s["probs"] is None for s in random_ep.transcript()["steps"])


CHROMIUM = shutil.which("chromium")


def dump_dom(url: str, profile) -> TreeParser:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--virtual-time-budget=3000", "--dump-dom", url,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return TreeParser(result.stdout).root


def shown_cards(root: Node) -> list[Node]:
    rows = [n for n in root.walk() if "row" in n.classes() and "hidden" not in n.attrs]
    return [c for r in rows for c in r.walk() if c.tag == "details" and "card" in c.classes()]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_filters_from_the_url_in_headless_chromium(tmp_path):
    rows = [episode(0, "pickup", True, HOSTILE), episode(1, "pickup", False), episode(2, "dropoff", True)]
    rows += [episode(3, "pickup", True), episode(4, "full", False)]
    write_folder(tmp_path / "eval", rows, "Reflect-RL")
    write_folder(tmp_path / "sft", [episode(0, "pickup", False), episode(3, "pickup", True)], "SFT-only")
    page = view.main([str(tmp_path / "eval")])

    root = dump_dom(page.as_uri() + "#success=1&stage=pickup&expand=1", tmp_path / "profile")
    cards = shown_cards(root)
    assert sorted((c.attrs["data-seed"], c.attrs["data-stage"], c.attrs["data-success"]) for c in cards) == [
        ("0", "pickup", "1"),
        ("3", "pickup", "1"),
    ]
    assert len([n for n in root.walk() if n.tag == "details" and "card" in n.classes()]) == 5  # all built
    count = next(n for n in root.walk() if n.attrs.get("id") == "count").all_text()
    assert count == "2 of 5 episodes shown"
    # expand=1 opened the shown cards: steps with their state text, bars, the chosen action marked; the
    # hostile prompt is text in a <pre>, and no <b> element or injected script exists
    first = next(c for c in cards if c.attrs["data-seed"] == "0")
    assert "open" in first.attrs
    pres = [n.all_text() for n in first.walk() if n.tag == "pre"]
    assert pres[0] == HOSTILE and make_prompt(HOSTILE) in pres
    bars = [n for n in first.walk() if "bar-row" in n.classes()]
    assert len(bars) == 6 and ["chosen" in b.classes() for b in bars[:3]] == [True, False, False]
    assert [b.all_text() for b in bars[:3]] == ["0. move south0.500", "1. move north0.300", "2. pick up0.200"]
    assert not any(n.tag == "b" for n in root.walk())
    assert sum(n.tag == "script" for n in root.walk()) == 2
    assert next(n for n in root.walk() if n.tag == "title").all_text() == "Episodes: Reflect-RL"

    # two folders: only the pairs whose outcomes differ, given as a query
    page = view.main([str(tmp_path / "sft"), str(tmp_path / "eval"), "--output", str(tmp_path / "pair.html")])
    root = dump_dom(page.as_uri() + "?success=differs", tmp_path / "profile")
    cards = shown_cards(root)
    assert [(c.attrs["data-seed"], c.attrs["data-success"]) for c in cards] == [("0", "0"), ("0", "1")]
