"""Issue 28, point 1 and the recipe half of point 7: only the command line's ``--trust_remote_code`` (or an explicit
Python ``True``) lets a model folder's code run, and a recipe says each key once.

The values tested are not a fixed list: each candidate is classified by the code of the library that reads it (TRL's
``TrlParser`` for a recipe's field, transformers' ``resolve_trust_remote_code`` for ``from_pretrained``'s keyword),
and every one that library takes as true must be refused wherever a recipe can put it.
"""

import json
from pathlib import Path

import pytest
import yaml

from hf_align.cli import main


SCALARS = ["t", "y", "yes", "true", "on", "1", "2", "-1", "0.5", "f", "n", "no", "false", "off", "0", "0.0", "null"]
CANDIDATES = sorted(
    {spelling for word in SCALARS for spelling in (word, word.upper(), word.title())}
    | {f"'{word}'" for word in ("false", "no", "0", "off", "", "null")}  # quoted: a string in YAML
    | {"''", "[1]", "[]", "{a: 1}", "{}", "~"}
)
"""Raw YAML scalars: plain (YAML 1.1 booleans, ints, floats, strings the parser's string_to_bool knows) and quoted."""


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _parser_reads_true(tmp_path: Path, raw: str) -> bool | None:
    """What TRL's own parser makes of ``trust_remote_code: <raw>`` in a recipe (``None``: it refuses the value, so
    nothing runs; the gate may refuse it first or leave it to the parser)."""
    from trl import DPOConfig, TrlParser

    path = tmp_path / "probe.yaml"
    path.write_text(f"trust_remote_code: {raw}\n")
    try:
        argv = ["--config", str(path), "--output_dir", "x", "--use_cpu", "true", "--bf16", "false"]
        (config,) = TrlParser((DPOConfig,)).parse_args_and_config(argv)
    except (SystemExit, ValueError, TypeError):
        return None
    return bool(config.trust_remote_code)


def _loader_reads_true(value) -> bool:
    """What ``from_pretrained`` makes of ``trust_remote_code=value`` for a folder with custom code."""
    from transformers.dynamic_module_utils import resolve_trust_remote_code

    try:
        resolve_trust_remote_code(value, "a-model", has_local_code=False, has_remote_code=True)
    except (ValueError, OSError, EOFError):
        return False
    return True


@pytest.fixture
def no_training(monkeypatch):
    import hf_align.scripts.train as training

    calls = []
    monkeypatch.setattr(training, "run", lambda name, *args: calls.append(args[1]) or 0)
    return calls


def _argv(tmp_path: Path, recipe_text: str | None = None, *extra: str, suffix: str = ".yaml") -> list[str]:
    argv = ["masked-dpo", "--no_launch", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    argv += ["--use_cpu", "true", "--bf16", "false"]
    argv += ["--model_name_or_path", "testbed", "--dataset_name", "testbed:preference"]
    if recipe_text is not None:
        path = tmp_path / f"recipe{suffix}"
        path.write_text(recipe_text)
        argv += ["--config", str(path)]
    return argv + list(extra)


def test_candidates_cover_both_answers_of_both_readers(tmp_path):
    parser = [raw for raw in CANDIDATES if _parser_reads_true(tmp_path, raw)]
    loader = [raw for raw in CANDIDATES if _loader_reads_true(yaml.safe_load(f"v: {raw}")["v"])]
    assert {"t", "Y", "on", "2"} <= set(parser) and "'false'" not in parser and "false" not in parser
    assert {"'false'", "'0'", "2", "on"} <= set(loader) and "false" not in loader and "0" not in loader


@pytest.mark.parametrize("raw", CANDIDATES)
def test_recipe_top_level_refused_exactly_when_the_parser_reads_true(tmp_path, raw):
    from hf_align.cli.common import check_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(f"trust_remote_code: {raw}\n")
    verdict = _parser_reads_true(tmp_path, raw)
    if verdict:
        with pytest.raises(PermissionError, match=r"recipe\.yaml.*`trust_remote_code`.*--trust_remote_code"):
            check_recipe(["--config", str(path)])
        check_recipe(["--config", str(path), "--trust_remote_code"])  # the flag allows it
    elif verdict is False:
        check_recipe(["--config", str(path)])


@pytest.mark.parametrize("key", ["model_init_kwargs", "ref_model_init_kwargs", "model_init_kwargs(json)"])
@pytest.mark.parametrize("raw", CANDIDATES)
def test_nested_kwargs_refused_when_from_pretrained_reads_true(tmp_path, key, raw):
    from hf_align.cli.common import check_recipe

    value = yaml.safe_load(f"v: {raw}")["v"]
    inner = {"trust_remote_code": value}
    recipe = {key.removesuffix("(json)"): json.dumps(inner) if key.endswith("(json)") else inner}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if _loader_reads_true(value):
        with pytest.raises(PermissionError, match=r"recipe\.yaml.*_init_kwargs\.trust_remote_code"):
            check_recipe(["--config", str(path)])
    else:
        check_recipe(["--config", str(path)])


@pytest.mark.parametrize("raw", ["t", "Y", "2", "on"])
def test_training_command_refuses_before_running(tmp_path, capsys, no_training, raw):
    """The issue's examples end to end: exit 2, one line naming the file and the field, nothing run."""
    assert main(_argv(tmp_path, f"trust_remote_code: {raw}\n")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "recipe.yaml" in line and "`trust_remote_code`" in line and no_training == []


@pytest.mark.parametrize("value", ["2", "'false'", "t"])
def test_model_init_kwargs_refused_end_to_end(tmp_path, capsys, no_training, value):
    assert main(_argv(tmp_path, f"model_init_kwargs: {{trust_remote_code: {value}}}\n")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model_init_kwargs.trust_remote_code" in line and "recipe.yaml" in line and no_training == []


def test_command_line_kwargs_need_the_flag_too(tmp_path, capsys, no_training):
    assert main(_argv(tmp_path, None, "--model_init_kwargs", '{"trust_remote_code": "t"}')) == 2
    assert "command line" in _one_line(capsys.readouterr().err) and no_training == []
    argv = _argv(tmp_path, None, "--model_init_kwargs", '{"trust_remote_code": true}', "--trust_remote_code", "t")
    assert main(argv) == 0 and no_training[0].trust_remote_code is True


@pytest.mark.parametrize("flag", ["--trust_remote_code", "--trust-remote-code"])
@pytest.mark.parametrize("raw", ["t", "Y", "yes", "1"])
def test_flag_spelled_as_the_parser_reads_it(tmp_path, no_training, raw, flag):
    """`--trust_remote_code t` is the flag as HfArgumentParser reads it: the gate and the parser agree."""
    assert main(_argv(tmp_path, "trust_remote_code: true\n", flag, raw)) == 0
    assert no_training[0].trust_remote_code is True


@pytest.mark.parametrize("text", ["trust-remote-code: t\n", "model_init_kwargs: {trust-remote-code: 1}\n"])
def test_kebab_case_recipe_key_is_the_same_field(tmp_path, capsys, no_training, text):
    """A kebab-case recipe key is read as the snake-case field (with a warning): the gate reads it so too (nested,
    where ``from_pretrained`` would not read it, it is refused all the same: no spelling is left to argue about)."""
    assert main(_argv(tmp_path, text)) == 2
    assert "trust-remote-code" in _one_line(capsys.readouterr().err) and no_training == []


def test_python_api_takes_only_true_or_false(monkeypatch):
    from types import SimpleNamespace

    from hf_align.errors import UserError
    from hf_align.loading import load_model, load_tokenizer
    from hf_align.trainers._base import load_model as trainer_load_model

    class Never:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            pytest.fail("loaded")

    for bad in ("false", "t", 1, None):
        with pytest.raises(UserError, match="trust_remote_code must be True or False"):
            load_model("some/model", architecture=Never, trust_remote_code=bad)
        with pytest.raises(UserError, match="trust_remote_code must be True or False"):
            load_tokenizer("some/model", trust_remote_code=bad)
        args = SimpleNamespace(model_init_kwargs={"trust_remote_code": bad}, trust_remote_code=False)
        with pytest.raises(UserError, match="model_init_kwargs"):
            trainer_load_model("some/model", args)


def _own_configs() -> list[type]:
    import dataclasses

    from hf_align.config_checks import CheckedConfig
    from hf_align.trainers.registry import TRAINERS

    configs = {spec.config_class() for spec in TRAINERS.values()}
    takes_kwargs = [c for c in configs if any(f.name.endswith("init_kwargs") for f in dataclasses.fields(c))]
    return sorted((c for c in takes_kwargs if issubclass(c, CheckedConfig)), key=lambda c: c.__name__)


@pytest.mark.parametrize("config_class", _own_configs(), ids=lambda c: c.__name__)
def test_every_hf_align_config_takes_only_true_or_false_in_init_kwargs(tmp_path, config_class):
    """A trainer given a model path hands model_init_kwargs to from_pretrained (TRL's loader for an unmasked run):
    the config refuses what from_pretrained would read as true without it being True."""
    import dataclasses

    from hf_align.errors import UserError

    fields = [f.name for f in dataclasses.fields(config_class) if f.name.endswith("init_kwargs")]
    base = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": "none"}
    for field in fields:
        for bad in ("false", "t", 1):
            with pytest.raises(UserError, match=rf"{config_class.__name__}\.{field}.*True or False"):
                config_class(**base, **{field: {"trust_remote_code": bad}})
        assert getattr(config_class(**base, **{field: {"trust_remote_code": False}}), field) is not None


# ----------------------------------------------------------------------------------- duplicate keys in a recipe
@pytest.mark.parametrize(
    ("text", "suffix", "key"),
    [
        ("learning_rate: 1.0e-5\nbeta: 0.1\nlearning_rate: 1.0\n", ".yaml", "learning_rate"),
        ("model_init_kwargs:\n  dtype: float32\n  dtype: bfloat16\n", ".yaml", "dtype"),
        ('{"beta": 0.1, "beta": 0.5}', ".json", "beta"),
        ('{"model_init_kwargs": {"dtype": "float32", "dtype": "bfloat16"}}', ".json", "dtype"),
    ],
)
def test_duplicate_recipe_key_is_one_line_naming_key_and_file(tmp_path, capsys, no_training, text, suffix, key):
    assert main(_argv(tmp_path, text, suffix=suffix)) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"recipe{suffix}" in line and repr(key) in line and "twice" in line and no_training == []


def test_duplicate_keys_in_other_commands_and_pipeline_recipes(tmp_path, capsys):
    recipe = tmp_path / "select.yaml"
    recipe.write_text("neuron_mask_ratio: 0.1\nneuron_mask_ratio: 0.5\n")
    assert main(["select-mask", "--config", str(recipe), "--output_dir", str(tmp_path / "m")]) == 2
    assert "'neuron_mask_ratio'" in _one_line(capsys.readouterr().err)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("stages:\n  - {name: a, command: select-mask}\nstages: []\n")
    assert main(["pipeline", "--config", str(pipeline), "--output_dir", str(tmp_path / "p")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "pipeline.yaml" in line and "'stages'" in line


def test_yaml_merge_keys_may_override(tmp_path, no_training):
    """`<<: *base` then a key of the base is YAML's override, not a duplicate."""
    text = "base: &base {dtype: float32}\nmodel_init_kwargs:\n  <<: *base\n  dtype: bfloat16\n"
    from hf_align.io import read_yaml

    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert read_yaml(path)["model_init_kwargs"] == {"dtype": "bfloat16"}


# ------------------------------------------------------------------- the pipeline: set, stage args and --set
def _stage_reads_true(value) -> bool | None:
    """What a stage's parser makes of ``--trust_remote_code <value>`` (the pipeline passes values as strings)."""
    from trl import DPOConfig, TrlParser

    argv = ["--trust_remote_code", str(value), "--output_dir", "x", "--use_cpu", "true", "--bf16", "false"]
    try:
        (config,) = TrlParser((DPOConfig,)).parse_args_and_config(argv)
    except (SystemExit, ValueError, TypeError):
        return None
    return bool(config.trust_remote_code)


@pytest.mark.parametrize("where", ["set", "args", "--set"])
@pytest.mark.parametrize("raw", CANDIDATES)
def test_pipeline_refuses_what_a_stage_would_read_as_true(tmp_path, capsys, monkeypatch, where, raw):
    import hf_align.scripts.pipeline as engine

    ran = []
    monkeypatch.setattr(engine, "run_stage", lambda stage, argv, run: ran.append(argv))
    value = yaml.safe_load(f"v: {raw}")["v"]
    stage = {"name": "train", "command": "masked-dpo"}
    recipe = {"model_name_or_path": "testbed", "stages": [stage]}
    extra = []
    if where == "set":
        recipe["set"] = {"trust_remote_code": value}
    elif where == "args":
        stage["args"] = {"trust_remote_code": value}
    else:
        extra = ["--set", f"train.trust_remote_code={value}"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["pipeline", "--config", str(path), "--output_dir", str(tmp_path / "out"), *extra])
    verdict = _stage_reads_true(value if where != "--set" else str(value))
    if verdict:
        assert code == 2 and ran == []
        line = _one_line(capsys.readouterr().err)
        assert "`train.trust_remote_code`" in line or "`trust_remote_code`" in line
        assert ("pipeline.yaml" in line) == (where != "--set") and "--trust_remote_code" in line
    elif verdict is False:
        assert code == 0 and len(ran) == 1


def test_pipeline_flag_allows_it_and_reaches_the_stage(tmp_path, monkeypatch):
    import hf_align.scripts.pipeline as engine

    ran = []
    monkeypatch.setattr(engine, "run_stage", lambda stage, argv, run: ran.append(argv))
    recipe = {
        "model_name_or_path": "testbed",
        "set": {"trust_remote_code": "t"},
        "stages": [
            {"name": "train", "command": "masked-dpo", "args": {"model_init_kwargs": '{"trust_remote_code": true}'}}
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["pipeline", "--config", str(path), "--output_dir", str(tmp_path / "o"), "--trust_remote_code"]) == 0
    assert ran[0][-1] == "--trust_remote_code"
