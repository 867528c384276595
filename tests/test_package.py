"""The package's shape: no import cycle between Argonne's modules, counting imports inside functions too."""

import ast
from pathlib import Path

import argonne
from argonne import loss_argonne, modeling_argonne

from .conftest import REPO

PACKAGE = Path(argonne.__file__).parent

SOURCE = REPO / "src"  # the package and the modules beside it (argonne_cli, argonne_options)


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of src/ it imports anywhere in its file. Importing the `argonne` package itself (to
    register the model with transformers) is left out: every submodule import runs it first anyway."""
    files = {module_name(path): path for path in SOURCE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets |= {module} | {f"{module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t in files and t not in (name, "argonne")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the path around it (depth-first search)."""
    found, done = [], set()

    def visit(module, path):
        if module in path:
            found.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert {"argonne.training.loop", "argonne.data.streaming", "argonne.loading"} <= set(graph)  # the walk found them
    assert "argonne.data.streaming" in graph["argonne.training.build"]  # and the imports, lazy ones too
    assert "argonne.cli" in graph["argonne_cli"]  # the command line reaches the commands, which never reach back
    assert not [name for name, targets in graph.items()
                if name.startswith("argonne.") and name != "argonne.__main__" and "argonne_cli" in targets]
    assert cycles(graph) == []


def test_a_cycle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def top_level_names(path: Path) -> set[str]:
    """Names a file defines at module level (functions, classes, assignments), imports left out."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def test_the_loss_lives_in_loss_argonne_and_the_model_file_keeps_no_loss_globals():
    loss_names = top_level_names(PACKAGE / "loss_argonne.py")
    assert {"LOSS_CHUNK_LOGITS", "LOSS_CHUNK_LOGITS_GPU", "LOSS_VOCAB_MULTIPLE_GPU", "linear_cross_entropy",
            "cross_entropy_chunk", "accumulate_matmul", "_compiled_chunk_loss", "_compiled_cross_entropy_chunk",
            "_fp32_accumulating_addmm"} <= loss_names
    model_names = top_level_names(PACKAGE / "modeling_argonne.py")
    assert not model_names & loss_names
    assert not [name for name in model_names if "LOSS" in name or "loss" in name]
    # The model reaches the loss only through the import (what OutputHead calls), so a patch of the loss module's
    # settings is seen by the model.
    assert modeling_argonne.linear_cross_entropy is loss_argonne.linear_cross_entropy
    assert not [name for name in vars(modeling_argonne) if name.startswith("LOSS_") or "cross_entropy_chunk" in name]
    for path in ("modeling_argonne.py", "loss_argonne.py"):
        source = (PACKAGE / path).read_text()
        assert "torch.distributed" not in source.split('"""', 2)[2], path  # no distributed code (docstring aside)
        imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)]
        assert all(node.level == 1 or not (node.module or "").startswith("argonne") for node in imports), path
