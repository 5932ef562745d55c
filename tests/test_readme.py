"""The README's promises: the loss example runs, and CI runs exactly the README's test command."""

import re
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_loss_example_runs_and_trains(capsys):
    """The example takes an optimizer step with a gradient for every parameter, and the step moves them."""
    (example,) = fenced_blocks("python")
    steps = []

    def before(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        steps.append({"params": params, "with_grad": [p.grad is not None for p in params]})
        steps[-1]["before"] = [p.detach().clone() for p in params]

    def after(optimizer, args, kwargs):
        steps[-1]["after"] = [p.detach().clone() for p in steps[-1]["params"]]

    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    try:
        namespace: dict = {}
        exec(compile(example, "README.md", "exec"), namespace)
    finally:
        for handle in handles:
            handle.remove()
    assert "ce_head4" in capsys.readouterr().out
    (step,) = steps
    assert len(step["params"]) == len(namespace["params"]) and all(step["with_grad"])
    assert all(not torch.equal(a, b) for a, b in zip(step["before"], step["after"]))
    assert all(p.grad is None for p in namespace["params"])  # zero_grad ran after the step


def test_ci_runs_the_readme_test_command():
    install, tests = fenced_blocks("bash")[0].strip().split(" && ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.replace("python -m pip install", "python -m pip install --quiet") in ci
    assert tests in ci
