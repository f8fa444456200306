"""Episode transcripts as one self-contained HTML page, to read what the agent saw, thought and chose.

    python -m visualization.episodes runs/reflect_rl/eval
    python -m visualization.episodes runs/demo/eval/sft_only runs/demo/eval/reflect_rl --output episodes.html
    python -m visualization.episodes runs/reflect_rl --max_episodes 200      # a run: its latest 200 episodes

Each folder is an evaluation folder (``evaluation.evaluate --output_dir``) or an RL run folder
(``training.rl_finetune --output_dir``); its ``episodes.jsonl`` (``Episode.transcript()`` rows) is read
whole. The page lists every episode as a card (seed, stage, success, return, length) that opens onto
its steps: the state text, the reflection, the policy's distribution over the action labels with the
chosen one marked, the reward and the invalid flag. Filters by success and stage run in the page;
``page.html#success=1&stage=pickup`` (or ``?success=0``, ``&expand=1``) sets them on load. With two
folders the episodes are paired by (seed, stage) and shown side by side, unpaired ones after.

The page has no external files and makes no requests: CSS, script and data are inline, and every piece
of text from the episodes is inserted as text, never as markup. It is written whole or not at all, by
default to ``FOLDER/episodes.html`` (two folders: their common parent).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from pathlib import Path

from envs.prompt import ACTION_HEAD, ACTIONS_HEAD
from evaluation.compare import STAGE_ORDER, unique_labels
from experiment_args import UsageError
from run_utils import atomic_write_text, cli
from visualization.jsonl import read_rows

WHAT_TO_PASS = "pass evaluation folders from evaluation.evaluate or run folders from training.rl_finetune"


def read_episodes(path: Path) -> list[dict]:
    """The rows of an episodes.jsonl; UsageError naming the file and line of the first row that is not
    an episode. An unterminated last line is skipped: a live run may be halfway through appending it."""
    parsed, skipped = read_rows(path, WHAT_TO_PASS)
    if skipped:
        print(f"note: skipped the unfinished last line of {path}", file=sys.stderr)
    rows = []
    for number, row in parsed:
        steps = row.get("steps") if isinstance(row, dict) else None
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps) or "seed" not in row:
            raise UsageError(
                f"{path} line {number} is not an episode (needs seed and a list of steps); {WHAT_TO_PASS}"
            )
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} holds no episodes; {WHAT_TO_PASS}")
    return rows


def source_name(folder: Path) -> str:
    """The name evaluation.evaluate gave the agent (``summary.json``), else the folder's name."""
    try:
        name = json.loads((folder / "summary.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else folder.resolve().name


def prompt_actions(prompt: str) -> list[list[str]]:
    """``[[label, action text], ...]`` from a policy prompt's last ``# Actions:`` block; [] if it has none."""
    start = prompt.rfind(ACTIONS_HEAD)
    if start < 0:
        return []
    block = prompt[start + len(ACTIONS_HEAD) :]
    end = block.find("\n\n" + ACTION_HEAD)
    lines = block[: end if end >= 0 else len(block)].split("\n")
    return [line.split(". ", 1) if ". " in line else [line, ""] for line in lines if line]


def pair_episodes(left: list[dict], right: list[dict]) -> list[list[int | None]]:
    """Index pairs into ``left`` and ``right`` of episodes with the same (seed, stage), in ``left``'s order
    (the k-th occurrence of a key in one pairs with the k-th in the other), then the unpaired ones of
    ``left``, then of ``right``."""
    waiting: dict[tuple, list[int]] = {}
    for j, ep in enumerate(right):
        waiting.setdefault(episode_key(ep), []).append(j)
    pairs, lonely = [], []
    for i, ep in enumerate(left):
        queue = waiting.get(episode_key(ep))
        if queue:
            pairs.append([i, queue.pop(0)])
        else:
            lonely.append([i, None])
    paired_right = {j for _, j in pairs}
    return pairs + lonely + [[None, j] for j in range(len(right)) if j not in paired_right]


def episode_key(ep: dict) -> tuple[str, str]:
    # as JSON text, so 3 and 3.0 or a list seed compare the way they print
    return json.dumps(ep.get("seed")), json.dumps(ep.get("stage"))


def ordered_stages(episodes: list[dict]) -> list[str]:
    seen = dict.fromkeys(str(ep.get("stage", "")) for ep in episodes)
    return [s for s in STAGE_ORDER if s in seen] + [s for s in seen if s not in STAGE_ORDER]


def stage_counts(episodes: list[dict]) -> dict[str, tuple[int, int]]:
    """stage -> (episodes, successes), stages in curriculum order."""
    counts = {stage: [0, 0] for stage in ordered_stages(episodes)}
    for ep in episodes:
        counts[str(ep.get("stage", ""))][0] += 1
        counts[str(ep.get("stage", ""))][1] += bool(ep.get("success"))
    return {stage: (n, k) for stage, (n, k) in counts.items()}


def finite(value):
    """``value`` with every NaN or infinity replaced by None: the browser's JSON.parse rejects them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def script_json(data: dict) -> str:
    """JSON safe inside a <script> element: ``<``, ``>`` and ``&`` become \\u escapes, so no text in the
    data (a prompt holding ``</script>`` or ``<!--``) can end the element or change how it is parsed."""
    text = json.dumps(finite(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def view_episode(ep: dict) -> dict:
    """The transcript row as it is, plus each step's parsed ``actions`` (label and text) for the bars."""
    steps = []
    for step in ep["steps"]:
        prompt = step.get("prompt")
        steps.append({**step, "actions": prompt_actions(prompt if isinstance(prompt, str) else "")})
    return {**ep, "steps": steps}


def header_html(sources: list[dict], stages: list[str], pairs: list[list[int | None]]) -> str:
    """The static summary: one line per folder with its episode and per-stage success counts."""
    rows = []
    for source in sources:
        counts = stage_counts(source["episodes"])
        n, wins = len(source["episodes"]), sum(k for _, k in counts.values())
        shown = f"{n} episodes" + (f" (of {source['total']} in the file)" if source["total"] > n else "")
        cells = [f"{k}/{c} ({k / c:.0%})" if c else "-" for c, k in (counts.get(s, (0, 0)) for s in stages)]
        rows.append([source["name"], f"{source['path']} ({source['kind']})", shown, f"{wins / n:.0%}", *cells])
    head = ["name", "folder", "episodes", "success rate", *(f"{s}: successes" for s in stages)]
    table = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    text = f'<table class="sources">{table}</table>'
    if len(sources) == 2:
        paired = sum(i is not None and j is not None for i, j in pairs)
        alone = [sum(p[s] is not None and p[1 - s] is None for p in pairs) for s in (0, 1)]
        text += (
            f"<p>Paired by (seed, stage): {paired}; unpaired: {alone[0]} in "
            f"{html.escape(sources[0]['name'])}, {alone[1]} in {html.escape(sources[1]['name'])} (listed last).</p>"
        )
    return text


def render_page(sources: list[dict], pairs: list[list[int | None]]) -> str:
    all_episodes = [ep for s in sources for ep in s["episodes"]]
    stages = ordered_stages(all_episodes)
    data = {
        "sources": [{"name": s["name"], "path": s["path"], "kind": s["kind"]} for s in sources],
        "stages": stages,
        "episodes": [[view_episode(ep) for ep in s["episodes"]] for s in sources],
        "rows": pairs,
    }
    title = "Episodes: " + " vs ".join(s["name"] for s in sources)
    differs = '<option value="differs">the two differ</option>' if len(sources) == 2 else ""
    columns = "".join(f"<div>{html.escape(s['name'])}</div>" for s in sources) if len(sources) == 2 else ""
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
            # no requests of any kind, even if markup were ever injected
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n",
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n",
            f"<header><h1>{html.escape(title)}</h1>{header_html(sources, stages, pairs)}</header>\n",
            '<nav id="controls"><label>success <select id="f-success"><option value="all">all</option>',
            f'<option value="1">success</option><option value="0">failure</option>{differs}</select></label>\n',
            '<label>stage <select id="f-stage"><option value="all">all</option></select></label>\n',
            '<button id="expand" type="button">open the first 50 shown</button>',
            '<button id="collapse" type="button">close all</button> <span id="count"></span></nav>\n',
            f'<div id="columns" class="cols-{len(sources)}">{columns}</div>\n',
            '<main id="rows"><noscript>The episode list needs JavaScript.</noscript></main>\n',
            f'<script type="application/json" id="episode-data">{script_json(data)}</script>\n',
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n",
        ]
    )


@cli
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m visualization.episodes", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="RUN_OR_EVAL_DIR", help="one folder, or two to compare")
    parser.add_argument("--output", default="", help="the HTML file (default: FOLDER/episodes.html)")
    parser.add_argument(
        "--max_episodes", type=int, default=1000, metavar="N",
        help="at most N episodes per folder: an evaluation's first N, a run's last N (0: all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if len(args.dirs) > 2:
        raise UsageError(f"give one folder, or two to compare side by side (got {len(args.dirs)})")
    if args.max_episodes < 0:
        raise UsageError("--max_episodes must be >= 0 (0 shows every episode)")

    folders = [Path(d) for d in args.dirs]
    sources = []
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder; {WHAT_TO_PASS}")
        if not (folder / "episodes.jsonl").is_file():
            raise UsageError(f"{folder} has no episodes.jsonl; {WHAT_TO_PASS}")
        rows = read_episodes(folder / "episodes.jsonl")
        kind = "run" if any("iteration" in r for r in rows) else "evaluation"
        kept = rows
        if args.max_episodes and len(rows) > args.max_episodes:
            # a run's latest episodes show the trained policy; an evaluation's first keep seeds aligned
            kept = rows[-args.max_episodes :] if kind == "run" else rows[: args.max_episodes]
            which = "last" if kind == "run" else "first"
            print(f"note: {folder} has {len(rows)} episodes; showing the {which} {len(kept)}", file=sys.stderr)
        sources.append({"path": str(folder), "kind": kind, "episodes": kept, "total": len(rows)})
    names = unique_labels([source_name(f) for f in folders], folders)
    for source, name in zip(sources, names):
        source["name"] = name
    if len(sources) == 2:
        pairs = pair_episodes(sources[0]["episodes"], sources[1]["episodes"])
    else:
        pairs = [[i] for i in range(len(sources[0]["episodes"]))]

    if args.output:
        output = Path(args.output)
    elif len(folders) == 1:
        output = folders[0] / "episodes.html"
    else:
        output = Path(os.path.commonpath([f.resolve() for f in folders])) / "episodes.html"
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file name such as {output / 'episodes.html'}")
    atomic_write_text(output, render_page(sources, pairs))
    print(output)
    return output


CSS = """
:root { --ok: #1a7f37; --fail: #c62828; --line: #d0d7de; --muted: #57606a; --chosen: #0969da; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 1.5em 3em; color: #1f2328; }
[hidden] { display: none !important; }
h1 { font-size: 1.3em; margin: 0.8em 0 0.4em; }
table.sources { border-collapse: collapse; margin-bottom: 0.5em; }
table.sources th, table.sources td { border: 1px solid var(--line); padding: 2px 8px; text-align: left; }
#controls { position: sticky; top: 0; background: #fff; padding: 6px 0; border-bottom: 1px solid var(--line);
  z-index: 2; display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
#count { color: var(--muted); }
#columns, .row { display: grid; gap: 10px; grid-template-columns: 1fr; }
#columns.cols-2, .row.cols-2 { grid-template-columns: 1fr 1fr; }
#columns div { font-weight: 600; padding: 6px 0 0; }
.row { margin: 6px 0; align-items: start; }
h2.unpaired { font-size: 1.05em; margin: 1.5em 0 0.3em; }
.card { border: 1px solid var(--line); border-left: 5px solid var(--fail); border-radius: 4px; min-width: 0; }
.card.ok { border-left-color: var(--ok); }
.card.dim { opacity: 0.45; }
.card.missing { border-left-color: var(--line); color: var(--muted); padding: 6px 10px; }
.card summary { cursor: pointer; padding: 6px 10px; display: flex; gap: 1.2em; flex-wrap: wrap; }
.badge { font-weight: 600; color: var(--fail); }
.ok .badge { color: var(--ok); }
.steps { padding: 0 10px 8px; }
.step { border-top: 1px solid var(--line); padding: 6px 0; }
.step.invalid { background: #fff5f5; }
.step-head { display: flex; gap: 1.2em; flex-wrap: wrap; margin-bottom: 4px; }
.flag { color: var(--fail); font-weight: 600; }
pre { background: #f6f8fa; padding: 6px 8px; margin: 4px 0; overflow-x: auto; font-size: 12.5px; }
.reflection { white-space: pre-wrap; margin: 4px 0; padding-left: 8px; border-left: 3px solid #bf8700; }
.key { color: var(--muted); }
.bar-row { display: grid; grid-template-columns: minmax(8em, 16em) 1fr 3.5em; gap: 8px; align-items: center;
  font-size: 12.5px; }
.bar-track { background: #eaeef2; height: 10px; border-radius: 2px; overflow: hidden; }
.bar-fill { display: block; height: 100%; background: #8c959f; }
.bar-row.chosen { font-weight: 600; color: var(--chosen); }
.bar-row.chosen .bar-fill { background: var(--chosen); }
.bar-value { text-align: right; }
details.prompt > summary { color: var(--muted); cursor: pointer; font-size: 12.5px; }
"""

# Every piece of episode text goes in through textContent; only numbers set styles.
SCRIPT = r"""
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("episode-data").textContent);
  const two = data.sources.length === 2;
  const EXPAND_LIMIT = 50;
  const byId = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function num(x, digits) {
    return typeof x === "number" ? x.toFixed(digits) : "-";
  }
  function keyed(key, value) {
    const span = el("span");
    span.append(el("span", "key", key + " "), el("span", null, value));
    return span;
  }
  // the state text: the prompt before its reflection and action list
  function stateText(prompt) {
    let end = prompt.indexOf("\n\n# Analyze:\n");
    if (end < 0) end = prompt.lastIndexOf("\n\n# Actions:\n");
    return end < 0 ? prompt : prompt.slice(0, end);
  }

  function distribution(step) {
    const actions = Array.isArray(step.actions) ? step.actions : [];
    const probs = Array.isArray(step.probs) ? step.probs : null;
    const box = el("div", "dist");
    const n = probs ? probs.length : actions.length;
    for (let i = 0; i < n; i++) {
      const pair = Array.isArray(actions[i]) ? actions[i] : [String(i), ""];
      const row = el("div", "bar-row" + (i === step.action ? " chosen" : ""));
      const p = probs ? probs[i] : i === step.action ? step.prob : null;
      const fill = el("span", "bar-fill");
      fill.style.width = (typeof p === "number" ? Math.min(Math.max(p, 0), 1) * 100 : 0) + "%";
      const track = el("span", "bar-track");
      track.append(fill);
      row.append(el("span", "bar-label", pair[0] + ". " + pair[1]), track, el("span", "bar-value", num(p, 3)));
      box.append(row);
    }
    if (!probs) box.append(el("div", "key", "no distribution recorded (only the chosen action's probability)"));
    return box;
  }

  // "1. move north" when the prompt listed the actions, else the label; "none" for an invalid action
  function chosenText(step) {
    const listed = Array.isArray(step.actions) ? step.actions[step.action] : undefined;
    if (Array.isArray(listed)) return listed.join(". ");
    if (step.label !== null && step.label !== undefined) return step.label;
    return step.action === null || step.action === undefined ? "none" : step.action;
  }

  function stepNode(step, t) {
    const prompt = typeof step.prompt === "string" ? step.prompt : "";
    const box = el("div", "step" + (step.invalid ? " invalid" : ""));
    const head = el("div", "step-head");
    head.append(el("strong", null, "step " + t), keyed("action", chosenText(step)));
    head.append(keyed("p", num(step.prob, 3)), keyed("reward", num(step.reward, 3)));
    if (step.invalid) head.append(el("span", "flag", "invalid action"));
    box.append(head, el("pre", "state", stateText(prompt)));
    if (typeof step.reflection === "string") {
      const reflection = el("div", "reflection");
      reflection.append(el("span", "key", "reflection: "), el("span", null, step.reflection));
      box.append(reflection);
    }
    box.append(distribution(step));
    const full = el("details", "prompt");
    full.append(el("summary", null, "full prompt"), el("pre", null, prompt));
    box.append(full);
    return box;
  }

  const filled = new WeakSet();
  function fill(card, ep) {
    if (filled.has(card)) return;
    filled.add(card);
    const steps = el("div", "steps");
    ep.steps.forEach((step, t) => steps.append(stepNode(step, t)));
    card.append(steps);
  }

  function cardNode(ep, partners) {
    const card = el("details", "card" + (ep.success ? " ok" : ""));
    card.dataset.seed = JSON.stringify(ep.seed);
    card.dataset.stage = String(ep.stage);
    card.dataset.success = ep.success ? "1" : "0";
    const summary = el("summary");
    summary.append(el("span", "badge", ep.success ? "success" : "failure"), keyed("seed", JSON.stringify(ep.seed)));
    summary.append(keyed("stage", ep.stage), keyed("return", num(ep.return, 3)), keyed("length", ep.length));
    if (ep.iteration !== undefined) summary.append(keyed("iteration", ep.iteration));
    card.append(summary);
    card.addEventListener("toggle", () => {
      if (card.open) fill(card, ep);
      // a pair opens and closes together, to read the two step by step
      partners.forEach((other) => {
        if (other.node !== card && other.node.open !== card.open) setOpen(other, card.open);
      });
    });
    return card;
  }
  function setOpen(item, open) {
    if (open) fill(item.node, item.ep);
    item.node.open = open;
  }

  // rows: one per episode, or per (seed, stage) pair of the two folders
  const main = byId("rows");
  let unpairedHead = null;
  const rows = data.rows.map((indices) => {
    const eps = indices.map((index, s) => (index === null ? null : data.episodes[s][index]));
    const node = el("div", "row cols-" + data.sources.length);
    const items = [];
    eps.forEach((ep, s) => {
      if (ep === null) {
        node.append(el("div", "card missing", "no episode with this seed and stage in " + data.sources[s].name));
        return;
      }
      const item = { ep: ep, node: cardNode(ep, items) };
      items.push(item);
      node.append(item.node);
    });
    const paired = eps.every((ep) => ep !== null);
    if (two && !paired && unpairedHead === null) {
      unpairedHead = el("h2", "unpaired", "Episodes without a partner");
      main.append(unpairedHead);
    }
    main.append(node);
    return { eps: eps, node: node, items: items, paired: paired };
  });

  const successSelect = byId("f-success");
  const stageSelect = byId("f-stage");
  data.stages.forEach((stage) => stageSelect.append(el("option", null, stage)));

  function matches(ep, success, stage) {
    if (ep === null || (stage !== "all" && String(ep.stage) !== stage)) return false;
    if (success === "1") return Boolean(ep.success);
    if (success === "0") return !ep.success;
    return true;
  }
  function apply() {
    const success = successSelect.value;
    const stage = stageSelect.value;
    let shown = 0;
    let unpairedShown = 0;
    rows.forEach((row) => {
      let visible;
      if (success === "differs") {
        const [a, b] = row.eps;
        visible = row.paired && matches(a, "all", stage) && Boolean(a.success) !== Boolean(b.success);
      } else {
        visible = row.eps.some((ep) => matches(ep, success, stage));
      }
      row.node.hidden = !visible;
      // in a shown pair, the partner that does not match is dimmed, not hidden
      row.items.forEach((item) => {
        item.node.classList.toggle("dim", visible && success !== "differs" && !matches(item.ep, success, stage));
      });
      if (visible) {
        shown += 1;
        if (!row.paired) unpairedShown += 1;
      }
    });
    if (unpairedHead) unpairedHead.hidden = unpairedShown === 0;
    byId("count").textContent = shown + " of " + rows.length + (two ? " rows" : " episodes") + " shown";
  }

  // #success=1&stage=pickup&expand=1 (or the same as a query) sets the filters on load
  function readLocation() {
    const text = location.hash.length > 1 ? location.hash.slice(1) : location.search.slice(1);
    const params = new URLSearchParams(text);
    const aliases = { success: "1", true: "1", failure: "0", false: "0" };
    const pick = (select, value) => {
      if (value === null) return;
      value = select === successSelect && value in aliases ? aliases[value] : value;
      if (Array.from(select.options).some((o) => o.value === value)) select.value = value;
    };
    pick(successSelect, params.get("success"));
    pick(stageSelect, params.get("stage"));
    apply();
    if (params.get("expand") === "1") expand();
  }
  function writeLocation() {
    const params = new URLSearchParams();
    if (successSelect.value !== "all") params.set("success", successSelect.value);
    if (stageSelect.value !== "all") params.set("stage", stageSelect.value);
    try {
      history.replaceState(null, "", "#" + params.toString());
    } catch (err) {
      // some browsers refuse it on file:// pages; the filters still work
    }
  }
  function expand() {
    const shown = rows.filter((row) => !row.node.hidden).slice(0, EXPAND_LIMIT);
    shown.forEach((row) => row.items.forEach((item) => setOpen(item, true)));
  }

  successSelect.addEventListener("change", () => { apply(); writeLocation(); });
  stageSelect.addEventListener("change", () => { apply(); writeLocation(); });
  byId("expand").addEventListener("click", expand);
  byId("collapse").addEventListener("click", () => {
    rows.forEach((row) => row.items.forEach((item) => setOpen(item, false)));
  });
  window.addEventListener("hashchange", readLocation);
  readLocation();
})();
"""


if __name__ == "__main__":
    main()
