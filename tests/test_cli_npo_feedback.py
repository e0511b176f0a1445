"""``hf-align npo``, ``hf-align feedback`` and ``hf-align label-tokens`` end to end on the testbed (in-process)."""

import json
import re

import torch

from hf_align.cli import main


TINY = [
    "--no_launch",
    "--model_name_or_path", "testbed",
    "--max_steps", "2",
    "--per_device_train_batch_size", "2",
    "--bf16", "false",
    "--use_cpu", "true",
    "--report_to", "none",
    "--save_strategy", "no",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
    "--dataloader_num_workers", "0",
]  # fmt: skip
FEEDBACK_TINY = [
    "--num_rounds", "1",
    "--steps_per_round", "2",
    "--prompts_per_round", "4",
    "--num_generations", "2",
    "--max_completion_length", "4",
]  # fmt: skip


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# label-tokens


def test_label_tokens_marks_exactly_the_wrong_digits(tmp_path, capsys):
    """testbed:preference: chosen is the right answer, rejected a same-length corruption; digits are single tokens,
    so the rewrite diff must mark exactly `rejected_wrong_positions` (the dataset's ground truth), EOS unmarked."""
    out = tmp_path / "labeled.jsonl"
    argv = ["label-tokens", "--dataset", "testbed:preference", "--tokenizer", "testbed", "--output", str(out)]
    assert main([*argv, "--max-rows", "16"]) == 0
    rows = _rows(out)
    assert len(rows) == 16
    for row in rows:
        expected = [1.0 if i in row["rejected_wrong_positions"] else 0.0 for i in range(len(row["rejected"]))]
        assert row["rejected_weights"] == [*expected, 0.0], row
    assert "written to" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_label_tokens_parquet_and_key_floor(tmp_path):
    from datasets import load_dataset

    out = tmp_path / "labeled.parquet"
    argv = ["label-tokens", "--dataset", "testbed:preference", "--tokenizer", "testbed", "--output", str(out)]
    assert main([*argv, "--max-rows", "4", "--key", "2.0", "--floor", "0.5"]) == 0
    data = load_dataset("parquet", data_files=str(out))["train"]
    for row in data:
        expected = [2.0 if i in row["rejected_wrong_positions"] else 0.5 for i in range(len(row["rejected"]))]
        assert row["rejected_weights"] == [*expected, 0.5]


def test_label_tokens_bad_inputs_are_named(tmp_path, capsys):
    out = tmp_path / "labeled.jsonl"
    base = ["label-tokens", "--dataset", "testbed:preference", "--tokenizer", "testbed"]
    assert main([*base, "--output", str(out), "--response-column", "answer"]) == 2
    assert "missing column(s) ['answer']" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--output", str(tmp_path / "labeled.csv")]) == 2
    assert "--output" in capsys.readouterr().err
    out.write_text("keep me\n")
    assert main([*base, "--output", str(out), "--max-rows", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"
    assert main([*base, "--output", str(out), "--overwrite", "--method", "no_such_mod:fn"]) == 2
    assert "--method 'no_such_mod:fn'" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"


# ---------------------------------------------------------------------------------------------------------------
# npo


def test_npo_on_labeled_data_with_mask_and_retain(tmp_path):
    """label-tokens → npo (token level, row mask, retain term): the saved model differs from the testbed model only in
    the selected rows."""
    from safetensors.torch import load_file

    from hf_align import testbed
    from hf_align.masks import NeuronMask

    labeled = tmp_path / "labeled.jsonl"
    argv = ["label-tokens", "--dataset", "testbed:preference", "--tokenizer", "testbed", "--output", str(labeled)]
    assert main([*argv, "--max-rows", "8"]) == 0
    base = testbed.load().model
    mask = NeuronMask.random(base, 0.1, granularity="row", seed=0)
    mask.save(tmp_path / "mask")
    out = tmp_path / "out"
    argv = [
        "npo", *TINY, "--dataset_name", str(labeled), "--npo_level", "token", "--learning_rate", "1e-3",
        "--neuron_mask_path", str(tmp_path / "mask"), "--retain_dataset_name", "testbed:retain",
        "--output_dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    saved = load_file(str(out / "model.safetensors"))
    changed = 0
    for name, before in base.state_dict().items():
        if name not in saved:
            continue
        after = saved[name]
        rows = mask.masks.get(name)
        if rows is None:
            assert torch.equal(after, before), name
            continue
        keep = ~(rows if rows.shape == before.shape else rows[:, None].expand_as(before))
        assert torch.equal(after[keep], before[keep]), name
        changed += int((after != before).sum())
    assert changed > 0


def _refused(capsys, argv, pattern):
    """A user's mistake: exit code 2 and one line on stderr that names it (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(pattern, err), err
    assert "\n" not in err and "Traceback" not in err


def test_npo_bad_field_value_and_columns_are_named(tmp_path, capsys):
    out = tmp_path / "out"
    common = [*TINY, "--output_dir", str(out)]
    _refused(capsys, ["npo", *common, "--dataset_name", "testbed:forget", "--npo_levl", "token"], "npo_levl")
    _refused(
        capsys,
        ["npo", *common, "--dataset_name", "testbed:forget", "--npo_level", "word"],
        r"--npo_level.*invalid choice: 'word' \(choose from 'sequence', 'token'\)",  # the declared choices
    )
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2 ugh"}) + "\n")
    _refused(
        capsys,
        ["npo", *common, "--dataset_name", str(data)],
        r"forget data\) is missing columns: expected prompt\+completion.*\[.question., .answer.\]",  # NPOTrainer's check
    )
    _refused(
        capsys,
        ["npo", *common, "--dataset_name", "testbed:forget", "--retain_dataset_name", "testbed:prompts"],
        r"retain_dataset_name 'testbed:prompts'.*'completion'",
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# feedback


def test_feedback_online_quantiles(tmp_path):
    """Quark-style run: the saved tokenizer carries the quantile tokens and the data pool holds 4 prompts × 2."""
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    argv = [
        "feedback", *TINY, *FEEDBACK_TINY, "--dataset_name", "testbed:prompts",
        "--reward_funcs", "hf_align.testbed:reward", "--num_quantiles", "3", "--feedback_template", "{feedback}{prompt}",
        "--output_dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert (out / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    vocab = tokenizer.get_vocab()
    assert all(f"<|quantile_{i}|>" in vocab for i in range(3))
    pool = json.loads((out / "data_pool" / "pool.json").read_text())
    assert pool, "pool metadata written"
    from hf_align.data_pool import DataPool

    assert len(DataPool.load(out / "data_pool")) == 4 * 2


def test_feedback_offline_categories(tmp_path):
    data = tmp_path / "fb.jsonl"
    rows = [
        {"prompt": "2+3=", "completion": "5", "feedback": "Correct."},
        {"prompt": "rev 123=", "completion": "321", "feedback": "Correct."},
        {"prompt": "4+4=", "completion": "9", "feedback": "Wrong."},
        {"prompt": "rev 45=", "completion": "45", "feedback": "Wrong."},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = [
        "feedback", *TINY, "--dataset_name", str(data), "--feedback_type", "category",
        "--categories", "Correct.", "Wrong.", "--output_dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert (out / "model.safetensors").exists()


def test_feedback_bad_inputs_are_named(tmp_path, capsys):
    out = tmp_path / "out"
    common = [*TINY, *FEEDBACK_TINY, "--output_dir", str(out), "--dataset_name", "testbed:prompts"]
    _refused(capsys, ["feedback", *common, "--feedback_fnn", "x:y"], "feedback_fnn")
    _refused(
        capsys,
        ["feedback", *common, "--feedback_type", "category", "--categories", "Correct.", "Wrong."],
        r"missing column\(s\) \['completion', 'feedback'\].*feedback_fn",
    )
    _refused(
        capsys,
        ["feedback", *common, "--feedback_type", "text", "--feedback_fn", "no_such_module:judge"],
        "feedback_fn entry 'no_such_module:judge' cannot be imported",
    )
    _refused(
        capsys,
        ["feedback", *common, "--feedback_type", "category", "--categories", "A", "B"]
        + ["--reward_funcs", "hf_align.testbed:reward"],
        "feedback_type 'category' needs feedback_fn",
    )
    assert not out.exists()


def test_feedback_reward_specs_resolve_as_in_eval(tmp_path, capsys):
    """The 'testbed' alias and the dotted form work as in `hf-align eval`; an unknown spec is a one-line error
    naming it, before any sampling (no attempt to fetch 'nosuch' from the Hub)."""
    out = tmp_path / "out"
    common = [*TINY, *FEEDBACK_TINY, "--output_dir", str(out), "--dataset_name", "testbed:prompts"]
    _refused(
        capsys,
        ["feedback", *common, "--reward_funcs", "nosuch"],
        r"^hf-align feedback: unknown reward_funcs entry 'nosuch': expected 'testbed'",
    )
    assert not out.exists()
    argv = ["feedback", *common, "--reward_funcs", "testbed", "hf_align.testbed.reward", "--num_quantiles", "3"]
    assert main(argv) == 0
    from hf_align.data_pool import DataPool
    from hf_align.testbed import reward

    pool = DataPool.load(out / "data_pool")
    assert len(pool) == 4 * 2
    once = reward(pool.prompt.tolist(), pool.completion.tolist())
    assert pool.score.tolist() == [2 * r for r in once]  # both specs are the testbed reward: the sum of two
