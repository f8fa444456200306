"""Offline ALFWorld problems: seeded, small, solvable games for the real engine, without ``alfworld-download``.

A problem is written against the ALFRED PDDL domain and TextWorld grammar that the ``alfworld`` wheel ships
(``alfworld/data/alfred.pddl``, ``alfred.twl2``) and saved as the official ``game.tw-pddl`` JSON (``pddl_domain``,
``grammar`` with the task description in place of ``UNKNOWN GOAL``, ``pddl_problem``, ``solvable``,
``walkthrough``), which TextWorld's PDDL backend plays like a downloaded game. What a problem holds:

- **Room**: real receptacle instances of one AI2-THOR floor plan (the wheel's ``gen/layouts/FloorPlan*-openable.json``,
  e.g. ``Cabinet|+00.68|+00.50|-02.20``), at most ``max_receptacles`` of them, each at its own location; the
  agent starts in the middle of the room. Openable ones (cabinets, drawers, fridge, microwave, safe) start closed.
- **Objects**: types that the floor plan has (``FloorPlan*-objects.json``), put in receptacles that can hold them
  (the wheel's ``VAL_RECEPTACLE_OBJECTS``), with their properties (``VAL_ACTION_OBJECTS``: heatable, coolable,
  cleanable, toggleable): the task's targets, a lamp for ``look_at_obj_in_light``, and a few distractors.
- **Goal**: ALFRED's own goal formula of the task type (the wheel's ``gen/goal_library.py``) and one of its
  description templates, e.g. "put a clean apple in fridge".

Every problem is verified before it is kept: the expert (:mod:`envs.alfworld.expert`) plays it through the
engine to a win, and its commands become the file's walkthrough. Train, validation and test are disjoint: test
problems come from floor plans never used for training (ALFWorld's ``valid_unseen``), validation from training
floor plans with other placements (``valid_seen``); no problem text appears in two splits.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
# the receptacle that changes the object's state, and the predicate the goal asks for
APPLIANCES = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}
LAMPS = ("DeskLamp", "FloorLamp")
LAMP_HOSTS = ("Desk", "SideTable", "Dresser", "Shelf", "DiningTable", "CoffeeTable")
# AI2-THOR floor plans: 1-30 kitchens, 201-230 living rooms, 301-330 bedrooms, 401-430 bathrooms
ROOMS = {
    "Kitchen": range(1, 31),
    "LivingRoom": range(201, 231),
    "Bedroom": range(301, 331),
    "Bathroom": range(401, 431),
}
GENERATOR_VERSION = 1  # part of the cache key: bump when generated problems change


def floor_plan_split(number: int) -> str:
    """Every fifth floor plan of each room kind (5, 10, ..., 205, ...) is the test split's: never trained on."""
    return "test" if number % 5 == 0 else "train"


@cache
def wheel() -> dict:
    """What the ``alfworld`` wheel provides: the domain, the grammar, the layouts folder and ALFRED's tables.

    Its modules are loaded from their files: importing the ``alfworld`` package itself creates ``~/.cache/alfworld``
    and sets ``$ALFWORLD_DATA`` to it, which would then read as official data being present."""
    spec = importlib.util.find_spec("alfworld")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("ALFWorld needs the alfworld package: pip install --no-deps alfworld==0.4.2")
    root = Path(spec.submodule_search_locations[0])

    def load(relative: str, name: str):
        module_spec = importlib.util.spec_from_file_location(name, root / relative)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module

    return {
        "domain": (root / "data" / "alfred.pddl").read_text(),
        "grammar": (root / "data" / "alfred.twl2").read_text(),
        "layouts": root / "gen" / "layouts",
        "constants": load("gen/constants.py", "_alfworld_constants"),
        "goals": load("gen/goal_library.py", "_alfworld_goal_library").gdict,
    }


def mangle(thor_id: str) -> str:
    """A THOR id as a PDDL name, as ALFRED writes them (``Cabinet|+00.68`` -> ``Cabinet_bar__plus_00_dot_68``)."""
    for old, new in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        thor_id = thor_id.replace(old, new)
    return thor_id


def thor_type(thor_id: str) -> str:
    """``Cabinet|...`` -> ``Cabinet``; a sink's or bathtub's basin (``Sink|...|SinkBasin``) is its basin type."""
    parts = thor_id.split("|")
    return parts[-1] if len(parts) > 1 and parts[-1].isalpha() else parts[0]


@dataclass
class Problem:
    """One generated game: a room, its objects and the goal. Ids are THOR ids (mangled when written)."""

    name: str
    layout: str
    task_type: str
    object_target: str
    parent_target: str
    toggle_target: str = ""
    receptacles: list[str] = field(default_factory=list)
    objects: dict[str, str] = field(default_factory=dict)  # object id -> the receptacle id it starts in
    description: str = ""

    def goal(self) -> dict:
        """The goal as ALFRED's ``pddl_params`` name it (official games read it from ``traj_data.json``)."""
        return {
            "task_type": self.task_type,
            "object_target": self.object_target,
            "parent_target": self.parent_target,
            "toggle_target": self.toggle_target,
        }


def to_pddl(problem: Problem) -> str:
    """The PDDL problem text of ``problem`` for the ALFRED domain."""
    c = wheel()["constants"]
    receptacles = {mangle(r): thor_type(r) for r in problem.receptacles}
    objects = {mangle(o): thor_type(o) for o in problem.objects}
    locations = {r: f"loc_bar_{i}" for i, r in enumerate(receptacles)}
    rtypes = sorted(set(receptacles.values()))
    otypes = sorted(set(objects.values()))
    init = ["(atLocation agent1 loc_bar_start)"]
    for r, rtype in receptacles.items():
        init += [f"(receptacleAtLocation {r} {locations[r]})", f"(receptacleType {r} {rtype}Type)"]
        if rtype in c.OPENABLE_CLASS_SET:
            init.append(f"(openable {r})")
    for thor_id, parent in problem.objects.items():
        o, r, otype = mangle(thor_id), mangle(parent), thor_type(thor_id)
        init += [f"(inReceptacle {o} {r})", f"(objectAtLocation {o} {locations[r]})", f"(objectType {o} {otype}Type)"]
        if otype in LAMPS:
            init.append(f"(toggleable {o})")
        else:
            init.append(f"(pickupable {o})")
        for prop, predicate in (("Heatable", "heatable"), ("Coolable", "coolable"), ("Cleanable", "cleanable")):
            if otype in c.VAL_ACTION_OBJECTS[prop]:
                init.append(f"({predicate} {o})")
    for rtype in rtypes:
        init += [f"(canContain {rtype}Type {o}Type)" for o in otypes if o in c.VAL_RECEPTACLE_OBJECTS.get(rtype, ())]
    goal = wheel()["goals"][problem.task_type]["pddl"].format(
        obj=problem.object_target, recep=problem.parent_target, toggle=problem.toggle_target
    )
    goal = goal.replace("#", "-")  # ALFRED's templates write types as `?r # receptacle`
    lines = [
        f"(define (problem {problem.name})",
        "(:domain alfred)",
        "(:objects",
        "    agent1 - agent",
        *(f"    {t}Type - otype" for t in otypes),
        *(f"    {t}Type - rtype" for t in rtypes),
        "    loc_bar_start - location",
        *(f"    {loc} - location" for loc in locations.values()),
        *(f"    {r} - receptacle" for r in receptacles),
        *(f"    {o} - object" for o in objects),
        ")",
        "(:init",
        *(f"    {fact}" for fact in init),
        ")",
        goal.strip(),  # closes the define, as ALFRED's goal templates do
    ]
    return "\n".join(lines) + "\n"


def game_data(problem: Problem, walkthrough: list[str] | None = None) -> dict:
    """The ``game.tw-pddl`` JSON of ``problem`` (the official files' keys, plus ``goal`` and ``layout``)."""
    w = wheel()
    return {
        "pddl_domain": w["domain"],
        "grammar": w["grammar"].replace("UNKNOWN GOAL", problem.description),
        "pddl_problem": to_pddl(problem),
        "solvable": walkthrough is not None,
        "walkthrough": walkthrough,
        "goal": problem.goal(),
        "layout": problem.layout,
    }


# -- layouts ------------------------------------------------------------------------------------------------
@cache
def layout(number: int) -> tuple[tuple[str, ...], frozenset[str]]:
    """(receptacle ids, object types) of floor plan ``number``; receptacles of kinds the domain places things in."""
    c = wheel()["constants"]
    folder = wheel()["layouts"]
    static = set(c.RECEPTACLES) - set(c.MOVABLE_RECEPTACLES)
    receptacles = json.loads((folder / f"FloorPlan{number}-openable.json").read_text())
    kinds = json.loads((folder / f"FloorPlan{number}-objects.json").read_text())
    return tuple(sorted(r for r in receptacles if thor_type(r) in static)), frozenset(kinds)


def portable_types() -> frozenset[str]:
    """Object types that something can hold (ALFRED's pickupable things), movable receptacles (mugs, pans) included."""
    c = wheel()["constants"]
    static = set(c.RECEPTACLES) - set(c.MOVABLE_RECEPTACLES)
    held = set().union(*c.VAL_RECEPTACLE_OBJECTS.values())
    return frozenset(t for t in held if t in c.OBJECTS and t not in static and "Sliced" not in t)


def floor_plans(task_type: str, split: str) -> list[int]:
    valid_rooms = wheel()["constants"].GOALS_VALID[task_type]
    numbers = [n for room in sorted(valid_rooms) for n in ROOMS[room]]
    wanted = "test" if split == "test" else "train"
    return [n for n in numbers if floor_plan_split(n) == wanted]


def _object_id(kind: str, rng: random.Random) -> str:
    """A THOR-like object id: the type and a position (objects have no layout entry of their own)."""
    x, y, z = (rng.uniform(-3, 3) for _ in range(3))
    return f"{kind}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"


def draw_problem(task_type: str, number: int, rng: random.Random, max_receptacles: int, name: str) -> Problem | None:
    """A random problem of ``task_type`` in floor plan ``number``, or None when the room cannot host one."""
    c = wheel()["constants"]
    room, kinds = layout(number)
    if not room:
        return None
    holds = c.VAL_RECEPTACLE_OBJECTS
    present = sorted(kinds & portable_types())
    room_types = {thor_type(r) for r in room}
    appliance, prop = APPLIANCES.get(task_type, ("", ""))
    if appliance and appliance not in room_types:
        return None
    targets = [t for t in present if not prop or t in c.VAL_ACTION_OBJECTS[prop]]
    if task_type == "look_at_obj_in_light":
        lamps = sorted(kinds & set(LAMPS))
        hosts = [r for r in room if thor_type(r) in LAMP_HOSTS]
        if not lamps or not hosts:
            return None
    rng.shuffle(targets)
    for obj in targets:
        # where the object may end up (the goal's receptacle type) and where it may start (anywhere else that holds it)
        parents = sorted({t for t in room_types if obj in holds.get(t, ()) and t != appliance})
        if task_type == "look_at_obj_in_light":
            parents = [""]  # no receptacle in the goal
        rng.shuffle(parents)
        for parent in parents:
            sources = [r for r in room if obj in holds.get(thor_type(r), ()) and thor_type(r) != parent]
            if sources:
                break
        else:
            continue
        break
    else:
        return None
    chosen: list[str] = []

    def use(r: str) -> None:
        if r not in chosen:
            chosen.append(r)

    toggle = ""
    objects: dict[str, str] = {}
    if task_type == "look_at_obj_in_light":
        toggle = rng.choice(lamps)
        host = rng.choice(hosts)
        use(host)
        objects[_object_id(toggle, rng)] = host
    else:
        goal_receptacles = [r for r in room if thor_type(r) == parent]
        for r in rng.sample(goal_receptacles, k=min(2, len(goal_receptacles))):
            use(r)
    if appliance:
        use(rng.choice([r for r in room if thor_type(r) == appliance]))
    n_targets = (2 if task_type == "pick_two_obj_and_place" else 1) + (rng.random() < 0.3)
    for _ in range(n_targets):
        source = rng.choice(sources)
        use(source)
        objects[_object_id(obj, rng)] = source
    others = [r for r in room if r not in chosen]
    rng.shuffle(others)
    for r in others[: max(0, max_receptacles - len(chosen))]:
        use(r)
    if len(chosen) > max_receptacles:
        return None
    # distractors: other things of the room, each where something of its kind may be
    distractors = [t for t in present if t != obj]
    for kind in rng.sample(distractors, k=min(len(distractors), rng.randint(2, 4))):
        spots = [r for r in chosen if kind in holds.get(thor_type(r), ()) and thor_type(r) != parent]
        if spots:
            objects[_object_id(kind, rng)] = rng.choice(spots)
    templates = wheel()["goals"][task_type]["templates"]
    description = rng.choice(templates).format(obj=obj.lower(), recep=parent.lower(), toggle=toggle.lower())
    # the room lists receptacles in id order (as ALFWorld's), so no position gives the goal away
    return Problem(name, f"FloorPlan{number}", task_type, obj, parent, toggle, sorted(chosen), objects, description)


# -- game sets -----------------------------------------------------------------------------------------------
def problem_hash(problem_text: str) -> str:
    """What makes two problems the same: the text without the problem's name."""
    body = re.sub(r"\(define \(problem [^)]*\)", "", problem_text)
    return hashlib.sha1(body.encode()).hexdigest()


def default_games_dir(settings: dict) -> Path:
    """``$REFLECT_RL_CACHE/alfworld/games-<hash of the settings>`` (``~/.cache/reflect_rl`` without the variable)."""
    key = hashlib.sha1(json.dumps([GENERATOR_VERSION, settings], sort_keys=True).encode()).hexdigest()[:12]
    root = os.path.expanduser(os.environ.get("REFLECT_RL_CACHE") or "~/.cache/reflect_rl")
    return Path(root) / "alfworld" / f"games-{key}"


def generate_games(
    folder: str | Path,
    task_types: tuple[str, ...] = TASK_TYPES,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    max_receptacles: int = 8,
    engine_timeout: float = 60.0,
) -> dict[str, list[Path]]:
    """Write verified games to ``folder/<split>/<task_type>/<i>/game.tw-pddl``; returns split -> game files.

    ``counts`` is games per task type per split (default train 40, validation 10, test 10). Folders written
    before with the same settings are reused (``folder/manifest.json``); a different setting rewrites them.
    """
    counts = counts or {"train": 40, "validation": 10, "test": 10}
    folder = Path(folder)
    settings = {
        "version": GENERATOR_VERSION,
        "task_types": list(task_types),
        "counts": counts,
        "seed": seed,
        "max_receptacles": max_receptacles,
    }
    manifest = folder / "manifest.json"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one generator per folder; the others wait and then reuse its games
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            if saved.get("settings") == settings:
                return {split: [folder / p for p in paths] for split, paths in saved["games"].items()}
        return _generate(folder, settings, task_types, counts, seed, max_receptacles, engine_timeout)


def _generate(folder, settings, task_types, counts, seed, max_receptacles, engine_timeout) -> dict[str, list[Path]]:
    from tqdm import tqdm

    from envs.alfworld.engine import Engine
    from envs.alfworld.expert import play_expert

    manifest = folder / "manifest.json"
    bar = tqdm(total=sum(counts.get(s, 0) for s in ("train", "validation", "test")) * len(task_types))
    bar.set_description(f"generating ALFWorld games in {folder}")
    games: dict[str, list[str]] = {}
    seen: set[str] = set()
    engine = Engine(timeout=engine_timeout)
    try:
        for split in ("train", "validation", "test"):  # train first: the other splits never repeat its problems
            games[split] = []
            for task_type in task_types:
                plans = floor_plans(task_type, split)
                made, attempt = 0, 0
                while made < counts.get(split, 0):
                    attempt += 1
                    if attempt > 50 * counts[split] + 200:
                        raise RuntimeError(f"could not generate {counts[split]} {split} {task_type} problems")
                    rng = random.Random(f"{seed}/{split}/{task_type}/{attempt}")
                    name = f"{split}_{task_type}_{made}"
                    problem = draw_problem(task_type, rng.choice(plans), rng, max_receptacles, name)
                    if problem is None:
                        continue
                    key = problem_hash(to_pddl(problem))
                    if key in seen:
                        continue
                    path = folder / split / task_type / str(made) / "game.tw-pddl"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(game_data(problem)))
                    walkthrough = play_expert(engine, path, problem.goal(), max_steps=50)
                    if walkthrough is None:  # not solvable as drawn: draw again
                        continue
                    path.write_text(json.dumps(game_data(problem, walkthrough)))
                    seen.add(key)
                    games[split].append(str(path.relative_to(folder)))
                    made += 1
                    bar.update(1)
    finally:
        engine.close()
        bar.close()
    tmp = manifest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"settings": settings, "games": games}, indent=1))
    tmp.replace(manifest)
    return {split: [folder / p for p in paths] for split, paths in games.items()}
