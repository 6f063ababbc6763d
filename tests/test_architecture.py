"""The structure docs/design.md describes, checked from the source (ast, nothing imported):
no import cycle among the project's modules, imports at module level only (a short list of
optional or heavy dependencies aside), at most 7 parameters per function, and the two
scripts short enough to read."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# imports allowed inside a function: optional or heavy dependencies, loaded only when asked,
# by module name (a name allows its submodules too): TensorBoard (optional, --report_to tensorboard),
# gguf (read only for a .gguf --lm_path; a GPU machine may lack it), datasets (read only for Hub or
# parquet WikiText; slow to import, so a script that needs no such data does not pay for it) and peft
# (only for LoRA adapters, docmem/baselines/lora_memory.py; slow to import as well). foundations/
# load.py finds optional HTTP libraries with importlib.
LAZY_IMPORTS_ALLOWED: set[str] = {"torch.utils.tensorboard", "gguf", "datasets", "peft"}


def allowed_lazily(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in LAZY_IMPORTS_ALLOWED)
MAX_PARAMETERS = 7
MAX_LINES = {"train_guidance.py": 300, "evaluate_memory.py": 200}


def project_files() -> dict[str, Path]:
    """module name -> file, for every project module outside tests/ and hidden folders."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] == "tests" or any(p.startswith(".") for p in parts):
            continue
        name = ".".join(parts)[: -len(".py")].removesuffix(".__init__")
        found[name] = path
    return found


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, Path]) -> list[str]:
    """The project modules an import statement names (`from pkg import mod` names pkg.mod)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
    base = node.module or ""
    if node.level:
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    out = []
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            out.append(f"{base}.{alias.name}")
        elif base in modules:
            out.append(base)
    return out


def parsed() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in project_files().items()}


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(module, function) for every function and method of the project."""
    return [(name, node) for name, tree in parsed().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_import_cycles():
    modules = project_files()
    graph = {name: set() for name in modules}
    for name, tree in parsed().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(m for m in imported_modules(node, name, modules) if m != name)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "train_guidance" not in graph["evaluate_memory"] and "evaluate_memory" not in graph["train_guidance"]


# The rooms of the house, each on a floor: a module imports only from its own room or a lower floor,
# so no capability reaches up, and two rooms on one floor never import each other. The core floor
# is the user's flat modules (foundations/, utils.py, wikitext.py, document_memories.py, hook_lm.py)
# and docmem's top-level modules; the scripts and the benchmarks sit on top.
CAPABILITIES = ("training", "forgetting", "baselines", "pictures", "evaluation")
FLOORS = {"core": 0, "docmem.pictures": 1, "docmem.baselines": 1, "docmem.evaluation": 2, "docmem.training": 2,
          "docmem.forgetting": 3, "scripts": 4, "benchmarks": 5}
CORE_ROOT_MODULES = {"foundations", "utils", "wikitext", "document_memories", "hook_lm"}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "docmem":
        return f"docmem.{parts[1]}" if len(parts) > 2 and parts[1] in CAPABILITIES else "core"
    if parts[0] in CORE_ROOT_MODULES:
        return "core"
    return "benchmarks" if parts[0] == "benchmarks" else "scripts"


def arrows_up() -> list[str]:
    modules = project_files()
    wrong = []
    for name, tree in parsed().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(node, name, modules):
                    here, there = room(name), room(target)
                    if here != there and FLOORS[there] >= FLOORS[here]:
                        wrong.append(f"{name} ({here}, floor {FLOORS[here]}) imports {target} ({there}, floor "
                                     f"{FLOORS[there]})")
    return wrong


def test_every_capability_is_a_room():
    for capability in CAPABILITIES:
        assert (ROOT / "docmem" / capability / "__init__.py").is_file(), capability
    loose = {p.stem for p in (ROOT / "docmem").glob("*.py")} & set(CAPABILITIES)
    assert not loose, f"a module named like a room: {loose}"


def test_no_arrow_runs_up_or_sideways():
    wrong = arrows_up()
    assert not wrong, "imports from a higher floor or a sibling room:\n" + "\n".join(wrong)


def test_a_room_check_would_see_an_arrow_up():
    """The floors order the rooms (guards the test itself)."""
    assert room("docmem.training.run_state") == "docmem.training" and room("docmem.engines") == "core"
    assert room("utils") == "core" and room("forget") == "scripts"
    assert FLOORS[room("docmem.forgetting.edits")] > FLOORS[room("docmem.evaluation.ce_table")]
    assert FLOORS[room("docmem.training.key_ce")] == FLOORS[room("docmem.evaluation.ce_table")]


def test_imports_at_module_level_only():
    lazy = []
    for name, func in functions():
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                named = ["." * node.level + (node.module or "")]
            else:
                continue
            if not all(allowed_lazily(module) for module in named):
                lazy.append(f"{name}:{node.lineno} in {func.name}(): {ast.unparse(node)}")
    assert not lazy, "imports inside functions:\n" + "\n".join(lazy)


def test_at_most_seven_parameters():
    wide = []
    for name, func in functions():
        a = func.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [p for p in (a.vararg, a.kwarg) if p]
        if params and params[0].arg in ("self", "cls"):
            params = params[1:]
        if len(params) > MAX_PARAMETERS:
            wide.append(f"{name}:{func.lineno} {func.name}() takes {len(params)}")
    assert not wide, "functions with more than 7 parameters (bundle them in a dataclass):\n" + "\n".join(wide)


def test_scripts_stay_short():
    for script, limit in MAX_LINES.items():
        lines = len((ROOT / script).read_text().splitlines())
        assert lines < limit, f"{script} has {lines} lines (limit {limit}): move the parts into docmem/"


def test_a_cycle_would_be_found(tmp_path):
    """The graph walk sees relative and from-package imports (guards the test itself)."""
    modules = {"pkg": tmp_path / "__init__.py", "pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    tree = ast.parse("from . import b\nfrom pkg.a import x\nimport pkg.b")
    assert [imported_modules(n, "pkg.a", modules) for n in tree.body] == [["pkg.b"], ["pkg.a"], ["pkg.b"]]
