"""The layering stated in peftlab/__init__.py: no module imports one on a higher floor (imports inside functions
included), no peftlab import hides inside a function, and the light floor never imports torch or transformers."""

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import peftlab

SOURCE = Path(peftlab.__file__).parent

# floor -> module patterns, from the bottom (see peftlab/__init__.py); the first matching floor counts.
FLOORS = {
    1: ["peftlab", "peftlab.errors", "peftlab.fileio", "peftlab.settings", "peftlab.sampling", "peftlab.catalog",
        "peftlab.data", "peftlab.data.*", "peftlab.recipes", "peftlab.config", "peftlab.options",
        "peftlab.workloads", "peftlab.workloads.registry", "peftlab.workloads.*.templates",
        "peftlab.workloads.*.command_line", "peftlab.workloads.*.*settings"],
    5: ["peftlab.commands", "peftlab.commands.*"],
    4: ["peftlab.train", "peftlab.predict"],
    3: ["peftlab.workloads.base", "peftlab.workloads.loading", "peftlab.workloads.*.*"],
    6: ["peftlab.cli", "peftlab.__main__"],
    2: ["peftlab.*"],
}
SPEC_PACKAGES = "peftlab.workloads.*"  # a workload's light package (its spec): floor 1


def module_names() -> dict[str, Path]:
    names = {}
    for path in SOURCE.rglob("*.py"):
        parts = ("peftlab",) + path.relative_to(SOURCE).with_suffix("").parts
        names[".".join(parts).removesuffix(".__init__")] = path
    return names


def floor(module: str, path: Path) -> int:
    if path.name == "__init__.py" and fnmatch.fnmatch(module, SPEC_PACKAGES) and module.count(".") == 2:
        return 1
    for level, patterns in FLOORS.items():
        if any(fnmatch.fnmatch(module, pattern) for pattern in patterns):
            return level
    raise AssertionError(f"{module} is on no floor")


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported peftlab module, inside a function?) for every import statement of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.append((target, id(node) in in_function))
    return found


def test_no_module_imports_a_higher_floor_or_hides_an_import_in_a_function():
    known = module_names()
    upward, hidden = [], []
    for module, path in known.items():
        for target, inside in imports(path, known):
            if target == module or module.startswith(target + ".") and known[target].name == "__init__.py":
                continue  # itself, or its own package
            if floor(target, known[target]) > floor(module, path):
                upward.append(f"{module} (floor {floor(module, path)}) -> {target} (floor {floor(target, known[target])})")
            if inside:
                hidden.append(f"{module} -> {target}")
    assert not upward
    assert not hidden


def test_the_floors_are_not_vacuous():
    known = module_names()
    floors = {module: floor(module, path) for module, path in known.items()}
    assert floors["peftlab.workloads.instruct"] == 1 and floors["peftlab.workloads.instruct.workload"] == 3
    assert floors["peftlab.train"] == 4 and floors["peftlab.commands.sweep"] == 5 and floors["peftlab.cli"] == 6
    assert floors["peftlab.commands.distill"] == 5 and floors["peftlab.engine"] == 2
    assert {1, 2, 3, 4, 5, 6} == set(floors.values())


def test_the_light_floor_and_the_command_line_import_neither_torch_nor_transformers():
    light = [module for module, path in module_names().items() if floor(module, path) == 1] + ["peftlab.cli"]
    code = ("import sys\n" + "".join(f"import {module}\n" for module in light) +
            "from peftlab.cli import _build_parser\n_build_parser()\n"
            "print(sorted(name for name in ('torch', 'transformers', 'accelerate', 'matplotlib') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
