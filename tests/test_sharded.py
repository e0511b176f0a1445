"""Sharded training on 2 CPU processes (gloo): DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 vs one process.

One worker script (written to ``tmp_path``) runs several configurations back to back, once as a plain ``python``
process with ``per_device_train_batch_size=4`` and once per engine under ``accelerate launch --config_file`` with
2 processes and ``per_device_train_batch_size=2`` (the same global batch of 4). A launch costs 30-50 s of start-up,
so each engine is launched once. Every configuration writes a JSON record; rank 0 also keeps what it saved. The
parent compares:

* ``row``: ``MaskedDPOTrainer``, a 10 % row mask, a ``rejected_weights`` column, the deltas-off reference (no second
  model), weight decay 0.1; ``save_model`` → merged checkpoint;
* ``element``: a 10 % element mask (decoder-layer weights) with an explicit ``ref_model``; ``save_merged=False`` →
  delta-only checkpoint;
* ``resume``: row mask, 4 steps with a checkpoint at step 2, then a second trainer resumes from that checkpoint;
* ``dpo``: plain ``trl.DPOTrainer`` (the control: the harness itself is sound);
* ``gradient`` / ``weight_diff`` / ``gradient_element``: ``trl.DPOTrainer`` + ``MaskAccumulationCallback`` (row
  scores; element scores for the gradient method; weight_diff also into a step-2 checkpoint).

The models are a tiny random Llama saved to disk by the parent and loaded *by path* in the worker after the config
is built, so under ZeRO-3 (``zero3_init_flag``) they are partitioned at load time, as a user's would be.

Tolerances (fp32; only the order of reductions differs): losses 1e-5 abs, effective weights 5e-5 abs (training
moves them by more than 100x that), scores rtol 1e-4; frozen entries must be bit-identical to the initial weights.

Every run must prove it was sharded: accelerate's distributed type, 2 processes, the wrapper (``DeepSpeedEngine``,
DTensor parameters) and, for ZeRO-3/FSDP2, fewer parameter elements per rank than the model has (ZeRO-2: fewer
optimizer-state elements than trainable elements). FSDP on CPU needs accelerate's state relabelled to MULTI_GPU
(a test-only helper, see ``/work/shared/DISTRIBUTED_CPU.md``); DeepSpeed's optional shm op build is skipped.
DeepSpeed is a dev dependency: if it cannot be imported these tests fail.
"""

import textwrap
from pathlib import Path

import pytest
import torch
from launch_helpers import WORKER_EPILOGUE, WORKER_PRELUDE, EngineLaunches, read_info
from safetensors.torch import load_file


LOSS_ATOL = 1e-5
WEIGHT_ATOL = 5e-5
ENGINES = ("zero2", "zero3", "fsdp2")
PORTS = {"zero2": 29631, "zero3": 29632, "fsdp2": 29633}

WORKER = (
    WORKER_PRELUDE
    + textwrap.dedent(
        """
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from hf_align import testbed
    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.masks import NeuronMask, parameter_shape
    from hf_align.sparse_update import merged_state_dict
    from safetensors.torch import save_file
    from hf_align.token_weights import char_span_weights
    from hf_align.trainers import MaskedDPOConfig, MaskedDPOTrainer

    model_dir = f"{data}/model"
    tok = testbed.load_tokenizer()
    rank = int(os.environ.get("RANK", "0"))
    pairs = testbed.preference_dataset(16, seed=0)
    weighted = pairs.map(
        char_span_weights(tok, "rejected_wrong_positions", positions=True, outside=0.25)
    ).remove_columns("rejected_wrong_positions")
    plain = pairs.remove_columns("rejected_wrong_positions")


    class CountSteps(TrainerCallback):  # steps this trainer ran (a resumed log history also holds the old ones)
        def __init__(self):
            self.n = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.n += 1


    def config(cls, name, **overrides):
        kwargs = dict(
            output_dir=f"{out}/{name}", per_device_train_batch_size=per_device, max_steps=3, learning_rate=1e-2,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True,
            seed=0, lr_scheduler_type="constant", beta=0.1, weight_decay=0.1, dataloader_num_workers=0,
        )
        kwargs.update(overrides)
        return on_engine(cls(**kwargs))


    def optimizer_numel(trainer):
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
            if hasattr(opt, attr):
                return sum(t.numel() for t in getattr(opt, attr))
        return sum(local_numel(p) for group in opt.param_groups for p in group["params"])


    def record(name, trainer, **extra):
        model = trainer.accelerator.unwrap_model(trainer.model)
        params = dict(model.named_parameters())
        history = [e for e in trainer.state.log_history if "loss" in e]
        info = {
            "losses": [e["loss"] for e in history],
            "grad_norms": [e.get("grad_norm") for e in history],
            "steps": [e["step"] for e in history],
            "distributed_type": str(trainer.accelerator.state.distributed_type),
            "num_processes": trainer.accelerator.num_processes,
            "wrapper": type(trainer.model_wrapped).__name__,
            "dtensor": any(type(p).__name__ == "DTensor" or hasattr(p, "device_mesh") for p in params.values()),
            "local_numel": sum(local_numel(p) for p in params.values()),
            "full_numel": sum(math.prod(parameter_shape(p)) for p in params.values()),
            "trainable": sorted(n for n, p in params.items() if p.requires_grad),
            "trainable_numel": sum(math.prod(parameter_shape(p)) for p in params.values() if p.requires_grad),
            "optimizer_numel": optimizer_numel(trainer),
            "reference": type(trainer.ref_model).__name__,
            "steps_run": next(c.n for c in trainer.callback_handler.callbacks if isinstance(c, CountSteps)),
            **extra,
        }
        with open(f"{out}/{name}.rank{rank}.json", "w") as f:
            json.dump(info, f)


    row_mask, element_mask = NeuronMask.load(f"{data}/row_mask"), NeuronMask.load(f"{data}/element_mask")

    # MaskedDPO, row mask, token weights, deltas-off reference; merged save
    t = MaskedDPOTrainer(model_dir, args=config(MaskedDPOConfig, "row"), train_dataset=weighted,
                         processing_class=tok, neuron_mask=row_mask,
                         callbacks=[CountSteps()])
    t.train()
    t.save_model(f"{out}/row/final")
    record("row", t)
    if engine == "zero3":  # what the Trainer hands _save when stage3_gather_16bit_weights_on_model_save is off
        try:
            t._save(f"{out}/not_gathered", state_dict={})
            refusal = None
        except ValueError as error:
            refusal = str(error)
        with open(f"{out}/not_gathered_refusal.rank{rank}.json", "w") as f:
            json.dump({"refusal": refusal}, f)
    merged = merged_state_dict(t.accelerator.unwrap_model(t.model))  # the public API, on every rank
    save_file({k: v.contiguous() for k, v in merged.items()}, f"{out}/row_merged.rank{rank}.safetensors")

    # element mask, explicit reference model (a path: built like TRL's own reference); delta-only save
    t = MaskedDPOTrainer(model_dir, ref_model=model_dir, args=config(MaskedDPOConfig, "element", save_merged=False),
                         train_dataset=weighted, processing_class=tok, neuron_mask=element_mask,
                         callbacks=[CountSteps()])
    t.train()
    t.save_model(f"{out}/element/final")
    record("element", t)

    # resume: 4 steps with checkpoints every 2, then a fresh trainer resumes from checkpoint-2
    t = MaskedDPOTrainer(model_dir, args=config(MaskedDPOConfig, "full4", max_steps=4, save_strategy="steps",
                         save_steps=2), train_dataset=weighted, processing_class=tok, neuron_mask=row_mask,
                         callbacks=[CountSteps()])
    t.train()
    t.save_model(f"{out}/full4/final")
    record("full4", t)
    t = MaskedDPOTrainer(model_dir, args=config(MaskedDPOConfig, "resumed", max_steps=4), train_dataset=weighted,
                         processing_class=tok, neuron_mask=row_mask,
                         callbacks=[CountSteps()])
    t.train(resume_from_checkpoint=f"{out}/full4/checkpoint-2")
    t.save_model(f"{out}/resumed/final")
    record("resumed", t)

    # ZeRO-3 refuses a mask on lm_head (TRL's fused head reads that weight outside its forward)
    if engine == "zero3":
        try:
            MaskedDPOTrainer(model_dir, args=config(MaskedDPOConfig, "lm_head"), train_dataset=weighted,
                             processing_class=tok, neuron_mask=NeuronMask.load(f"{data}/all_mask"))
            refusal = None
        except ValueError as error:
            refusal = str(error)
        with open(f"{out}/lm_head_refusal.rank{rank}.json", "w") as f:
            json.dump({"refusal": refusal}, f)

    else:  # an element mask on every parameter: lm_head, embeddings and norms get deltas too
        t = MaskedDPOTrainer(model_dir, args=config(MaskedDPOConfig, "all_element"), train_dataset=weighted,
                             processing_class=tok, neuron_mask=NeuronMask.load(f"{data}/all_mask"),
                             callbacks=[CountSteps()])
        t.train()
        t.save_model(f"{out}/all_element/final")
        record("all_element", t)

    # control: plain trl.DPOTrainer, TRL builds the reference
    t = DPOTrainer(model_dir, args=config(DPOConfig, "dpo"), train_dataset=plain, processing_class=tok,
                   callbacks=[CountSteps()])
    t.train()
    t.save_model(f"{out}/dpo/final")
    record("dpo", t)

    # MaskAccumulationCallback, both methods
    for name in ("gradient", "weight_diff", "gradient_element"):
        # weight_diff also scores into the step-2 checkpoint (rank 0 writes, every rank joins the gathers)
        saves = dict(save_strategy="steps", save_steps=2) if name == "weight_diff" else {}
        method, granularity = name.removesuffix("_element"), "element" if name.endswith("_element") else "row"
        callback = MaskAccumulationCallback(method=method, granularity=granularity, save_to_checkpoints=bool(saves))
        t = DPOTrainer(model_dir, args=config(DPOConfig, name, **saves), train_dataset=plain, processing_class=tok,
                       callbacks=[callback, CountSteps()])
        t.train()
        record(name, t)
    """
    )
    + WORKER_EPILOGUE
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hf_align import testbed
    from hf_align.architectures import ROW_TARGET
    from hf_align.masks import NeuronMask

    root = tmp_path_factory.mktemp("sharded")
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    model.save_pretrained(root / "model")
    NeuronMask.random(model, 0.1, "row", seed=0).save(root / "row_mask")
    NeuronMask.random(model, 0.1, "element", target=ROW_TARGET, seed=1).save(root / "element_mask")
    NeuronMask.random(model, 0.1, "element", seed=2).save(root / "all_mask")  # lm_head too
    (root / "worker.py").write_text(WORKER)
    return root


@pytest.fixture(scope="module")
def launches(data):
    return EngineLaunches(data, PORTS, timeout=420)


@pytest.fixture(scope="module")
def single(launches):
    return launches.single()


_info = read_info


def _initial(data):
    return load_file(data / "model" / "model.safetensors")


CONFIGS = ("row", "element", "full4", "resumed", "dpo", "gradient", "weight_diff", "gradient_element")


@pytest.mark.parametrize("engine", ENGINES)
def test_really_ran_sharded(data, single, launches, engine):
    sharded = launches.engine(engine)
    for name in CONFIGS:
        one = _info(single, name)
        assert one["num_processes"] == 1 and one["distributed_type"] == "DistributedType.NO", (name, one)
        for rank in (0, 1):
            info = _info(sharded, name, rank)
            assert info["num_processes"] == 2, (name, info)
            assert info["full_numel"] == one["full_numel"]
            if engine == "fsdp2":
                assert info["distributed_type"] == "DistributedType.FSDP" and info["dtensor"], (name, info)
                assert info["wrapper"] != "DistributedDataParallel"
            else:
                assert info["distributed_type"] == "DistributedType.DEEPSPEED", (name, info)
                assert info["wrapper"] == "DeepSpeedEngine", (name, info)
            if engine == "zero2":  # parameters are replicated; gradients and optimizer state are partitioned
                assert info["local_numel"] == info["full_numel"]
                assert info["optimizer_numel"] < info["trainable_numel"], (name, info)
            else:
                assert info["local_numel"] < info["full_numel"], (name, info)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", CONFIGS)
def test_same_losses_and_grad_norms(data, single, launches, engine, name):
    sharded = launches.engine(engine)
    one, two = _info(single, name), _info(sharded, name)
    assert two["steps"] == one["steps"] and len(one["losses"]) >= 2
    assert two["losses"] == pytest.approx(one["losses"], abs=LOSS_ATOL)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4, abs=1e-7)
    assert _info(sharded, name, rank=1)["losses"] == two["losses"]


@pytest.mark.parametrize("engine", ENGINES)
def test_only_deltas_train_and_carry_optimizer_state(data, single, launches, engine):
    sharded = launches.engine(engine)
    for name in ("row", "element", "full4", "resumed"):
        one, two = _info(single, name), _info(sharded, name)
        assert one["trainable"] and all(n.endswith(".delta") for n in one["trainable"])
        assert two["trainable"] == one["trainable"] and two["trainable_numel"] == one["trainable_numel"]
        assert one["trainable_numel"] < 0.2 * one["full_numel"]
        assert one["optimizer_numel"] == one["trainable_numel"]  # one process: the optimizer holds the deltas only
        total = sum(_info(sharded, name, rank)["optimizer_numel"] for rank in (0, 1))
        assert one["trainable_numel"] <= total <= one["trainable_numel"] + 64  # the deltas' shards (+ padding)


@pytest.mark.parametrize("engine", ENGINES)
def test_deltas_off_reference_is_no_second_model(data, single, launches, engine):
    sharded = launches.engine(engine)
    for folder in (single, sharded):
        assert _info(folder, "row")["reference"] == "DeltasOffReference"  # not wrapped in an engine of its own
        explicit = _info(folder, "element")["reference"]
        wrapped = {"zero2": "DeepSpeedEngine", "zero3": "DeepSpeedEngine", "fsdp2": "FSDPLlamaForCausalLM"}
        assert explicit == (wrapped[engine] if folder == sharded else "LlamaForCausalLM")


def test_zero3_save_without_gathered_weights_is_refused(data, single, launches):
    sharded = launches.engine("zero3")
    refusal = _info(sharded, "not_gathered_refusal")["refusal"]
    assert refusal is not None and "zero3_save_16bit_model: true" in refusal
    assert not (sharded / "not_gathered" / "model.safetensors").exists()


def _assert_frozen_rows_identical(merged, initial, mask):
    changed = 0
    for key, value in merged.items():
        if key not in mask.masks:
            assert torch.equal(value, initial[key]), f"{key} has no mask but changed"
            continue
        selected = mask.masks[key]
        assert torch.equal(value[~selected], initial[key][~selected]), f"frozen entries of {key} changed"
        changed += int((value[selected] != initial[key][selected]).sum())
    assert changed > 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ("row", "full4", "resumed", "dpo"))
def test_same_merged_checkpoint(data, single, launches, engine, name):
    from hf_align.masks import NeuronMask

    sharded = launches.engine(engine)
    one = load_file(single / name / "final" / "model.safetensors")
    two = load_file(sharded / name / "final" / "model.safetensors")
    initial = _initial(data)
    assert set(one) == set(two) == set(initial)
    moved = 0.0
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)
        moved = max(moved, (value - initial[key]).abs().max().item())
    assert moved > 100 * WEIGHT_ATOL
    if name != "dpo":
        row_mask = NeuronMask.load(data / "row_mask")
        _assert_frozen_rows_identical(two, initial, row_mask)
        _assert_frozen_rows_identical(one, initial, row_mask)


@pytest.mark.parametrize("engine", ENGINES)
def test_same_delta_only_checkpoint(data, single, launches, engine):
    from hf_align.masks import NeuronMask
    from hf_align.sparse_update import DELTAS_FILE

    sharded = launches.engine(engine)
    for folder in (single, sharded):
        assert not (folder / "element" / "final" / "model.safetensors").exists()
        assert NeuronMask.load(folder / "element" / "final").masks.keys() == (
            NeuronMask.load(data / "element_mask").masks.keys()
        )
    one = load_file(single / "element" / "final" / DELTAS_FILE)
    two = load_file(sharded / "element" / "final" / DELTAS_FILE)
    assert set(one) == set(two) and len(one) > 5
    for key, value in one.items():
        assert value.abs().max() > 100 * WEIGHT_ATOL
        torch.testing.assert_close(two[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_equals_uninterrupted(data, single, launches, engine):
    sharded = launches.engine(engine)
    for folder in (single, sharded):
        full, resumed = _info(folder, "full4"), _info(folder, "resumed")
        assert full["steps_run"] == 4 and resumed["steps_run"] == 2  # the second trainer really resumed at step 2
        assert full["steps"] == resumed["steps"] == [1, 2, 3, 4]  # its log history continues the checkpoint's
        assert resumed["losses"] == pytest.approx(full["losses"], abs=LOSS_ATOL)
        a = load_file(folder / "full4" / "final" / "model.safetensors")
        b = load_file(folder / "resumed" / "final" / "model.safetensors")
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)
    # the step-2 checkpoint itself is the single process's
    one = load_file(single / "full4" / "checkpoint-2" / "model.safetensors")
    two = load_file(sharded / "full4" / "checkpoint-2" / "model.safetensors")
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ("gradient", "weight_diff", "gradient_element"))
def test_mask_accumulation_scores_equal_one_process(data, single, launches, engine, method):
    sharded = launches.engine(engine)
    folders = [Path(method)] + ([Path(method) / "checkpoint-2"] if method == "weight_diff" else [])
    for folder in folders:
        one = load_file(single / folder / "neuron_scores.safetensors")
        two = load_file(sharded / folder / "neuron_scores.safetensors")
        assert set(one) == set(two) and len(one) >= 10
        assert all(value.sum() > 0 for value in one.values())
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-6, msg=f"{folder}: {key}")


def test_zero3_refuses_a_mask_on_lm_head(data, single, launches):
    sharded = launches.engine("zero3")
    for rank in (0, 1):
        refusal = _info(sharded, "lm_head_refusal", rank)["refusal"]
        assert (
            refusal is not None and "DeepSpeed ZeRO-3 cannot train neuron deltas on the output embeddings" in refusal
        )
        assert "'lm_head.weight'" in refusal and "ZeRO-2 or FSDP2" in refusal


@pytest.mark.parametrize("engine", ("zero2", "fsdp2"))
def test_element_mask_on_every_parameter(data, single, launches, engine):
    from hf_align.masks import NeuronMask

    sharded = launches.engine(engine)
    one, two = _info(single, "all_element"), _info(sharded, "all_element")
    assert two["num_processes"] == 2 and two["local_numel"] <= two["full_numel"]
    assert two["losses"] == pytest.approx(one["losses"], abs=LOSS_ATOL)
    mask = NeuronMask.load(data / "all_mask")
    assert "lm_head.weight" in mask.masks and "model.embed_tokens.weight" in mask.masks
    a = load_file(single / "all_element" / "final" / "model.safetensors")
    b = load_file(sharded / "all_element" / "final" / "model.safetensors")
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)
    _assert_frozen_rows_identical(b, _initial(data), mask)


@pytest.mark.parametrize("engine", ENGINES)
def test_merged_state_dict_gathers_on_every_rank(data, single, launches, engine):
    sharded = launches.engine(engine)
    saved = load_file(single / "row" / "final" / "model.safetensors")
    one = load_file(single / "row_merged.rank0.safetensors")
    assert set(one) == set(saved) and all(torch.equal(one[k], saved[k]) for k in saved)
    for rank in (0, 1):
        two = load_file(sharded / f"row_merged.rank{rank}.safetensors")
        assert set(two) == set(one)
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)
