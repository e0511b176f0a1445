"""Quiet by default: each README command family, run as a user runs it (a subprocess on the testbed), prints no
notice from an optional backend it does not use; ``--verbose`` shows them. The filters drop only those messages."""

import logging
import os
import subprocess
import sys
import warnings

import pytest

from hf_align import quiet
from hf_align.testbed import MODEL_DIR


NOISE = (
    "gemm_4bit_forward",
    "kernels-community",
    "Setting accelerator to CPU",
    "`gradient_checkpointing` is deprecated",
    "`is_gradient_checkpointing` is deprecated",
)
TRAIN = ["--use_cpu", "true", "--bf16", "false", "--max_steps", "1", "--report_to", "none"]
COMMANDS = {
    "masked-dpo": ["--model_name_or_path", "testbed", "--dataset_name", "testbed:preference", *TRAIN,
                   "--gradient_checkpointing", "false", "--output_dir", "out"],
    "eval": ["--model_name_or_path", "testbed", "--dataset_name", "testbed:prompts", "--reward", "testbed",
             "--num_prompts", "4", "--max_new_tokens", "4", "--output_file", "eval.json"],
    "merge": ["--base_model_name_or_path", "testbed", "--model_name_or_path", "testbed", "--alpha", "0.5",
              "--output_dir", "merged"],
    "select-mask": ["--init", str(MODEL_DIR), "--trained", str(MODEL_DIR), "--neuron_mask_ratio", "0.5",
                    "--output_dir", "mask"],
    "label-tokens": ["--dataset_name", "testbed:preference", "--tokenizer", "testbed", "--max_rows", "4",
                     "--output", "labeled.jsonl"],
    "quickstart": ["--max_steps", "2", "--warmup_steps", "2", "--num_pairs", "32", "--eval_prompts", "8",
                   "--output_dir", "qs"],
    "pipeline": ["--config", "allo/pipeline_testbed", "--output_dir", "allo", "--set", "max_steps=2"],
}  # fmt: skip
BARS = {"masked-dpo": "1/1", "eval": "sampling policy", "merge": "merging", "select-mask": "selecting",
        "label-tokens": "Labeling key tokens", "quickstart": "2/2",
        "pipeline": "2/2"}  # fmt: skip


def _run(argv: list[str], cwd, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", quiet.VERBOSE_ENV)}
    return subprocess.run(
        [sys.executable, "-m", "hf_align.cli", *argv],
        cwd=cwd,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


SLOW = {"quickstart", "pipeline"}  # 25-35 s each on 2 busy cores (several training runs)


@pytest.mark.parametrize(
    "command", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in sorted(COMMANDS)]
)
def test_readme_command_families_print_no_backend_noise_and_show_progress(command, tmp_path):
    result = _run([command, *COMMANDS[command]], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not [noise for noise in NOISE if noise in output], output[-3000:]
    assert BARS[command] in result.stderr  # a bar by default ...
    if command == "label-tokens":  # ... and none with --disable_tqdm (datasets' bar; the others: test_progress.py)
        result = _run([command, *COMMANDS[command], "--disable_tqdm", "--overwrite"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert BARS[command] not in result.stderr and "%|" not in result.stderr


def test_verbose_shows_the_deprecation_and_a_no_op_run_says_so_on_the_console(tmp_path):
    """A run at learning rate 0 trains nothing: the one line reaches the user's terminal (not only a log record)."""
    lr0 = ["--learning_rate", "0", "--logging_steps", "1"]
    result = _run(["masked-dpo", *COMMANDS["masked-dpo"], *lr0, "--verbose", "--disable_tqdm", "true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`gradient_checkpointing` is deprecated" in result.stderr
    assert "%|" not in result.stderr  # the Trainer's bar too is off
    (line,) = [line for line in result.stderr.splitlines() if "no trainable parameter changed" in line]
    assert line.startswith("hf-align: no trainable parameter changed in the first 1 step(s)"), line


def test_filters_drop_only_the_backends_notices_and_verbose_replays_them(caplog, monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    saved_filters = list(warnings.filters)
    quiet.show_backend_notices()  # a clean start: whatever `import hf_align` installed (and dropped) is gone
    monkeypatch.delenv(quiet.VERBOSE_ENV)
    caplog.clear()
    deepspeed = logging.getLogger("DeepSpeed")  # propagate=False once DeepSpeed is imported: caplog's handler on it
    if not deepspeed.propagate:
        deepspeed.addHandler(caplog.handler)
    try:
        quiet.quiet_backend_notices()
        bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
        with caplog.at_level(logging.WARNING):
            bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline")
            bnb.warning("a bitsandbytes warning about the user's own 4-bit run")
            logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
        assert [r.getMessage() for r in caplog.records] == ["a bitsandbytes warning about the user's own 4-bit run"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            quiet.ignore_backend_warnings()
            warnings.warn_explicit("`gradient_checkpointing` is deprecated ...", FutureWarning, "x.py", 1,
                                   module="transformers.training_args")  # fmt: skip
            warnings.warn_explicit("`gradient_checkpointing` is deprecated ...", FutureWarning, "x.py", 1,
                                   module="my_script")  # fmt: skip
        assert [str(w.message) for w in caught] == ["`gradient_checkpointing` is deprecated ..."]  # my_script's
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            quiet.show_backend_notices()
        replayed = [r.getMessage() for r in caplog.records]
        assert replayed == [
            "Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please ...",
            "Setting accelerator to CPU. If you have GPU ...",
        ]
        assert os.environ[quiet.VERBOSE_ENV] == "1"  # inherited by the processes accelerate launch starts
    finally:
        deepspeed.removeHandler(caplog.handler)
        warnings.filters[:] = saved_filters
        os.environ.pop(quiet.VERBOSE_ENV, None)
        quiet.quiet_backend_notices()


@pytest.mark.parametrize("trainer_name", ["MaskedDPOTrainer", "NPOTrainer"])
def test_a_masked_trainer_that_loads_the_model_itself_does_not_say_its_init_kwargs_were_ignored(
    trainer_name, tmp_path, caplog
):
    """The masked trainers load a model path themselves (the mask is checked against it) with ``model_init_kwargs``;
    TRL then saw an instance plus those kwargs and warned they "will be ignored" (they were not). The recipe's
    kwargs stay on the saved arguments."""
    from hf_align import testbed, trainers
    from hf_align.masks import NeuronMask

    tb = testbed.load()
    config = getattr(trainers, trainer_name.replace("Trainer", "Config"))
    args = config(**testbed.quiet_training_args(output_dir=str(tmp_path), model_init_kwargs={"dtype": "float32"}))
    data = (
        tb.preference_dataset(8) if trainer_name == "MaskedDPOTrainer" else testbed.forget_dataset().select(range(8))
    )
    mask = NeuronMask.random(tb.model, 0.1, "row", seed=0)
    with caplog.at_level(logging.WARNING):
        trainer = getattr(trainers, trainer_name)(
            model=str(MODEL_DIR), args=args, train_dataset=data, processing_class=tb.tokenizer, neuron_mask=mask
        )
    assert not [r for r in caplog.records if "model_init_kwargs" in r.getMessage()]
    assert trainer.args.model_init_kwargs == {"dtype": "float32"}
