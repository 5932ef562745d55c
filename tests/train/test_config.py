import pytest

from wmtp_train.__main__ import build_parser, main, resolve_config
from wmtp_train.config import RECIPES, TrainConfig
from wmtp_train.config_files import build_config, load_config_file, load_recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipes_load_with_spec_defaults(recipe):
    cfg = load_recipe(recipe)
    assert cfg.recipe == recipe
    assert (cfg.td.beta, cfg.td.min_weight, cfg.td.max_weight, cfg.td.gamma) == (0.9, 0.1, 5.0, 1.0)
    assert cfg.stage2.max_grad_norm == 0.5
    assert cfg.stage2.clip_range == 0.2


def test_recipe_choices():
    assert load_recipe("baseline").stage2.weighting == "uniform"
    assert not load_recipe("baseline").stage1.enabled
    verifiable = load_recipe("verifiable")
    assert verifiable.stage1.enabled and verifiable.stage2.weighting == "td"
    assert verifiable.stage2.value_coef == 0.5
    assert verifiable.td.terminal == "last_transition"
    rho1 = load_recipe("rho1_weighted")
    assert rho1.stage2.weighting == "rho1" and rho1.rho1.top_k == 0.6


def test_set_overrides_convert_types():
    cfg = load_recipe(
        "baseline",
        ["stage2.lr=3e-4", "stage2.steps=7", "parallel.fsdp=false", "run.out_dir=x", "stage2.value_coef=1"],
    )
    assert cfg.stage2.lr == 3e-4 and isinstance(cfg.stage2.steps, int) and cfg.stage2.steps == 7
    assert cfg.parallel.fsdp is False and cfg.run.out_dir == "x"
    assert isinstance(cfg.stage2.value_coef, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage2.bogus=1", "unknown key"),
        ("nosection.lr=1", "unknown section"),
        ("stage2.lr=abc", "expected float"),
        ("stage2.steps=1.5", "expected int"),
        ("parallel.fsdp=maybe", "expected a bool"),
        ("stage2.weighting=magic", "stage2.weighting must be one of"),
        ("stage1.sampler=natural", "stage1.sampler must be one of"),
        ("td.terminal=first", r"\[td\] terminal must be one of"),
        ("td.gamma=1.5", "td.gamma must be in"),
        ("stage2.steps=0", "stage2.steps must be > 0"),
        ("td.min_weight=6", r"\[td\] need 0 <= min_weight <= max_weight"),
        ("rho1.top_k=1.5", "rho1.top_k"),
        ("numerics.inject_nan_steps=a,b", "inject_nan_steps"),
        ("stage2lr=1", "section.key=value"),
    ],
)
def test_bad_overrides_are_rejected(override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load_recipe("baseline", [override])


def test_file_type_errors_and_unknown_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[stage2]\nlr = "fast"\n')
    with pytest.raises(TypeError, match="stage2.lr: expected float"):
        load_config_file(bad)
    bad.write_text("[stage2]\nlearning_rate = 1.0\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_config_file(bad)
    bad.write_text("[extra]\nx = 1\n")
    with pytest.raises(ValueError, match="unknown config section"):
        load_config_file(bad)


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_recipe("verifiable", ["stage2.lr=1e-4", 'run.out_dir=a "quoted" dir'])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config_file(path) == cfg
    flat = cfg.flat()
    assert flat["stage2.lr"] == 1e-4 and flat["recipe"] == "verifiable"


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import wmtp_train.config as config_module

    tree = ast.parse(inspect.getsource(config_module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and node.name != "TrainConfig":
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    following = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant), (
                        f"{node.name}.{stmt.target.id} has no docstring"
                    )


def test_cli_flags_map_onto_config(capsys):
    args = build_parser().parse_args(
        [
            "--recipe",
            "rho1_weighted",
            "--preset",
            "micro",
            "--out",
            "o",
            "--max-steps",
            "3",
            "--data",
            "d.jsonl",
            "--debug",
        ]
    )
    cfg = resolve_config(args)
    assert (cfg.run.out_dir, cfg.run.max_steps, cfg.data.path) == ("o", 3, "d.jsonl")
    assert (
        cfg.numerics.check_finite and not resolve_config(build_parser().parse_args([])).numerics.check_finite
    )
    assert build_parser().parse_args(["--resume"]).resume == "latest"
    assert main(["--recipe", "baseline", "--set", "stage2.lr=5e-4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "lr = 0.0005" in printed and 'recipe = "baseline"' in printed
    assert main(["--recipe", "baseline", "--set", "stage2.lr=x", "--print-config"]) == 2


def test_defaults_construct():
    assert build_config({}) == TrainConfig()
