"""The house rules of docs/architecture.md, enforced: a room imports only rooms on lower floors (train/ and eval/ are
siblings, as are method/ and models/), no module-level import cycle, and one door to Ray."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
from repo import PACKAGE


# floor of each room (a top-level module or sub-package of dmvae_scale); higher imports lower, never the reverse
FLOORS = {
    "cli": 8, "demo": 8, "__main__": 8,
    "scaling": 7,
    "pipeline": 6,
    "train": 5, "eval": 5,
    "distributed": 4,
    "data": 3,
    "method": 2, "models": 2,
    "config": 1, "artifacts": 1, "errors": 1, "localhost": 1, "seeds": 1, "batch_keys": 1, "private_cache": 1,
    "log": 1,
    "": 0,  # dmvae_scale/__init__.py
}
SIBLINGS = [{"train", "eval"}, {"method", "models"}]  # same floor, and neither imports the other


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every dmvae_scale import in a file."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # an `if TYPE_CHECKING:` or try/except block at module level is module level too
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        targets = [t for t in targets if t == "dmvae_scale" or t.startswith("dmvae_scale.")]
        found += [(t, node.lineno, id(node) in top) for t in targets]
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.unit
def test_every_room_has_a_floor():
    rooms = {_room(m) for m in _modules()}
    assert rooms <= set(FLOORS), f"rooms without a floor in this test and docs/architecture.md: {rooms - set(FLOORS)}"


@pytest.mark.unit
def test_no_import_runs_up_the_floors_or_between_siblings():
    modules = _modules()
    wrong: list[str] = []
    for name, path in modules.items():
        here = _room(name)
        for target, line, _ in _imports(path):
            if target not in modules and target.rsplit(".", 1)[0] in modules:
                target = target.rsplit(".", 1)[0]  # `from pkg import name` where name is not a module
            there = _room(target)
            if there in (here, "") or target not in modules:
                continue
            if FLOORS[there] > FLOORS[here] or {here, there} in SIBLINGS:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} {here}/ (floor {FLOORS[here]}) imports "
                             f"{target} ({there}/, floor {FLOORS[there]})")
    assert not wrong, "imports up the floors or between siblings:\n" + "\n".join(sorted(set(wrong)))


@pytest.mark.unit
def test_no_module_level_import_cycle():
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target, _, top in _imports(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if top and target != name and target in modules:
                graph[name].add(target)
    # a package's __init__ importing its own submodules is how packages re-export; only cycles through other
    # modules count
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if name_is_parent(nxt, node):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    def name_is_parent(a: str, b: str) -> bool:
        return b.startswith(a + ".")

    for node in sorted(modules):
        if node not in state:
            visit(node, [node])
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


@pytest.mark.unit
def test_ray_init_only_behind_the_one_door():
    door = PACKAGE / "distributed" / "ray_session.py"
    callers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
                callers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert callers and all(c.startswith(str(door.relative_to(PACKAGE.parent))) for c in callers), callers
