"""Recipes from files, functions and `--set` overrides (keyeflow.training.recipe_source), and the CLI refusing
a bad one before anything runs. No training here: tests/flows/test_recipe_overrides.py trains with them."""

from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from keyeflow.cli import app
from keyeflow.training.posttrain_recipe import posttrain_recipe
from keyeflow.training.recipe_source import RecipeError, load_posttrain_recipe, load_pretrain_recipe
from keyeflow.training.recipes import pretrain_recipe


def test_builtin_without_overrides_is_the_builtin_recipe():
    # Same object values and hash: every step's cache key of an unchanged recipe stays what it was.
    assert load_pretrain_recipe("tiny") == pretrain_recipe("tiny")
    assert load_pretrain_recipe("tiny").config_hash() == pretrain_recipe("tiny").config_hash()
    assert load_posttrain_recipe("tiny").config_hash() == posttrain_recipe("tiny").config_hash()
    assert load_pretrain_recipe("tiny", init="/ckpt").init == "/ckpt"


def test_overrides_parse_by_the_field_type():
    r = load_pretrain_recipe(
        "tiny",
        [
            "stage2.learning_rate=1e-5",  # an alias of stages.2; a float from exponent notation
            "stages.1.max_steps=6",
            "stage3.bf16=false",
            "stage1.trainable=[projector, vision]",  # str | tuple: a list is the tuple
            "variants.video-rich.weight=3",  # a tuple item by its name: an int written, a float kept
            "variants.0.seed=7",  # … or by its index
            "evaluation.num_mcq=2",
            "mixtures.1.upsample=true",  # an open mapping (MixtureConfig overrides) gains a key
            "initial_context=null",
        ],
    )
    assert r.stages[2].learning_rate == 1e-5 and isinstance(r.stages[2].learning_rate, float)
    assert r.stages[1].max_steps == 6 and r.annealing.bf16 is False
    assert r.stages[1].trainable == ("projector", "vision")
    assert r.variants[1].weight == 3.0 and isinstance(r.variants[1].weight, float)
    assert r.variants[0].seed == 7 and r.evaluation.num_mcq == 2
    assert r.mixtures[1] == {"upsample": True} and r.initial_context is None
    # Untouched parts are the base's, and the change is in the hash.
    base = pretrain_recipe("tiny")
    assert r.stages[2].max_steps == base.stages[2].max_steps and r.fusion_method == base.fusion_method
    assert r.config_hash() != base.config_hash()


def test_a_mapping_of_overrides_means_the_same_as_the_strings():
    as_strings = load_posttrain_recipe(
        "tiny", ["sft.learning_rate=2e-4", "gspo.group_size=3", "gspo.hints.rollouts_per_level=3"]
    )
    as_mapping = load_posttrain_recipe(
        "tiny", {"sft.learning_rate": 2e-4, "gspo": {"group_size": 3, "hints": {"rollouts_per_level": "3"}}}
    )
    assert as_strings == as_mapping
    assert as_strings.gspo.group_size == 3 and as_strings.sft.learning_rate == 2e-4
    # Two fields that must agree change together: each dataclass is rebuilt once, with all its changes.
    with pytest.raises(
        RecipeError, match="gspo.group_size=3 is not valid: .*rollouts_per_level=2 must equal"
    ):
        load_posttrain_recipe("tiny", ["gspo.group_size=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "stage2.learnin_rate=1e-5",
            r"unknown key 'stages.2.learnin_rate' \(StageConfig has no 'learnin_rate'\); did you mean",
        ),
        ("evalution.num_mcq=3", r"unknown key 'evalution'.*did you mean evaluation\?"),
        ("stages.5.max_steps=3", r"unknown key 'stages.5'.*valid: \['1', '2'\]"),
        ("variants.rich.weight=1", r"unknown key 'variants.rich'.*valid: \['balanced', 'video-rich'\]"),
        ("stage2.learning_rate=fast", r"stages.2.learning_rate must be a number, got 'fast'"),
        ("stage2.max_steps=2.5", r"stages.2.max_steps must be an integer, got '2.5'"),
        ("stage2.bf16=maybe", r"stages.2.bf16 must be true or false"),
        ("stage2.learning_rate.x=1", r"stages.2.learning_rate is a float value; it has no keys"),
        ("stage2.learning_rate=-1", r"stage2.learning_rate=-1 is not valid: StageConfig.learning_rate"),
        ("mixtures.2.shares=1", r"mixtures.2.shares=1 is not valid: unknown or fixed MixtureConfig"),
        ("stage2.learning_rate", r"expected key=value"),
    ],
)
def test_a_bad_override_is_refused_naming_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_pretrain_recipe("tiny", [override])


def test_recipe_files_yaml_and_toml(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        textwrap.dedent(
            """\
            base: tiny
            name: mine
            stage2:
              learning_rate: 1e-5      # YAML 1.1 reads this as a string: parsed as the field's float
              max_steps: 6
            variants:
              video-rich: {weight: 2.0}
            """
        )
    )
    (tmp_path / "mine.toml").write_text(
        textwrap.dedent(
            """\
            base = "tiny"
            name = "mine"
            [stages.2]
            learning_rate = 1e-5
            max_steps = 6
            [variants.video-rich]
            weight = 2.0
            """
        )
    )
    expected = load_pretrain_recipe(
        "tiny",
        ["name=mine", "stage2.learning_rate=1e-5", "stage2.max_steps=6", "variants.video-rich.weight=2"],
    )
    for name in ("mine.yaml", "mine.toml"):
        assert load_pretrain_recipe(str(tmp_path / name)) == expected
    # A file on a file (its base relative to it), and --set on top of a file.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.yml").write_text("base: ../mine.yaml\nstage1: {max_steps: 5}\n")
    stacked = load_pretrain_recipe(str(tmp_path / "sub" / "more.yml"), ["stage2.max_steps=7"])
    assert (stacked.name, stacked.stages[1].max_steps, stacked.stages[2].max_steps) == ("mine", 5, 7)
    assert stacked.stages[2].learning_rate == 1e-5
    # A file can replace a whole tuple: one annealing variant instead of two.
    (tmp_path / "one.yaml").write_text("base: tiny\nvariants: [{name: only, weight: 1}]\n")
    assert [v.name for v in load_pretrain_recipe(str(tmp_path / "one.yaml")).variants] == ["only"]

    (tmp_path / "nobase.yaml").write_text("stage2: {max_steps: 3}\n")
    with pytest.raises(RecipeError, match="name the recipe it changes, e.g. `base: tiny`"):
        load_pretrain_recipe(str(tmp_path / "nobase.yaml"))
    (tmp_path / "typo.yaml").write_text("base: tiny\nstage2: {max_step: 3}\n")
    with pytest.raises(RecipeError, match=r"typo.yaml: stage2.*did you mean max_steps"):
        load_pretrain_recipe(str(tmp_path / "typo.yaml"))
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(RecipeError, match="bases lead back to it"):
        load_pretrain_recipe(str(tmp_path / "loop.yaml"))
    with pytest.raises(RecipeError, match="no pre.*recipe 'tin'; did you mean tiny"):
        load_pretrain_recipe("tin")


def test_an_installed_function_by_name(tmp_path, monkeypatch):
    (tmp_path / "team_recipes.py").write_text(
        textwrap.dedent(
            """\
            import dataclasses
            from keyeflow.training.recipes import pretrain_recipe

            def short():
                r = pretrain_recipe("tiny")
                return dataclasses.replace(r, name="short", stages={
                    k: dataclasses.replace(s, max_steps=2, checkpoint_every=2) for k, s in r.stages.items()})

            def wrong():
                return {"name": "not a recipe"}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    r = load_pretrain_recipe("team_recipes:short", ["stage1.learning_rate=0.01"])
    assert (r.name, r.stages[2].max_steps, r.stages[1].learning_rate) == ("short", 2, 0.01)
    with pytest.raises(RecipeError, match="returned a dict, not a PretrainRecipe"):
        load_pretrain_recipe("team_recipes:wrong")
    with pytest.raises(RecipeError, match="has no function 'nope'"):
        load_pretrain_recipe("team_recipes:nope")
    with pytest.raises(RecipeError, match="cannot import 'no_such_module'"):
        load_pretrain_recipe("no_such_module:f")


@pytest.mark.parametrize(
    ("flow", "source"), [("pretrain", "tiny"), ("pretrain", "keye-8b"), ("posttrain", "tiny")]
)
def test_recipe_show_prints_a_recipe_file_that_gives_the_same_recipe(flow, source, tmp_path):
    out = CliRunner().invoke(
        app,
        [
            "recipe",
            source,
            "--flow",
            flow,
            "--set",
            "stage2.max_steps=900" if flow == "pretrain" else "sft.max_steps=900",
        ],
    )
    assert out.exit_code == 0, out.output
    path = tmp_path / "shown.yaml"
    path.write_text(out.output)
    load = load_pretrain_recipe if flow == "pretrain" else load_posttrain_recipe
    override = ["stage2.max_steps=900"] if flow == "pretrain" else ["sft.max_steps=900"]
    assert load(str(path)).config_hash() == load(source, override).config_hash()
    assert load(str(path)) == load(source, override)


def test_cli_refuses_a_bad_override_before_anything_runs(home):
    for args in (
        ["pretrain", "--set", "stage2.learnin_rate=1e-5"],
        ["posttrain", "--set", "sft.learning_rate=-1"],
        ["run", "--set", "pretrain.stage9.max_steps=1"],
        ["run", "--set", "stage2.max_steps=1"],  # which flow's?
    ):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2, (args, out.output)
        assert args[-1].split("=")[0].split(".")[-1].split("_")[0] in out.output
        assert not home.exists()  # no table, no MLflow store, no checkpoint: nothing ran
    out = CliRunner().invoke(app, ["pretrain", "--set", "stage2.learnin_rate=1e-5"])
    assert "did you mean learning_rate?" in out.output and "nothing ran" in out.output
