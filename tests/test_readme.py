"""The README's promises: the loss example runs, and CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_loss_example_runs_and_trains(capsys):
    (example,) = fenced_blocks("python")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert "ce_head4" in capsys.readouterr().out
    assert all(p.grad is None for p in namespace["params"])  # zero_grad ran after a real step


def test_ci_runs_the_readme_test_command():
    install, tests = fenced_blocks("bash")[0].strip().split(" && ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.replace("python -m pip install", "python -m pip install --quiet") in ci
    assert tests in ci
