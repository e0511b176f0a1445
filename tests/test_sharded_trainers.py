"""Sharded training of the other trainers on 2 CPU processes (gloo): DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 vs one
process, with the harness of ``tests/test_sharded.py`` (its accelerate configs; one worker script run once as a
plain process with ``per_device_train_batch_size=4`` and once per engine with 2 processes × 2, several
configurations per launch).

* ``npo_seq``: ``NPOTrainer``, sequence level, 10 % row mask, reference log-probs precomputed (deltas off);
  ``npo_token``: token level, ``completion_weights``, row mask, live deltas-off reference; ``simnpo``: SimNPO,
  element mask on the decoder layers; ``npo_retain``: no mask, retain NLL, precomputed from the policy at init;
  ``npo_kl``: no mask, token level, retain KL (a reference loaded from the path); ``npo_mask_retain``: row mask +
  retain NLL (refused under ZeRO-3, tested message). Each rank must run the precompute on its own half of the rows,
  and the gathered column must be the one process's.
* ``aligner_sft`` / ``aligner_dpo``: ``trl.SFTTrainer`` / ``trl.DPOTrainer`` with ``AlignerConfig(num_tokens=4)``
  on both decoder layers: ONE global-token parameter, and the learned tokens (saved adapter) equal one process's.
* ``feedback``: ``FeedbackConditionedTrainer`` online (2 iterations × 2 steps, top-k 1 sampling, a KL reference):
  the data pool is the same on every rank and the one process's, training equals one process; under ZeRO-3 adding
  quantile tokens is refused (tested message).
* ``adaptive_merge``: ``AdaptiveMergeTrainer`` under ZeRO-2; refused under ZeRO-3 and FSDP2 (tested message).

The forget and retain rows all have completions of the same token count: token-level NPO and the retain terms
average per rank (``docs/distributed.md``, known non-equivalences), which equals the one-process mean only then.
Tolerances as ``tests/test_sharded.py``: losses 1e-5 abs, weights 5e-5 abs, frozen entries bit-identical.
"""

import math
import textwrap

import pytest
import torch
from launch_helpers import WORKER_EPILOGUE, WORKER_PRELUDE, EngineLaunches, read_info
from safetensors.torch import load_file


LOSS_ATOL = 1e-5
WEIGHT_ATOL = 5e-5
ENGINES = ("zero2", "zero3", "fsdp2")
PORTS = {"zero2": 29641, "zero3": 29642, "fsdp2": 29643}

WORKER = (
    WORKER_PRELUDE
    + textwrap.dedent(
        """
    from datasets import load_from_disk
    from safetensors.torch import save_file
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from hf_align import testbed
    from hf_align.masks import NeuronMask, parameter_shape
    from hf_align.peft_tuners import AlignerConfig
    from hf_align.sparse_update import merged_state_dict
    from hf_align.trainers import (
        AdaptiveMergeConfig, AdaptiveMergeTrainer, FeedbackConditionedConfig, FeedbackConditionedTrainer, NPOConfig,
        NPOTrainer,
    )
    from hf_align.trainers.npo import REF_COLUMN

    model_dir = f"{data}/model"
    tok = testbed.load_tokenizer()
    rank = int(os.environ.get("RANK", "0"))
    forget, retain = load_from_disk(f"{data}/forget"), load_from_disk(f"{data}/retain")
    weighted_forget = load_from_disk(f"{data}/weighted_forget")
    pairs = testbed.preference_dataset(16, seed=0).remove_columns("rejected_wrong_positions")


    def config(cls, name, **overrides):
        kwargs = dict(
            output_dir=f"{out}/{name}", per_device_train_batch_size=per_device, max_steps=3, learning_rate=1e-2,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True,
            seed=0, lr_scheduler_type="constant", weight_decay=0.1, dataloader_num_workers=0,
        )
        kwargs.update(overrides)
        return on_engine(cls(**kwargs))


    def record(name, trainer, **extra):
        model = trainer.accelerator.unwrap_model(trainer.model)
        params = dict(model.named_parameters())
        history = [e for e in trainer.state.log_history if "loss" in e]
        info = {
            "losses": [e["loss"] for e in history],
            "steps": [e["step"] for e in history],
            "distributed_type": str(trainer.accelerator.state.distributed_type),
            "num_processes": trainer.accelerator.num_processes,
            "wrapper": type(trainer.model_wrapped).__name__,
            "dtensor": any(type(p).__name__ == "DTensor" for p in params.values()),
            "local_numel": sum(local_numel(p) for p in params.values()),
            "full_numel": sum(math.prod(parameter_shape(p)) for p in params.values()),
            "trainable": sorted(n for n, p in params.items() if p.requires_grad),
            **extra,
        }
        with open(f"{out}/{name}.rank{rank}.json", "w") as f:
            json.dump(info, f)


    def refusal(build):
        try:
            build()
        except ValueError as error:
            return str(error)
        return None


    class CountingNPO(NPOTrainer):  # rows the reference ran on before training (the precompute)
        precomputed_rows = 0

        def _reference_log_probs(self, inputs, policy=None):
            if not hasattr(self, "state") or self.state.global_step == 0 and not self.model.training:
                CountingNPO.precomputed_rows += inputs["input_ids"].shape[0]
            return super()._reference_log_probs(inputs, policy)


    row_mask, element_mask = NeuronMask.load(f"{data}/row_mask"), NeuronMask.load(f"{data}/element_mask")
    npo_runs = {
        "npo_seq": dict(mask=row_mask, data=forget, retain=None, precompute=True),
        "npo_token": dict(mask=row_mask, data=weighted_forget, retain=None, npo_level="token"),
        "simnpo": dict(mask=element_mask, data=forget, retain=None, npo_loss_type="simnpo"),
        "npo_retain": dict(mask=None, data=forget, retain="nll", precompute=True),
        "npo_kl": dict(mask=None, data=weighted_forget, retain="kl", npo_level="token"),
        "npo_mask_retain": dict(mask=row_mask, data=forget, retain="nll", precompute=True),
    }
    for name, run in npo_runs.items():
        CountingNPO.precomputed_rows = 0
        overrides = {k: run[k] for k in ("npo_level", "npo_loss_type") if k in run}
        args = config(NPOConfig, name, beta=0.1, precompute_ref_log_probs=run.get("precompute", False),
                      retain_loss_type=run["retain"] or "nll", **overrides)
        build = lambda: CountingNPO(model_dir, args=args, train_dataset=run["data"], processing_class=tok,
                                    retain_dataset=retain if run["retain"] else None, neuron_mask=run["mask"])
        if engine == "zero3" and run["mask"] is not None and run["retain"]:
            with open(f"{out}/{name}_refusal.rank{rank}.json", "w") as f:
                json.dump({"refusal": refusal(build)}, f)
            continue
        t = build()
        column = list(t.train_dataset[REF_COLUMN]) if REF_COLUMN in t.train_dataset.column_names else None
        rows = CountingNPO.precomputed_rows
        t.train()
        t.save_model(f"{out}/{name}/final")
        record(name, t, ref_column=column, precomputed_rows=rows, reference_mode=t._ref_mode,
               dataset_rows=len(t.train_dataset))

    # Aligner under TRL's SFT and DPO trainers
    for name, cls, args_cls, train, lr in (
        ("aligner_sft", SFTTrainer, SFTConfig, testbed.sft_dataset(16, seed=1), 1e-2),
        ("aligner_dpo", DPOTrainer, DPOConfig, pairs, 1e-1),  # the gates start at 0: DPO's loss moves slowly
    ):
        t = cls(model_dir, args=config(args_cls, name, learning_rate=lr), train_dataset=train, processing_class=tok,
                peft_config=AlignerConfig(num_tokens=4, start_layer=0))
        init = [p.detach().tolist() for n, p in t.model.named_parameters() if "aligner_tokens" in n and rank == 0]
        t.train()
        t.save_model(f"{out}/{name}/final")
        model = t.accelerator.unwrap_model(t.model)
        tokens = [n for n, _ in model.named_parameters() if "aligner_tokens" in n]
        record(name, t, token_params=tokens, init_tokens=init[0] if engine == "single" else None)

    # FeedbackConditioned, online: 2 iterations of 2 steps, deterministic sampling (top-k 1)
    args = config(
        FeedbackConditionedConfig, "feedback", max_steps=-1, num_rounds=2, steps_per_round=2,
        prompts_per_round=4, num_generations=2, max_completion_length=5, top_k=1, beta=0.05, num_quantiles=2,
        quantile_words=["Good.", "Bad."], generation_batch_size=4, max_length=64,
    )
    t = FeedbackConditionedTrainer(model_dir, args, testbed.prompt_dataset(16, seed=2), processing_class=tok,
                                   reward_funcs=testbed.reward)
    t.train()
    t.save_model(f"{out}/feedback/final")
    if engine == "zero3":  # quantile tokens would resize the partitioned embeddings
        args.quantile_words = None
        build = lambda: FeedbackConditionedTrainer(model_dir, args, testbed.prompt_dataset(16, seed=2),
                                                   processing_class=testbed.load_tokenizer(), reward_funcs=testbed.reward)
        with open(f"{out}/quantile_tokens_refusal.rank{rank}.json", "w") as f:
            json.dump({"refusal": refusal(build)}, f)
    pool = [[r["prompt"], r["completion"], r["score"]] for r in t.pool.rows(list(range(len(t.pool))))]
    record("feedback", t, pool=pool)

    # AdaptiveMerge: ZeRO-2 trains; ZeRO-3 and FSDP2 are refused
    def adaptive(name):
        args = config(AdaptiveMergeConfig, name, learning_rate=5e-2, max_length=64, weight_decay=0.0,
                      mask_level="layerwise")
        return AdaptiveMergeTrainer(f"{data}/aligned", base_model=model_dir, args=args,
                                    train_dataset=testbed.sft_dataset(16, seed=1), processing_class=tok)

    if engine in ("zero3", "fsdp2"):
        with open(f"{out}/adaptive_refusal.rank{rank}.json", "w") as f:
            json.dump({"refusal": refusal(lambda: adaptive("adaptive_merge"))}, f)
    else:
        t = adaptive("adaptive_merge")
        t.train()
        record("adaptive_merge", t, alphas=t.learned_alphas().block_params + [t.learned_alphas().head_param])
"""
    )
    + WORKER_EPILOGUE
)


def _equal_length(dataset, tokenizer, length):
    """Rows whose completion is ``length`` tokens: per-rank token means then equal the one-process mean."""
    return dataset.filter(
        lambda row: len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) == length
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hf_align import testbed
    from hf_align.architectures import ROW_TARGET
    from hf_align.masks import NeuronMask

    root = tmp_path_factory.mktemp("sharded_trainers")
    tok = testbed.load_tokenizer()
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    aligned = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, seed=1)
    aligned.save_pretrained(root / "aligned")
    tok.save_pretrained(root / "aligned")
    NeuronMask.random(model, 0.1, "row", seed=0).save(root / "row_mask")
    NeuronMask.random(model, 0.1, "element", target=ROW_TARGET, seed=1).save(root / "element_mask")
    forget = _equal_length(testbed.forget_dataset(200, seed=4), tok, 3).select(range(16))
    forget.save_to_disk(root / "forget")
    weights = [[1.0, 0.5, 2.0, 1.0]] * len(forget)  # 3 completion tokens + EOS, none zero
    forget.add_column("completion_weights", weights).save_to_disk(root / "weighted_forget")
    _equal_length(testbed.retain_dataset(200, seed=5), tok, 3).select(range(16)).save_to_disk(root / "retain")
    (root / "worker.py").write_text(WORKER)
    return root


@pytest.fixture(scope="module")
def launches(data):
    return EngineLaunches(data, PORTS, timeout=480)


@pytest.fixture(scope="module")
def single(launches):
    return launches.single()


_info = read_info


NPO_RUN = ("npo_seq", "npo_token", "simnpo", "npo_retain", "npo_kl")  # every engine
NPO_REFUSED_ON_ZERO3 = ("npo_mask_retain",)


def _configs(engine):
    refused = NPO_REFUSED_ON_ZERO3 if engine == "zero3" else ()
    npo = [name for name in (*NPO_RUN, *NPO_REFUSED_ON_ZERO3) if name not in refused]
    return (*npo, "aligner_sft", "aligner_dpo", "feedback", *(("adaptive_merge",) if engine == "zero2" else ()))


@pytest.mark.parametrize("engine", ENGINES)
def test_really_ran_sharded(data, single, launches, engine):
    sharded = launches.engine(engine)
    for name in _configs(engine):
        one = _info(single, name)
        assert one["num_processes"] == 1 and one["distributed_type"] == "DistributedType.NO", (name, one)
        for rank in (0, 1):
            info = _info(sharded, name, rank)
            assert info["num_processes"] == 2 and info["full_numel"] == one["full_numel"], (name, info)
            if engine == "fsdp2":
                assert info["distributed_type"] == "DistributedType.FSDP" and info["dtensor"], (name, info)
                assert info["wrapper"] != "DistributedDataParallel"
            else:
                assert info["distributed_type"] == "DistributedType.DEEPSPEED", (name, info)
                assert info["wrapper"] == "DeepSpeedEngine", (name, info)
            if engine == "zero2":  # parameters are replicated (optimizer state partitioning: test_sharded.py)
                assert info["local_numel"] == info["full_numel"]
            else:
                assert info["local_numel"] < info["full_numel"], (name, info)


@pytest.mark.parametrize(
    "engine, name",
    [(e, n) for e in ENGINES for n in _configs(e) if n != "adaptive_merge"],  # its own test
)
def test_same_losses(data, single, launches, engine, name):
    sharded = launches.engine(engine)
    one, two = _info(single, name), _info(sharded, name)
    assert two["steps"] == one["steps"] and len(one["losses"]) >= 3
    assert two["losses"] == pytest.approx(one["losses"], abs=LOSS_ATOL)
    # it trained (DPO's loss at gate 0 is exactly log 2 and moves slowly: the learned tokens and gates, compared at
    # 5e-5 after moving by > 5e-3, are the Aligner's evidence)
    moved = 10 * LOSS_ATOL if name == "aligner_dpo" else 100 * LOSS_ATOL
    assert abs(one["losses"][-1] - one["losses"][0]) > moved
    assert _info(sharded, name, rank=1)["losses"] == two["losses"]


def _assert_same_weights(one, two, initial=None, mask=None):
    assert set(one) == set(two) and one
    moved = 0.0
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)
        if initial is not None:
            moved = max(moved, (value - initial[key]).abs().max().item())
            if mask is not None and key in mask.masks:  # frozen entries: bit-identical to the initial weights
                frozen = ~mask.masks[key]
                assert torch.equal(two[key][frozen], initial[key][frozen]), key
            elif mask is not None:
                assert torch.equal(two[key], initial[key]), f"{key} has no mask but changed"
    assert initial is None or moved > 100 * WEIGHT_ATOL


@pytest.mark.parametrize("engine", ENGINES)
def test_npo_same_weights_frozen_entries_identical(data, single, launches, engine):
    from hf_align.masks import NeuronMask

    sharded = launches.engine(engine)
    initial = load_file(data / "model" / "model.safetensors")
    masks = {"npo_seq": "row_mask", "npo_token": "row_mask", "simnpo": "element_mask", "npo_mask_retain": "row_mask"}
    for name in (n for n in _configs(engine) if n.startswith(("npo", "simnpo"))):
        mask = NeuronMask.load(data / masks[name]) if name in masks else None
        one = load_file(single / name / "final" / "model.safetensors")
        two = load_file(sharded / name / "final" / "model.safetensors")
        _assert_same_weights(one, two, initial, mask)


@pytest.mark.parametrize("engine", ENGINES)
def test_npo_reference_precomputed_sharded(data, single, launches, engine):
    sharded = launches.engine(engine)
    for name in ("npo_seq", "npo_retain", "npo_mask_retain"):
        if name not in _configs(engine):
            continue
        one = _info(single, name)
        assert one["precomputed_rows"] == one["dataset_rows"] == 16
        for rank in (0, 1):
            two = _info(sharded, name, rank)
            assert two["precomputed_rows"] == 8, (name, rank)  # its own half, not every row
            assert len(two["ref_column"]) == 16
            for a, b in zip(one["ref_column"], two["ref_column"], strict=True):
                assert b == pytest.approx(a, abs=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ("aligner_sft", "aligner_dpo"))
def test_aligner_one_token_parameter_and_same_tokens(data, single, launches, engine, name):
    sharded = launches.engine(engine)
    expected = ["base_model.model.model.layers.0.self_attn.aligner_tokens.default.weight"]
    assert _info(single, name)["token_params"] == expected
    for rank in (0, 1):
        assert _info(sharded, name, rank)["token_params"] == expected  # one copy, not one per wrapped unit
    one = load_file(single / name / "final" / "adapter_model.safetensors")
    two = load_file(sharded / name / "final" / "adapter_model.safetensors")
    assert [k for k in one if "aligner_tokens" in k] == [k for k in two if "aligner_tokens" in k] != []
    _assert_same_weights(one, two)
    tokens = next(k for k in one if "aligner_tokens" in k)
    gates = [k for k in one if "aligner_gate" in k]
    assert len(gates) == 2 and all(one[k].abs().max() > 100 * WEIGHT_ATOL for k in gates)  # both layers trained
    init = torch.tensor(_info(single, name)["init_tokens"])
    assert (one[tokens] - init).abs().max() > 100 * WEIGHT_ATOL


@pytest.mark.parametrize("engine", ENGINES)
def test_feedback_pool_identical_and_training_equal(data, single, launches, engine):
    sharded = launches.engine(engine)
    pool = _info(single, "feedback")["pool"]
    assert len(pool) == 16 and len({row[1] for row in pool}) > 1
    for rank in (0, 1):
        assert _info(sharded, "feedback", rank)["pool"] == pool  # same rows, same order, on every rank
    one = load_file(single / "feedback" / "final" / "model.safetensors")
    two = load_file(sharded / "feedback" / "final" / "model.safetensors")
    _assert_same_weights(one, two, load_file(data / "model" / "model.safetensors"))


def test_adaptive_merge_zero2_equal(data, single, launches):
    sharded = launches.engine("zero2")
    one, two = _info(single, "adaptive_merge"), _info(sharded, "adaptive_merge")
    assert two["losses"] == pytest.approx(one["losses"], abs=LOSS_ATOL) and len(one["losses"]) == 3
    assert two["alphas"] == pytest.approx(one["alphas"], abs=WEIGHT_ATOL)
    start = math.log(0.2 / 0.8)  # AdaptiveMergeConfig's init_val 0.2 as a raw logit
    assert max(abs(a - start) for a in one["alphas"]) > 100 * WEIGHT_ATOL  # it trained
    assert _info(sharded, "adaptive_merge", rank=1)["alphas"] == two["alphas"]


@pytest.mark.parametrize("engine", ("zero3", "fsdp2"))
def test_adaptive_merge_refused_under_parameter_sharding(data, single, launches, engine):
    sharded = launches.engine(engine)
    setup = {"zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP"}[engine]
    for rank in (0, 1):
        refusal = _info(sharded, "adaptive_refusal", rank)["refusal"]
        assert refusal is not None and f"AdaptiveMergeTrainer cannot run under {setup}" in refusal
        assert "DDP or DeepSpeed ZeRO-2" in refusal


def test_zero3_refuses_a_mask_with_a_retain_set(data, single, launches):
    sharded = launches.engine("zero3")
    for rank in (0, 1):
        refusal = _info(sharded, "npo_mask_retain_refusal", rank)["refusal"]
        assert refusal is not None and "DeepSpeed ZeRO-3 cannot train a neuron mask with a retain set" in refusal
        assert "Use ZeRO-2 or FSDP2" in refusal


def test_zero3_refuses_to_add_quantile_tokens(data, single, launches):
    sharded = launches.engine("zero3")
    for rank in (0, 1):
        refusal = _info(sharded, "quantile_tokens_refusal", rank)["refusal"]
        assert refusal is not None and "cannot be added under DeepSpeed ZeRO-3" in refusal
        assert "use `quantile_words`" in refusal
