"""A progress bar, with its unit and total, on each long step outside the Trainer (sampling, scoring, selection,
labeling, merging, evaluation); none under ``TQDM_DISABLE=1`` or ``--disable_tqdm``; a one-line error on a line of
its own after a half-drawn bar."""

import re

import pytest
import torch

from hf_align import progress, testbed
from hf_align.testbed import MODEL_DIR


@pytest.fixture(scope="module")
def tb():
    return testbed.load()


@pytest.fixture(autouse=True)
def bars_on(monkeypatch):
    """Each test starts with bars on and leaves them on (``disable_progress_bars`` is process-wide)."""
    import datasets
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()
    yield
    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()


def _sampling(tb, tmp_path):
    from hf_align.generation import sample_ids

    sample_ids(tb.model, tb.tokenizer, ["1+1=", "2+2=", "3+3=", "4+4="], batch_size=3, max_new_tokens=2, progress=True)
    return "sampling", "4/4", "prompt"


def _scoring(tb, tmp_path):
    from hf_align.scores import CheckpointReader, weight_diff_scores

    weight_diff_scores(MODEL_DIR, MODEL_DIR, progress=True)
    total = len(CheckpointReader(MODEL_DIR).keys())
    return "scoring weight diff", f"{total}/{total}", "tensor"


def _selection(tb, tmp_path):
    from hf_align.masks import NeuronMask

    scores = {f"model.layers.{i}.mlp.down_proj.weight": torch.rand(4) for i in range(3)}
    NeuronMask.from_scores(scores, 0.5, progress=True)
    return "selecting", "3/3", "tensor"


def _merging(tb, tmp_path):
    from hf_align.merging import merge_models

    result = merge_models(MODEL_DIR, MODEL_DIR, tmp_path / "merged", alpha=0.5, progress=True)
    from tqdm import tqdm

    return "merging", "/" + tqdm.format_sizeof(result.total_bytes), "B"


def _evaluation(tb, tmp_path):
    from hf_align.evaluation import perplexity, sequence_kl

    sequence_kl(tb.model, tb.model, tb.tokenizer, ["1+1=", "2+2="], [" 2", " 4"], progress=True)
    perplexity(tb.model, tb.tokenizer, ["1+1=", "2+2=", "3+3="], [" 2", " 4", " 6"], progress=True)
    return "KL: reference log-probs", "2/2", "seq"


FAMILIES = [_sampling, _scoring, _selection, _merging, _evaluation]
"""Labeling is datasets' own ``map`` bar, which reads ``TQDM_DISABLE`` at import (conftest sets it): its bar and
its switch are checked in a subprocess by tests/test_quiet.py."""


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__.strip("_"))
def test_each_long_step_shows_a_bar_with_its_total_and_unit(family, tb, tmp_path, capsys):
    desc, total, unit = family(tb, tmp_path)
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith(desc)]
    assert lines, err[-2000:]
    final = lines[-1]
    assert total in final and unit in final.split("[")[-1], final
    if family is _evaluation:
        assert any(line.startswith("retain perplexity") and "3/3" in line for line in re.split(r"[\r\n]", err))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("switch", ["TQDM_DISABLE", "disable_progress_bars"])
def test_no_bar_under_the_switches(family, switch, tb, tmp_path, capsys, monkeypatch):
    if switch == "TQDM_DISABLE":
        monkeypatch.setenv("TQDM_DISABLE", "1")
    else:
        progress.disable_progress_bars()
        monkeypatch.setenv("TQDM_DISABLE", "1")  # what disable_progress_bars set: restored after the test
    desc, _, _ = family(tb, tmp_path)
    assert desc not in capsys.readouterr().err


def test_disable_tqdm_flag_reaches_every_command(monkeypatch):
    """``--disable_tqdm`` parses on a command without TrainingArguments and switches every bar off."""
    from hf_align.cli.common import parse_command
    from hf_align.cli.env import EnvArguments

    monkeypatch.setenv("TQDM_DISABLE", "")
    assert progress.progress_enabled()
    (args,) = parse_command("hf-align env", (EnvArguments,), ["--disable_tqdm"])
    assert isinstance(args, EnvArguments)  # the switches' own dataclasses are not handed to the command
    assert not progress.progress_enabled()


def test_old_no_progress_spelling_still_works(tmp_path, capsys, tb):
    from hf_align.cli import main

    out = tmp_path / "merged"
    argv = ["merge", "--base_model_name_or_path", "testbed", "--model_name_or_path", "testbed", "--alpha", "0.5"]
    assert main([*argv, "--no_progress", "--output_dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--no_progress is deprecated, use --disable_tqdm" in err and "merging" not in err


def test_an_error_is_printed_on_its_own_line_after_a_bar(capsys):
    from hf_align.cli.errors import run_guarded
    from hf_align.errors import UserError

    bars = []

    def fails():  # a bar updated by hand (as the streaming merge's), still open when the error is raised
        bars.append(progress.progress_bar(desc="working", unit="step", total=10))
        bars[0].update(3)
        raise UserError("bad input at step 3")

    assert run_guarded("demo", fails) == 2
    err = capsys.readouterr().err
    assert "working" in err
    assert "\nhf-align demo: bad input at step 3\n" in err  # the bar's line ended before the error
