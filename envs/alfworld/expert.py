"""ALFWorld's expert: the next command towards the goal, read off the engine's facts.

A goal-directed policy over the PDDL state (the same facts for generated and official games), not a search:
fetch a target object (go to its receptacle, open it if closed, take it), change its state where the task asks
(heat with a microwave, cool with a fridge, clean with a sink basin), then go to the goal's receptacle, open it
and put the object there; ``pick_two_obj_and_place`` does it twice into the same receptacle, and
``look_at_obj_in_light`` carries the object to the lamp and turns it on. From any state, after any detour, it
plans afresh: something else in the hands is put down where it fits first; a target in the goal's receptacle that
lacks the state the task asks for is taken out again. It wins every generated problem (tested), which is how the
generator verifies them; :func:`plan_text` is its plan in words, for rule-based reflections.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

LOOK = "look_at_obj_in_light"
PICK_TWO = "pick_two_obj_and_place"
# task type -> (the receptacle type that changes the object, the fact it sets, the verb of the command)
CHANGES = {
    "pick_clean_then_place_in_recep": ("sinkbasin", "isclean", "clean"),
    "pick_heat_then_place_in_recep": ("microwave", "ishot", "heat"),
    "pick_cool_then_place_in_recep": ("fridge", "iscool", "cool"),
}


class World:
    """The facts of one engine state, indexed (all names lowercase, types without their ``type`` suffix)."""

    def __init__(self, state: dict):
        self.names = state["names"]
        self.admissible = list(state["admissible_commands"])
        self.at = None
        self.held = None
        self.location: dict[str, str] = {}  # receptacle -> location
        self.inside: dict[str, str] = {}  # object -> receptacle
        self.otype: dict[str, str] = {}
        self.rtype: dict[str, str] = {}
        self.flags: dict[str, set[str]] = defaultdict(set)
        self.contain: set[tuple[str, str]] = set()
        for name, *args in state["facts"]:
            if name == "atlocation":
                self.at = args[1]
            elif name == "holds":
                self.held = args[1]
            elif name == "receptacleatlocation":
                self.location[args[0]] = args[1]
            elif name == "inreceptacle":
                self.inside[args[0]] = args[1]
            elif name == "objecttype":
                self.otype[args[0]] = args[1].removesuffix("type")
            elif name == "receptacletype":
                self.rtype[args[0]] = args[1].removesuffix("type")
            elif name == "cancontain":
                self.contain.add((args[0].removesuffix("type"), args[1].removesuffix("type")))
            elif len(args) == 1:  # openable, opened, isclean, ishot, iscool, istoggled, ...
                self.flags[args[0]].add(name)
        self.receptacles = sorted(self.rtype)

    def name(self, entity: str) -> str:
        return self.names.get(entity, entity)

    def here(self, receptacle: str) -> bool:
        return self.location.get(receptacle) == self.at

    def goto(self, receptacle: str) -> str:
        command = f"go to {self.name(receptacle)}"
        if command in self.admissible:
            return command
        # several receptacles at one location are listed in one command ("go to cabinet 1, and cabinet 2")
        for candidate in self.admissible:
            if candidate.startswith("go to ") and self.name(receptacle) in candidate:
                return candidate
        return command

    def reach(self, receptacle: str) -> str | None:
        """The command that gets the agent to ``receptacle`` with it open, or None when it is there already."""
        if not self.here(receptacle):
            return self.goto(receptacle)
        flags = self.flags[receptacle]
        if "openable" in flags and "opened" not in flags:
            return f"open {self.name(receptacle)}"
        return None

    def nearest(self, entities: list[str], where) -> str:
        """The first of ``entities`` whose receptacle (``where(e)``) is at the agent's location, else the first."""
        return next((e for e in entities if self.here(where(e))), entities[0])


def expert_command(state: dict, goal: dict) -> str | None:
    """The expert's next command in ``state`` (an engine state with ``facts``) for ``goal`` (ALFRED's
    ``pddl_params``: task_type, object_target, parent_target, toggle_target); None if it sees no way."""
    w = World(state)
    task = goal["task_type"]
    obj = goal["object_target"].lower()
    parent = goal.get("parent_target", "").lower()
    objects = sorted(o for o in w.otype if o not in w.rtype)

    def fetch(candidates: list[str]) -> str | None:
        candidates = [o for o in candidates if o in w.inside]
        if not candidates:
            return None
        target = w.nearest(candidates, lambda o: w.inside[o])
        receptacle = w.inside[target]
        return w.reach(receptacle) or f"take {w.name(target)} from {w.name(receptacle)}"

    def put_down(thing: str, avoid: str = "") -> str | None:
        spots = [r for r in w.receptacles if (w.rtype[r], w.otype.get(thing, "")) in w.contain and w.rtype[r] != avoid]
        if not spots:
            return None
        spot = w.nearest(spots, lambda r: r)
        return w.reach(spot) or f"move {w.name(thing)} to {w.name(spot)}"

    if task == LOOK:
        toggle = goal.get("toggle_target", "").lower()
        lamps = [o for o in objects if w.otype[o] == toggle and o in w.inside]
        if w.held is not None and w.otype.get(w.held) == obj:
            if not lamps:
                return None
            lamp = w.nearest(lamps, lambda o: w.inside[o])
            if not w.here(w.inside[lamp]):
                return w.goto(w.inside[lamp])
            return f"use {w.name(lamp)}"
        if w.held is not None:
            return put_down(w.held)
        return fetch([o for o in objects if w.otype[o] == obj])

    change = CHANGES.get(task)

    def done(o: str) -> bool:
        return w.otype.get(o) == obj and (change is None or change[1] in w.flags[o])

    destinations = [r for r in w.receptacles if w.rtype[r] == parent]
    if not destinations:
        return None
    # the destination already holding the most finished targets (pick_two needs both in one receptacle)
    placed = {r: sum(done(o) and w.inside.get(o) == r for o in objects) for r in destinations}
    dest = max(destinations, key=lambda r: placed[r])
    if w.held is not None:
        if w.otype.get(w.held) != obj:
            return put_down(w.held, avoid=parent)
        if change is not None and not done(w.held):
            appliances = [r for r in w.receptacles if w.rtype[r] == change[0]]
            if not appliances:
                return None
            appliance = w.nearest(appliances, lambda r: r)
            if not w.here(appliance):
                return w.goto(appliance)
            return f"{change[2]} {w.name(w.held)} with {w.name(appliance)}"
        return w.reach(dest) or f"move {w.name(w.held)} to {w.name(dest)}"
    return fetch([o for o in objects if w.otype[o] == obj and not (done(o) and w.inside.get(o) == dest)])


def plan_text(state: dict, goal: dict) -> str:
    """What the expert is doing now, in words: the rule-based reflection's plan."""
    w = World(state)
    command = expert_command(state, goal)
    obj = goal["object_target"].lower()
    if command is None:
        return "I do not see how to reach the goal from here."
    holding = f"I hold the {w.name(w.held)}" if w.held is not None else "My hands are empty"
    if command.startswith(("take ", "open ")) or (command.startswith("go to ") and w.held is None):
        step = f"I need a {obj} first"
    elif w.held is not None and w.otype.get(w.held) != obj:
        step = f"the {w.name(w.held)} is not what the task asks for, so I put it down"
    elif command.startswith(("heat ", "cool ", "clean ")) or (command.startswith("go to ") and _needs_change(w, goal)):
        step = f"the {obj} must be {CHANGES[goal['task_type']][1][2:]} first"
    elif command.startswith("use "):
        step = f"I turn on the {goal.get('toggle_target', '').lower()} to look at the {obj}"
    else:
        where = goal.get("parent_target", "") or goal.get("toggle_target", "")
        step = f"I bring the {obj} to the {where.lower()}"
    return f"{holding}; {step}. Best next command: {command}."


def _needs_change(w: World, goal: dict) -> bool:
    change = CHANGES.get(goal["task_type"])
    return change is not None and w.held is not None and change[1] not in w.flags[w.held]


def play_expert(engine, path: str | Path, goal: dict, max_steps: int = 50) -> list[str] | None:
    """Play the game at ``path`` with the expert through ``engine``; its commands if it wins, else None."""
    from envs.alfworld.engine import EngineFault

    try:
        state = engine.load(str(path))
        commands = []
        while not state["won"] and len(commands) < max_steps:
            command = expert_command(state, goal)
            if command is None or command not in state["admissible_commands"]:
                return None
            commands.append(command)
            state = engine.step(command)
    except EngineFault:
        return None
    return commands if state["won"] else None
