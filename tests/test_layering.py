"""The package's boundaries: no module reaches into another's private names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bases whose private attributes are someone else's business (the standard library's).
FOREIGN = {"os", "sys", "argparse", "multiprocessing.util"}


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ci_jax"):
            found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}"
                      for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base not in ("self", "cls") and base not in FOREIGN:
                found.append(f"{path.name}:{node.lineno} {base}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    paths = sorted((ROOT / "ci_jax").rglob("*.py")) + sorted((ROOT / "experiments").glob("*.py"))
    found = [use for p in paths for use in _private_uses(p)]
    assert not found, found


def test_the_check_sees_both_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ci_jax.train import _str_keys\nfrom ci_jax import experiment\nexperiment._view(1)\n"
                   "t._train_step\nself._ok\nos._exit(0)\n")
    assert sorted(_private_uses(bad)) == ["bad.py:1 from ci_jax.train import _str_keys", "bad.py:3 experiment._view",
                                  "bad.py:4 t._train_step"]
