"""Every public top-level function of the packages is used somewhere besides its own definition."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wmtp_train", "wmtp_kernels")


def test_every_public_function_has_a_caller():
    sources = {path: path.read_text() for path in ROOT.rglob("*.py") if ".git" not in path.parts}
    texts = [*sources.values(), *(path.read_text() for path in ROOT.glob("*.md"))]
    unused = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.parse(sources[path]).body:
                if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                    uses = sum(len(re.findall(rf"\b{node.name}\b", text)) for text in texts)
                    if uses < 2:  # the definition itself
                        unused.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not unused, f"public functions without a caller: {unused}"
