"""One file-writing rule: everything hf-align writes ends with the mode a plain ``open()``/``mkdir`` gives under the
current umask (``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders) — masks, scores, pools, JSON, α's,
plots, merge outputs (their shards, copied side files, card) and a trainer's saved model (weights through
transformers' save and ours). Each umask runs in a subprocess, so the test process keeps its own."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest


WRITERS = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch

    out = Path(sys.argv[1])
    source = Path(sys.argv[2])
    from hf_align import testbed
    from hf_align.data_pool import DataPool
    from hf_align.hub import build_model_card, write_model_card
    from hf_align.io import atomic_dir, atomic_file, save_tensors, write_json
    from hf_align.masks import NeuronMask
    from hf_align.merging import linear_plan, merge_models
    from hf_align.merging.adaptive import LearnedAlphas
    from hf_align.scores import save_scores

    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    mask = NeuronMask.random(model, 0.25, "row", seed=0)
    mask.save(out / "mask")
    save_scores(out / "scores", {"a.weight": torch.rand(4)}, meta={"method": "t"})
    write_json(out / "json" / "x.json", {"a": 1})
    save_tensors(out / "tensors" / "t.safetensors", {"a": torch.ones(2)})
    with atomic_file(out / "plain.txt", "w") as handle:
        handle.write("x")
    with atomic_dir(out / "atomic_dir") as tmp:
        (tmp / "inside.txt").write_text("x")
    pool = DataPool(num_quantiles=2)
    pool.add(["p", "q"], ["c", "d"], scores=[0.1, 0.9])
    pool.save(out / "pool")
    LearnedAlphas(0.2, 0.2, "block2", 2, [0.1, 0.2], 0.3, {"lm_head": None}).save(out / "alphas")
    linear_plan(["a"], 0.5).save(out / "plan.json")
    try:
        from hf_align.plots import plot_selection_heatmap

        plot_selection_heatmap(mask, out / "plots" / "mask.png")
    except ImportError:
        pass
    merge_models(source / "base", source / "aligned", out / "merged", alpha=0.5, progress=False)

    from hf_align.trainers import NPOConfig, NPOTrainer

    tok = testbed.load_tokenizer()
    args = NPOConfig(output_dir=str(out / "npo"), per_device_train_batch_size=2, max_steps=1, save_strategy="steps",
                     save_steps=1, report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0,
                     disable_tqdm=True)
    trainer = NPOTrainer(model, args=args, train_dataset=testbed.forget_dataset(2, seed=0), processing_class=tok,
                         neuron_mask=mask)
    trainer.train()
    trainer.save_model()

    # a plain TRL trainer as the Aligner commands run it: PEFT's adapter save, our JSON-args hook after each save
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    from hf_align.callbacks import JsonTrainingArgsCallback
    from hf_align.callbacks.json_training_args import replace_training_args_pickle
    from hf_align.peft_tuners import AlignerConfig

    aligner = get_peft_model(testbed.load_random_tiny("llama", hidden_size=32, num_layers=2),
                             AlignerConfig(num_tokens=2, start_layer=1))
    args = SFTConfig(output_dir=str(out / "aligner"), per_device_train_batch_size=2, max_steps=1, save_steps=1,
                     save_strategy="steps", report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0,
                     disable_tqdm=True, max_length=32)
    sft = SFTTrainer(model=aligner, args=args, train_dataset=testbed.sft_dataset(2, seed=0), processing_class=tok,
                     callbacks=[JsonTrainingArgsCallback()])
    sft.train()
    sft.save_model()
    replace_training_args_pickle(out / "aligner", args)
    """
)


def _umask_run(tmp_path, umask, source):
    out = tmp_path / f"out{umask:03o}"
    out.mkdir()
    script = f"import os; os.umask({umask}); exec(open({str(tmp_path / 'writers.py')!r}).read())"
    (tmp_path / "writers.py").write_text(WRITERS)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", script, str(out), str(source)], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Two tiny models whose side files have modes a copy must not keep (0600 and 0755)."""
    from hf_align.testbed import load_random_tiny, load_tokenizer

    root = tmp_path_factory.mktemp("sources")
    for seed, name in ((0, "base"), (1, "aligned")):
        load_random_tiny("llama", hidden_size=32, num_layers=2, seed=seed).save_pretrained(root / name)
    load_tokenizer().save_pretrained(root / "aligned")
    os.chmod(root / "aligned" / "config.json", 0o600)
    os.chmod(root / "aligned" / "tokenizer_config.json", 0o755)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_everything_written_gets_the_umask_mode(tmp_path, source, umask):
    out = _umask_run(tmp_path, umask, source)
    wrong, seen = [], set()
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            expected = (0o777 if name in dirs else 0o666) & ~umask
            seen.add(name)
            if mode != expected:
                wrong.append(f"{os.path.relpath(path, out)}: {mode:o} (expected {expected:o})")
    assert not wrong, "\n".join(wrong)
    # what the run must have written, so a writer that silently wrote nothing cannot pass
    needed = {"neuron_mask.safetensors", "neuron_scores.safetensors", "x.json", "t.safetensors", "plain.txt",
              "inside.txt", "pool.parquet", "ama_alphas.safetensors", "plan.json", "model.safetensors", "config.json",
              "tokenizer_config.json", "README.md", "merge_plan.json", "training_args.json", "neuron_deltas.safetensors",
              "adapter_model.safetensors"}  # fmt: skip
    assert needed <= seen, sorted(needed - seen)


def test_mode_helpers_follow_the_umask_of_the_process(tmp_path):
    code = (
        "import os, json; os.umask(0o027); from hf_align.io import file_mode, dir_mode, current_umask;"
        "print(json.dumps([file_mode(), dir_mode(), current_umask(), oct(os.umask(0o027))]))"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [0o640, 0o750, 0o027, "0o27"]
