"""The code's shape, as the project keeps it: short functions and classes, args never changed
after parsing, and each registry (architectures, kinds of data) complete where it is declared."""

import ast

import pytest
from conftest import REPO

from custom_llm import data, gguf_keys
from custom_llm.architectures import ARCHITECTURES

SOURCES = sorted(list(REPO.glob("*.py")) + list((REPO / "custom_llm").glob("*.py")))
LONGEST_FUNCTION, LONGEST_CLASS = 60, 200


def definitions():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield path, node


def test_the_sources_are_found():
    names = {path.name for path in SOURCES}
    assert {"train_llm.py", "llm_model.py", "start.py", "model.py", "gpt2.py"} <= names


def test_no_function_over_60_lines_and_no_class_over_200():
    too_long = []
    for path, node in definitions():
        limit = LONGEST_CLASS if isinstance(node, ast.ClassDef) else LONGEST_FUNCTION
        lines = node.end_lineno - node.lineno + 1
        if lines > limit:
            too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long


def test_args_are_never_changed_after_parsing():
    """No `args.name = ...` and no setattr(args, ...) outside the parser itself (cli.py)."""
    changed = []
    for path in SOURCES:
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                        and target.value.id == "args":
                    changed.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and \
                    isinstance(node.args[0], ast.Name) and node.args[0].id == "args":
                changed.append(f"{path.name}:{node.lineno}")
    assert not changed


def test_every_architecture_is_readable_by_inference():
    """inference_gguf.py (no torch) checks a GGUF's architecture against gguf_keys' list: it must
    name every architecture module's GGUF architecture, and nothing else."""
    assert set(gguf_keys.READABLE_ARCHITECTURES) == {module.GGUF_ARCH for module in ARCHITECTURES.values()}


@pytest.mark.parametrize("module", list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def test_every_architecture_module_has_the_whole_interface(module):
    for name in ("NAME", "GGUF_ARCH", "Model", "count_parameters", "hf_model", "add_gguf_model"):
        assert hasattr(module, name), name


def test_every_kind_of_data_has_the_whole_interface_and_text_comes_last():
    kinds = data.kinds()
    for kind in kinds:
        for name in ("claims", "prepare", "held_out"):
            assert callable(getattr(kind, name)), (kind.__name__, name)
    assert kinds[-1].__name__.endswith("text_data")
