"""Distributed equivalence: DDP on 2 CPU processes (gloo) vs 1 process with the same global batch.

One worker script (written to ``tmp_path``) trains five tiny-Llama runs for 3 steps each:

* ``MaskedDPOTrainer`` with a random 20 % row ``NeuronMask`` and a ``rejected_weights`` column,
* ``NPOTrainer`` (sequence level, live reference copy, no retain set: retain draws depend on the rank by design),
  and at token level on completions of different lengths (each rank's loss divides by every rank's token count),
* ``trl.DPOTrainer`` with ``MaskAccumulationCallback(method="gradient")``,
* ``AdaptiveMergeTrainer`` (layerwise α's of two tiny Llamas; compared: losses and the raw α parameters).

It runs once as a plain ``python`` process with ``per_device_train_batch_size=4`` and once under
``torch.distributed.run --nproc_per_node 2`` with ``per_device_train_batch_size=2`` (global batch 4 in both).
Each rank saves its losses, the final effective weights (``merged_state_dict`` when a mask is attached) and the
mask-accumulation scores as safetensors + JSON.

Why ``torch.distributed.run`` and not ``accelerate launch --num_processes 2 --cpu``: on CPU, accelerate's launcher
takes its "simple" path, which starts ONE process unless an MPI hostfile is given (checked with accelerate 1.15);
the run would silently be single-process. ``test_ddp_run_really_had_two_processes`` guards against that here.

Tolerances (fp32; the only difference is the order of floating-point reductions: DDP averages two half-batch
gradients with an all-reduce, the single process averages one batch of 4):

* losses: ``abs 1e-5`` (observed ≤ 1e-6);
* weights: ``atol 5e-5`` = 0.5 % of one Adam step at lr 1e-2 (observed ≤ 5e-6 on lm_head of full DPO, ≤ 2e-7
  with a mask); training must move them by more than 100× that, so the tolerance cannot hide a wrong run;
* scores: ``rtol 1e-4, atol 1e-6``;
* the two DDP ranks must agree bitwise (weights and scores): DDP keeps replicas identical.
"""

import json
import math
import sys
import textwrap

import pytest
import torch
from launch_helpers import WORKER_EPILOGUE, run_launch
from safetensors.torch import load_file


CASES = ("masked_dpo", "npo", "npo_token", "mask_accumulation", "adaptive_merge")
WEIGHT_ATOL = 5e-5
LOSS_ATOL = 1e-5
AMA_START = math.log(0.2 / 0.8)  # AdaptiveMergeConfig's init_val 0.2 as a raw logit

WORKER = (
    textwrap.dedent(
        """
    import copy, json, os, sys

    import torch
    from safetensors.torch import save_file

    out_dir, per_device = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)

    from trl import DPOConfig, DPOTrainer

    from hf_align import testbed
    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.masks import NeuronMask
    from hf_align.sparse_update import merged_state_dict
    from hf_align.token_weights import char_span_weights
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer, NPOConfig, NPOTrainer

    tok = testbed.load_tokenizer()
    common = dict(
        per_device_train_batch_size=per_device, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant", gradient_checkpointing=False, beta=0.1,
    )


    def model():
        return testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)


    def dump(name, trainer, tensors):
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, f"{out_dir}/{name}.rank{rank}.safetensors")
        history = [e for e in trainer.state.log_history if "loss" in e]
        info = {
            "losses": [e["loss"] for e in history],
            "epochs": [e["epoch"] for e in history],
            "world_size": trainer.accelerator.num_processes,
            "ddp": type(trainer.model_wrapped).__name__,
        }
        with open(f"{out_dir}/{name}.rank{rank}.json", "w") as f:
            json.dump(info, f)


    pairs = testbed.preference_dataset(12, seed=0)
    weighted = pairs.map(
        char_span_weights(tok, "rejected_wrong_positions", positions=True, outside=0.25)
    ).remove_columns("rejected_wrong_positions")
    m = model()
    trainer = MaskedDPOTrainer(
        m, args=MaskedDPOConfig(output_dir=f"{out_dir}/masked_dpo", **common), train_dataset=weighted,
        processing_class=tok, neuron_mask=NeuronMask.random(m, 0.2, "row", seed=0),
    )
    trainer.train()
    dump("masked_dpo", trainer, merged_state_dict(trainer.accelerator.unwrap_model(trainer.model)))

    # NPO at both levels; the completions differ in length, so at token level the ranks count different tokens
    for name, level in (("npo", "sequence"), ("npo_token", "token")):
        m = model()
        trainer = NPOTrainer(
            m, ref_model=copy.deepcopy(m), args=NPOConfig(output_dir=f"{out_dir}/{name}", npo_level=level, **common),
            train_dataset=testbed.forget_dataset(12, seed=0), processing_class=tok,
        )
        trainer.train()
        dump(name, trainer, trainer.accelerator.unwrap_model(trainer.model).state_dict())

    m = model()
    callback = MaskAccumulationCallback(method="gradient", granularity="row", save_to_checkpoints=False)
    trainer = DPOTrainer(
        m, ref_model=copy.deepcopy(m), args=DPOConfig(output_dir=f"{out_dir}/mask_accumulation", **common),
        train_dataset=pairs.remove_columns("rejected_wrong_positions"), processing_class=tok, callbacks=[callback],
    )
    trainer.train()
    tensors = {f"weight/{k}": v for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    tensors.update({f"score/{k}": v for k, v in callback.scores().items()})
    dump("mask_accumulation", trainer, tensors)
    from hf_align.trainers import AdaptiveMergeConfig, AdaptiveMergeTrainer

    args = AdaptiveMergeConfig(
        output_dir=f"{out_dir}/adaptive_merge", mask_level="layerwise", max_length=64, weight_decay=0.0,
        **{**{k: v for k, v in common.items() if k != "beta"}, "learning_rate": 5e-2},
    )
    aligned = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, seed=1)
    trainer = AdaptiveMergeTrainer(
        aligned, base_model=model(), args=args, train_dataset=testbed.sft_dataset(12, seed=1), processing_class=tok
    )
    trainer.train()
    dump("adaptive_merge", trainer, {"alpha/blocks": trainer.alphas.blocks, "alpha/head": trainer.alphas.head})
    """
    )
    + WORKER_EPILOGUE
)


def _run(cmd, out):
    return run_launch(cmd, out, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    script = root / "worker.py"
    script.write_text(WORKER)
    single = _run([sys.executable, str(script), str(root / "single"), "4"], root / "single")
    ddp = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(root / "ddp"),
            "2",
        ],
        root / "ddp",
    )
    return single, ddp


def _load(folder, case, rank=0):
    info = json.loads((folder / f"{case}.rank{rank}.json").read_text())
    return info, load_file(folder / f"{case}.rank{rank}.safetensors")


def _initial_weights():
    from hf_align import testbed

    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ddp_run_really_had_two_processes(runs):
    single, ddp = runs
    for case in CASES:
        one, _ = _load(single, case)
        assert one["world_size"] == 1 and one["ddp"] != "DistributedDataParallel"
        for rank in (0, 1):
            info, _ = _load(ddp, case, rank)
            assert info["world_size"] == 2 and info["ddp"] == "DistributedDataParallel", (case, info)
            # 12 rows, global batch 4: step 3 ends the epoch only if each rank saw its own half of every batch
            assert info["epochs"] == pytest.approx([1 / 3, 2 / 3, 1.0])
        assert one["epochs"] == pytest.approx([1 / 3, 2 / 3, 1.0])


@pytest.mark.parametrize("case", CASES)
def test_same_losses(runs, case):
    single, ddp = runs
    one, _ = _load(single, case)
    two, _ = _load(ddp, case)
    assert len(one["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], abs=LOSS_ATOL)
    assert abs(one["losses"][-1] - one["losses"][0]) > 100 * LOSS_ATOL  # it trained


@pytest.mark.parametrize("case", CASES)
def test_same_weights_and_identical_replicas(runs, case):
    single, ddp = runs
    _, one = _load(single, case)
    _, two = _load(ddp, case)
    _, two_rank1 = _load(ddp, case, rank=1)
    assert set(one) == set(two) == set(two_rank1)
    init = _initial_weights()
    moved = 0.0
    for name, value in one.items():
        torch.testing.assert_close(two_rank1[name], two[name], rtol=0, atol=0, msg=f"ranks differ: {name}")
        if name.startswith("score/"):
            torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6, msg=name)
            continue
        if name.startswith("alpha/"):  # AdaptiveMerge: the raw α parameters (they moved from their start)
            torch.testing.assert_close(two[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)
            moved = max(moved, (value - AMA_START).abs().max().item())
            continue
        torch.testing.assert_close(two[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)
        moved = max(moved, (value - init[name.removeprefix("weight/")]).abs().max().item())
    assert moved > 100 * WEIGHT_ATOL


def test_masked_dpo_keeps_unselected_rows_under_ddp(runs):
    from hf_align import testbed
    from hf_align.masks import NeuronMask

    single, ddp = runs
    mask = NeuronMask.random(testbed.load_random_tiny("llama", hidden_size=32, num_layers=2), 0.2, "row", seed=0)
    init = _initial_weights()
    for folder in (single, ddp):
        _, weights = _load(folder, "masked_dpo")
        changed_rows = 0
        for name, value in weights.items():
            if name not in mask.masks:
                assert torch.equal(value, init[name]), f"{name} has no mask but changed"
                continue
            rows = mask.masks[name].bool()
            assert torch.equal(value[~rows], init[name][~rows]), f"unselected rows of {name} changed"
            changed_rows += int((value[rows] != init[name][rows]).any(dim=-1).sum())
        assert changed_rows > 0


def test_mask_accumulation_scores_are_nonzero_and_match(runs):
    single, ddp = runs
    _, one = _load(single, "mask_accumulation")
    _, two = _load(ddp, "mask_accumulation")
    scores = [name for name in one if name.startswith("score/")]
    assert len(scores) >= 10
    assert all(one[name].sum() > 0 for name in scores)
    # Σ|g| over 3 steps: a rank-local (not all-reduced) gradient would differ from the batch-of-4 gradient by far
    # more than the tolerance; the single-process scores are the reference.
    for name in scores:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
