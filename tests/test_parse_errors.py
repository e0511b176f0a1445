"""Every parse failure is one line naming the file (and the line where the parser knows it), and a user function
that fails is named by ``module:function`` (issue #28.8). Each case enumerates a class of input the CLI reads:
recipes (training and other commands, pipeline recipes), data files of every supported format, JSON metadata, and
the user functions a recipe names (rewards, feedback functions). Every case here failed on main with a traceback,
a bare decode error, a misleading message, or (``--config=``) silently."""

from __future__ import annotations

import pytest

from hf_align.errors import UserError


# ---------------------------------------------------------------------------------------------------- recipes
RECIPES = {
    "syntax": (b"beta: [0.1, 0.2\nmax_steps: 3\n", r"recipe '\S+r\.yaml', line 2 column 10: not valid YAML"),
    "tab": (b"beta: 0.1\n\tmax_steps: 3\n", r"recipe '\S+r\.yaml', line 2 column 1: not valid YAML"),
    "binary": (bytes(range(128, 256)), r"recipe '\S+r\.yaml' is not a UTF-8 text file \(byte 0x80 at offset 0\)"),
    "utf16": ("beta: 0.1\n".encode("utf-16"), r"recipe '\S+r\.yaml' is not a UTF-8 text file"),
}


@pytest.mark.parametrize("case", RECIPES)
@pytest.mark.parametrize("command", ["masked-dpo", "select-mask"])
def test_a_recipe_that_does_not_parse_is_one_line(tmp_path, capsys, case, command):
    from hf_align.cli import main

    content, message = RECIPES[case]
    (tmp_path / "r.yaml").write_bytes(content)
    assert main([command, "--config", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hf-align {command}: "), err
    assert __import__("re").search(message, err[0]), err[0]


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_config_equals_form_is_read_and_gated(tmp_path, form):
    """``--config=r.yaml`` was not read at all (and so not checked by the recipe gate)."""
    from hf_align.cli.training import parse

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: testbed\ndataset_name: testbed:preference\nbeta: 0.25\n")
    flag = ["--config", str(recipe)] if form == "separate" else [f"--config={recipe}"]
    cpu = ["--use_cpu", "true", "--bf16", "false", "--output_dir", str(tmp_path / "o")]
    parsed, *_ = parse("masked-dpo", [*flag, *cpu])
    assert parsed[1].beta == 0.25
    recipe.write_text("model_name_or_path: testbed\ntrust_remote_code: true\n")
    with pytest.raises(PermissionError, match="trust_remote_code"):
        parse("masked-dpo", [*flag, *cpu])


def test_a_pipeline_recipe_that_does_not_parse_is_one_line(tmp_path):
    from hf_align.scripts.pipeline import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - name: a\n    command: [masked-dpo\n")
    with pytest.raises(UserError, match=r"pipeline recipe '\S+p\.yaml', line 4 column 1: not valid YAML"):
        load_pipeline(path, ["masked-dpo"])


def test_json_metadata_that_does_not_parse_names_the_file(tmp_path):
    from hf_align.io import read_json

    (tmp_path / "m.json").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(UserError, match=r"'\S+m\.json' is not a UTF-8 text file"):
        read_json(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(UserError, match=r"'\S+m\.json' is not valid JSON: Expecting value: line 2 column 7"):
        read_json(tmp_path / "m.json")


# ------------------------------------------------------------------------------------------------- data files
DATA = {
    "empty.jsonl": (b"", "the file is empty"),
    "blank.jsonl": (b"\n  \n", "the file holds no rows"),
    "broken.jsonl": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion\n', "line 2, column 17"),
    "not_object.jsonl": (b'{"prompt": "a", "completion": "b"}\n[1, 2]\n', "line 2: a JSON list, not an object"),
    "broken.json": (b'[{"prompt": "a",\n  "completion": }]', "line 2, column 17: not valid JSON"),
    "columns.json": (b'{"prompt": ["a", "b"], "completion": ["c", "d"]}', "one JSON object of columns"),
    "binary.jsonl": (bytes(range(128, 256)), "is not a UTF-8 text file"),
    "quote.csv": (b'prompt,completion\n"a,b\n', "cannot be read as csv: "),
    "broken.parquet": (b"PAR1 not really", "cannot be read as parquet: "),
}


@pytest.mark.parametrize("name", DATA)
def test_a_data_file_that_does_not_parse_is_one_line_naming_it(tmp_path, name):
    from hf_align.scripts.utils import load_dataset_any

    content, message = DATA[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_dataset_any(str(tmp_path / name))
    text = str(caught.value)
    assert str(tmp_path / name) in text and message in text and "\n" not in text, text


def test_rows_of_columns_and_one_conversation_still_load(tmp_path):
    """What is not refused: a list of records, and one record whose value is a list of messages."""
    from hf_align.scripts.utils import load_dataset_any

    (tmp_path / "rows.json").write_text('[{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]')
    assert len(load_dataset_any(str(tmp_path / "rows.json"))["train"]) == 2
    (tmp_path / "chat.json").write_text('{"messages": [{"role": "user", "content": "hi"}]}')
    assert load_dataset_any(str(tmp_path / "chat.json"))["train"].column_names == ["messages"]


# --------------------------------------------------------------------------------------------- user functions
def raises(prompts, completions, **kwargs):
    raise KeyError("answer")


def returns_none(prompts, completions, **kwargs):
    return None


def returns_float(prompts, completions, **kwargs):
    return 1.0


def returns_short(prompts, completions, **kwargs):
    return [1.0]


CALLS = {
    raises: "raised KeyError: 'answer'",
    returns_none: "returned a NoneType; expected a list with one value per completion",
    returns_float: "returned a float; expected a list",
    returns_short: "returned 1 scores for 2 completions",
}


@pytest.mark.parametrize("func", CALLS, ids=lambda f: f.__name__)
def test_a_reward_function_that_fails_is_named_by_module_and_function(func):
    from hf_align.rewards import score_completions

    with pytest.raises(ValueError) as caught:
        score_completions([func], ["p", "q"], ["a", "b"])
    assert f"reward function '{__name__}:{func.__name__}' " in str(caught.value) and CALLS[func] in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "os:system",
            r"reward 'os:system' cannot be called as f\(prompts=, completions=\), as it will be: its "
            r"signature is os:system\(command\)",
        ),
        ("os.getcwd", r"reward 'os.getcwd' cannot be called as f\(prompts=, completions=\)"),
        ("os:sep", r"reward 'os:sep' is not callable"),
        ("os:no_such_function", r"reward 'os:no_such_function' cannot be imported"),
    ],
)
def test_what_is_not_a_reward_function_is_refused_before_it_runs(spec, message):
    from hf_align.rewards import resolve_reward

    with pytest.raises(UserError, match=message):
        resolve_reward(spec)


def test_a_feedback_function_is_checked_and_named():
    from hf_align.rewards import call_user_function, check_signature

    with pytest.raises(UserError, match=r"feedback_fn 'os:system' cannot be called as f\(…, …\)"):
        import os

        check_signature(os.system, "feedback_fn", [], [], label="os:system")
    with pytest.raises(UserError, match=rf"feedback_fn '{__name__}:raises' raised KeyError"):
        call_user_function(raises, "feedback_fn", [], [])


@pytest.mark.parametrize("layout", ["path", "data_files"])
def test_a_broken_file_in_a_datasets_mixture_is_one_line_naming_it(tmp_path, layout):
    """A recipe's ``datasets:`` mixture goes through TRL's ``get_dataset``: the same one line as ``dataset_name``."""
    from trl import DatasetMixtureConfig, ScriptArguments
    from trl.scripts.utils import DatasetConfig

    from hf_align.scripts.train import load_training_data

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(DATA["broken.jsonl"][0])
    entry = DatasetConfig(path=str(bad)) if layout == "path" else DatasetConfig(path="json", data_files=str(bad))
    mixture = DatasetMixtureConfig(datasets=[entry])
    with pytest.raises(UserError, match=rf"`datasets` entry '{bad}': line 2, column 17: not valid JSON"):
        load_training_data(ScriptArguments(), mixture, __import__("types").SimpleNamespace(eval_strategy="no"))


def test_a_labeling_function_is_checked_and_named(tmp_path):
    """``label-tokens --method module:function``: refused before it runs when it cannot take (prompt, response);
    an exception it raises is one line naming it."""
    from types import SimpleNamespace

    from hf_align import testbed
    from hf_align.key_tokens import callable_weights
    from hf_align.scripts.label_tokens import _method

    with pytest.raises(UserError, match=r"--method 'os:getcwd' cannot be called as f\(…, …\)"):
        _method(SimpleNamespace(method="os:getcwd", scorer=None))
    with pytest.raises(UserError, match=rf"labeling function '{__name__}:raises' raised KeyError"):
        callable_weights(raises, testbed.load_tokenizer(), "1+1=", "2")
