"""Issue 28, points 2 and 3, for every command that writes: an output never is, contains or lies inside an input
(refused before anything loads, naming both), and one writer per output (``filelock``; a second writer is told the
holder's pid; a stale lock is taken over with a warning).

Commands run in-process through ``hf_align.cli.main``; loading a model fails the test (each refusal must come
first). The other writer is a real second process holding :func:`hf_align.io.output_lock`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_align.cli import COMMANDS, all_commands, main
from hf_align.testbed import MODEL_DIR


TRAINING = sorted(set(all_commands()) - set(COMMANDS))
CPU = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
PARAM = "model.layers.0.mlp.down_proj.weight"


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def never_load(monkeypatch):
    """Loading a model, a tokenizer or a dataset fails the test: every refusal comes first."""
    import datasets
    import transformers

    import hf_align.loading

    def fail(*args, **kwargs):
        pytest.fail(f"loaded {args[:1]} before refusing")

    for owner, name in [
        (transformers.AutoModelForCausalLM, "from_pretrained"),
        (transformers.AutoTokenizer, "from_pretrained"),
        (hf_align.loading, "load_model"),
        (datasets, "load_dataset"),
        (datasets, "load_from_disk"),
    ]:
        monkeypatch.setattr(owner, name, fail)
    import hf_align.scripts.train as training

    monkeypatch.setattr(training, "run", fail)


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "M"
    shutil.copytree(MODEL_DIR, folder)
    return folder


def _scores(tmp_path: Path) -> Path:
    from hf_align.scores import save_scores

    directory = tmp_path / "scores"
    save_scores(directory, {PARAM: torch.arange(12, dtype=torch.float32).reshape(4, 3)}, {"method": "test"})
    return directory


def _pipeline_recipe(tmp_path: Path, scores: str = "x") -> Path:
    path = tmp_path / "pipeline.yaml"
    stage = {
        "name": "mask",
        "command": "select-mask",
        "args": {"neuron_scores_path": scores, "neuron_mask_ratio": 0.5},
    }
    path.write_text(json.dumps({"stages": [stage], "model_name_or_path": "testbed"}))
    return path


def _argv(command: str, output: Path, model: str = "testbed", tmp_path: Path | None = None) -> list[str]:
    """A command line of ``command`` that writes ``output`` and reads ``model`` (parses; nothing else needed)."""
    if command in TRAINING:
        return [command, "--no_launch", *CPU, "--model_name_or_path", model, "--dataset_name",
                "testbed:preference", "--output_dir", str(output)]  # fmt: skip
    return {
        "select-mask": ["select-mask", "--init", model, "--trained", model, "--output_dir", str(output)],
        "label-tokens": [
            "label-tokens",
            "--dataset_name",
            "testbed:preference",
            "--model_name_or_path",
            model,
            "--output_file",
            str(output),
        ],  # fmt: skip
        "merge": [
            "merge",
            "--base_model_name_or_path",
            model,
            "--model_name_or_path",
            "testbed",
            "--alpha",
            "0.5",
            "--output_dir",
            str(output),
        ],  # fmt: skip
        "adaptive-merge": [
            "adaptive-merge",
            *CPU,
            "--model_name_or_path",
            "testbed",
            "--base_model_name_or_path",
            model,
            "--dataset_name",
            "testbed:prompts",
            "--output_dir",
            str(output),
        ],  # fmt: skip
        "eval": [
            "eval",
            "--model_name_or_path",
            model,
            "--dataset_name",
            "testbed:prompts",
            "--output_file",
            str(output),
        ],  # fmt: skip
        "quickstart": ["quickstart", "--output_dir", str(output)],
        "pipeline": [
            "pipeline",
            "--config",
            str(_pipeline_recipe(tmp_path or output.parent)),
            "--model_name_or_path",
            model,
            "--output_dir",
            str(output),
        ],  # fmt: skip
    }[command]


WRITERS = [*TRAINING, "select-mask", "label-tokens", "merge", "adaptive-merge", "eval", "quickstart", "pipeline"]
"""Every command that writes (``env`` and ``recipes`` only print)."""


def test_every_writing_command_is_listed():
    assert set(WRITERS) == set(all_commands()) - {"env", "recipes"}  # they only print


# --------------------------------------------------------------------------------------- 2. inputs are read-only
@pytest.mark.parametrize("relation", ["is", "lies inside", "contains"])
@pytest.mark.parametrize("command", [c for c in WRITERS if c != "quickstart"])  # quickstart reads no path
def test_output_over_the_model_is_refused_before_loading(tmp_path, capsys, never_load, model, command, relation):
    output = {"is": model, "lies inside": model / "out", "contains": model.parent}[relation]
    if command in ("label-tokens", "eval") and relation == "is":
        output = model / "config.json"  # a file output: the model's own file
    before = _snapshot(model)
    assert main(_argv(command, output, str(model), tmp_path)) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(output) in line and str(model) in line and "input" in line, line
    assert _snapshot(model) == before and not (model.parent / f".{output.name}.lock").exists()


def test_masked_dpo_into_its_own_model_leaves_it_byte_identical(tmp_path, capsys, never_load, model):
    """The issue's example: `masked-dpo --model_name_or_path M --output_dir M` exited 0 replacing the weights."""
    before = _snapshot(model)
    argv = ["masked-dpo", "--no_launch", *CPU, "--dataset_name", "testbed:preference"]
    assert main([*argv, "--model_name_or_path", str(model), "--output_dir", str(model)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"--output_dir {str(model)!r} is the input --model_name_or_path {str(model)!r}" in line
    assert _snapshot(model) == before


def test_symlinked_spelling_of_an_input_is_refused(tmp_path, capsys, never_load, model):
    link = tmp_path / "link"
    link.symlink_to(model)
    assert main(_argv("masked-dpo", link / "out", str(model))) == 2
    assert "lies inside" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("--neuron_mask_path", "mask"),
        ("--dataset_name", "data.jsonl"),
        ("--retain_dataset_name", "retain.jsonl"),
        ("--chat_template_path", "template.jinja"),
    ],
)
def test_dataset_mask_and_other_inputs_are_protected_too(tmp_path, capsys, never_load, field, value):
    source = tmp_path / value
    source.mkdir() if "." not in value else source.write_text("{}\n")
    command = {"--retain_dataset_name": "npo", "--chat_template_path": "aligner-sft"}.get(field, "masked-dpo")
    argv = _argv(command, tmp_path, "testbed")  # the output folder holds the input
    assert main([*argv, field, str(source)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert field in line and str(source) in line and "contains" in line


def test_eval_output_inside_its_adapter_or_reference_is_refused(tmp_path, capsys, never_load, model):
    for field in ("--adapter", "--reference_model"):
        argv = [*_argv("eval", model / "results.json", "testbed"), field, str(model)]
        assert main(argv) == 2
        assert field in _one_line(capsys.readouterr().err)


def test_outputs_apart_from_inputs_still_run(tmp_path):
    scores = _scores(tmp_path)
    argv = ["select-mask", "--neuron_scores_path", str(scores), "--neuron_mask_ratio", "0.5"]
    assert main([*argv, "--output_dir", str(tmp_path / "mask")]) == 0


# ------------------------------------------------------------------------------------- 3. one writer per output
HOLDER = """
import sys
from contextlib import ExitStack
from hf_align.io import output_lock
with ExitStack() as stack:
    for path in sys.argv[1:]:
        stack.enter_context(output_lock(path, "hf-align test-holder"))
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A second process holding the lock of one output per writing command, as a running command would."""
    root = tmp_path_factory.mktemp("held")
    outputs = {command: root / f"out-{command}" for command in WRITERS}
    outputs["label-tokens"] = root / "labels.jsonl"
    outputs["eval"] = root / "results.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, outputs.values())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert holder.stdout.readline().strip() == "held"
    yield outputs, holder.pid
    holder.stdin.close()
    holder.wait(timeout=60)


@pytest.mark.parametrize("command", WRITERS)
def test_second_writer_is_refused_naming_the_holder_pid(tmp_path, capsys, never_load, held, command):
    outputs, pid = held
    assert main(_argv(command, outputs[command], "testbed", tmp_path)) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"pid {pid}" in line and str(outputs[command]) in line and "test-holder" in line, line


def test_stale_lock_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "mask"
    lock = tmp_path / ".mask.lock"
    lock.write_text(json.dumps({"host": "here", "pid": dead.pid, "who": "hf-align select-mask"}))
    argv = ["select-mask", "--neuron_scores_path", str(_scores(tmp_path)), "--neuron_mask_ratio", "0.5"]
    with pytest.warns(UserWarning, match=rf"stale lock .*\.mask\.lock.* pid {dead.pid} \(no longer running\)"):
        assert main([*argv, "--output_dir", str(out)]) == 0
    assert (out / "neuron_mask.safetensors").exists() and not lock.exists()  # released: nothing left behind


def test_a_refused_command_leaves_no_lock_and_no_folder_behind(tmp_path, capsys):
    """The lock's folders are made for it; a command refused after taking the lock removes them again."""
    argv = ["select-mask", "--neuron_scores_path", str(tmp_path / "none"), "--neuron_mask_ratio", "0.5"]
    assert main([*argv, "--output_dir", str(tmp_path / "a" / "b" / "mask")]) == 2
    assert "neuron scores" in _one_line(capsys.readouterr().err)
    assert sorted(tmp_path.iterdir()) == []


def test_pipeline_holds_its_lock_and_each_stage_its_own(tmp_path, monkeypatch):
    import hf_align.scripts.pipeline as engine

    seen = []

    def record(stage, argv, run):
        seen.append(json.loads((tmp_path / ".out.lock").read_text()))

    monkeypatch.setattr(engine, "run_stage", record)
    assert main(["pipeline", "--config", str(_pipeline_recipe(tmp_path)), "--output_dir", str(tmp_path / "out")]) == 0
    assert [(entry["pid"], entry["who"]) for entry in seen] == [(os.getpid(), "hf-align pipeline")]
    assert not (tmp_path / ".out.lock").exists()


def test_pipeline_stage_takes_over_a_stale_stage_lock(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / ".mask.lock").write_text(json.dumps({"pid": dead.pid}))
    recipe = _pipeline_recipe(tmp_path, str(_scores(tmp_path)))
    with pytest.warns(UserWarning, match=rf"stale lock .*\.mask\.lock.*{dead.pid}"):
        assert main(["pipeline", "--config", str(recipe), "--output_dir", str(out)]) == 0
    assert (out / "mask" / "neuron_mask.safetensors").exists() and not (out / ".mask.lock").exists()
