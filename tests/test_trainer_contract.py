"""The contract every registered trainer keeps, run over :data:`hf_align.trainers.registry.TRAINERS` (not a list
kept by hand: a new entry without a case here fails ``test_every_registered_trainer_has_a_case``).

* TRL parity without a mask (entries with a ``trl_parent``): same losses, metrics and weights, step by step;
* frozen entries bit-identical with a mask (``masked`` entries), and resume from a checkpoint bit-identical to an
  uninterrupted run (the checkpoint keeps the exact deltas);
* save/load round trip, the model card read from the registry, a bad dataset column named in one line.

Tiny models, two steps, one thread. Method-specific exactness (token weights, NPO's losses, Quark's pool, AMA's
α's) is tested in each trainer's own test file.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from datasets import Dataset

from hf_align import testbed
from hf_align.errors import UserError
from hf_align.trainers.registry import TRAINERS, TrainerSpec


OWN = [spec for spec in TRAINERS.values() if spec.own]
MASKED = [spec for spec in OWN if spec.masked]
TRL_PEERS = [spec for spec in OWN if spec.trl_parent]


def _ids(specs):
    return [spec.name for spec in specs]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model():
    return testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=64)


def _preference(n=8):
    return testbed.preference_dataset(n, seed=0).remove_columns("rejected_wrong_positions")


def _offline_feedback(n=8):
    rows = [("1+2=", "3", 1.0), ("rev 123=", "321", 0.9), ("4+4=", "9", 0.0), ("rev 98=", "89", 0.5)]
    prompts, completions, feedback = zip(*(rows * (n // len(rows))), strict=True)
    return Dataset.from_dict({"prompt": list(prompts), "completion": list(completions), "feedback": list(feedback)})


def _text(n=8):
    return Dataset.from_dict({"text": [f"{i}+{i}={2 * i}" for i in range(n)]})


COMMON = dict(
    per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
    save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    lr_scheduler_type="constant", bf16=False,
)  # fmt: skip


@dataclass
class Case:
    """How to build one registered trainer on tiny data: its dataset, extra config fields, and the call (the
    trainers' signatures differ past ``model``)."""

    data: Callable[[], Dataset]
    config: dict = field(default_factory=dict)
    reference: bool = False  # takes a ref_model (a deep copy of the policy is passed when no mask is used)

    def build(self, spec: TrainerSpec, tmp_path, model=None, mask=None, config_class=None, trainer_class=None, **cfg):
        model = model if model is not None else _model()
        config_class = config_class or spec.config_class()
        trainer_class = trainer_class or spec.trainer_class()
        args = config_class(output_dir=str(tmp_path / "out"), **{**COMMON, **self.config, **cfg})
        kwargs = dict(args=args, train_dataset=self.data(), processing_class=testbed.load_tokenizer())
        if mask is not None:
            kwargs["neuron_mask"] = mask
        if spec.name == "adaptive-merge":
            base = copy.deepcopy(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
            kwargs["base_model"] = base
        elif self.reference and mask is None:
            kwargs["ref_model"] = copy.deepcopy(model)
        return trainer_class(model, **kwargs)


NO_CHECKPOINTING = dict(gradient_checkpointing=False)
CASES: dict[str, Case] = {
    "masked-dpo": Case(_preference, {**NO_CHECKPOINTING, "beta": 0.1}, reference=True),
    "masked-kto": Case(_preference, NO_CHECKPOINTING, reference=True),
    "npo": Case(testbed.forget_dataset, {**NO_CHECKPOINTING, "npo_level": "token"}, reference=True),
    "feedback": Case(_offline_feedback, dict(num_iterations=1, steps_per_iteration=2, num_quantiles=2, max_steps=-1)),
    "adaptive-merge": Case(_text, dict(max_length=16, mask_level="block2")),
}


def _case(spec: TrainerSpec) -> Case:
    return CASES[spec.name]


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _effective(model) -> dict[str, torch.Tensor]:
    """Plain parameters of a model with deltas (merged on a copy) or without."""
    from hf_align.sparse_update import has_deltas, merge_deltas

    model = copy.deepcopy(model)
    return _params(merge_deltas(model) if has_deltas(model) else model)


def _history(trainer) -> list[dict]:
    skip = ("trainable_fraction", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    return [{k: v for k, v in entry.items() if k not in skip} for entry in trainer.state.log_history]


# --------------------------------------------------------------------------------------------------------------
# The registry itself


def test_every_registered_trainer_has_a_case():
    assert set(CASES) == {spec.name for spec in OWN}


@pytest.mark.parametrize("spec", TRAINERS.values(), ids=list(TRAINERS))
def test_entry_resolves_to_its_classes(spec):
    import hf_align.trainers as trainers
    from hf_align.trainers._base import CheckedConfig, HFAlignTrainerMixin

    trainer, config = spec.trainer_class(), spec.config_class()
    assert spec.summary and spec.columns and (spec.paper is None or spec.paper.citation.startswith("@"))
    if spec.trl_parent:
        assert issubclass(trainer, spec.trl_class())
    if spec.own:
        assert issubclass(trainer, HFAlignTrainerMixin) and issubclass(config, CheckedConfig)
        assert getattr(trainers, trainer.__name__) is trainer and getattr(trainers, config.__name__) is config
        assert trainer._tag_names == list(spec.tags) and trainer._paper["id"] == spec.paper.arxiv_id
    assert ("neuron_mask_path" in config.__dataclass_fields__) == spec.masked


def test_importing_the_registry_imports_no_torch_or_trl():
    code = "import sys, hf_align.trainers.registry; print(sorted({'torch', 'trl', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_mixins_in_the_wrong_order_are_refused_when_the_class_is_defined():
    from trl import DPOTrainer

    from hf_align.trainers._base import HFAlignTrainerMixin
    from hf_align.trainers._masking import NeuronMaskTrainerMixin

    with pytest.raises(TypeError, match="put NeuronMaskTrainerMixin before DPOTrainer"):
        type("Late", (DPOTrainer, NeuronMaskTrainerMixin), {})
    with pytest.raises(TypeError, match="put HFAlignTrainerMixin before NeuronMaskTrainerMixin"):
        type("Swapped", (NeuronMaskTrainerMixin, HFAlignTrainerMixin, DPOTrainer), {})
    type("Fine", (HFAlignTrainerMixin, NeuronMaskTrainerMixin, DPOTrainer), {})


# --------------------------------------------------------------------------------------------------------------
# The contract


@pytest.mark.parametrize("spec", TRL_PEERS, ids=_ids(TRL_PEERS))
def test_without_a_mask_it_is_its_trl_parent_step_by_step(spec, tmp_path):
    trl_trainer = spec.trl_class()
    trl_config = next(k for k in spec.config_class().__mro__ if k.__module__.startswith("trl."))
    ours = _case(spec).build(spec, tmp_path / "ours")
    theirs = _case(spec).build(spec, tmp_path / "trl", config_class=trl_config, trainer_class=trl_trainer)
    ours.train()
    theirs.train()
    history = _history(ours)
    assert len([e for e in history if "loss" in e]) == COMMON["max_steps"]
    assert history == _history(theirs)  # every logged loss and metric, exactly
    for (name, a), (_, b) in zip(ours.model.named_parameters(), theirs.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("spec", MASKED, ids=_ids(MASKED))
def test_with_a_mask_unselected_entries_stay_bit_identical(spec, tmp_path):
    from hf_align.masks import NeuronMask

    model = _model()
    start = _params(model)
    mask = NeuronMask.random(model, 0.2, "row", seed=0)
    trainer = _case(spec).build(spec, tmp_path, model=model, mask=mask, weight_decay=0.1)
    trainer.train()
    assert type(trainer.ref_model).__name__ in ("DeltasOffReference", "NoneType")
    after, changed = _effective(trainer.model), 0
    for name, value in start.items():
        selected = mask.masks.get(name)
        keep = torch.ones_like(value, dtype=torch.bool)
        if selected is not None:
            keep = ~(selected if selected.shape == value.shape else selected[:, None].expand_as(value))
        assert torch.equal(after[name][keep], value[keep]), name
        changed += int((after[name] != value).sum())
    assert changed > 0


@pytest.mark.parametrize("spec", MASKED, ids=_ids(MASKED))
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(spec, tmp_path):
    """Bitwise: the resumed run replays the data order and optimizer state, and the checkpoint's exact deltas (a
    checkpoint that were not loaded leaves the fresh zero deltas: different losses)."""
    from hf_align.masks import NeuronMask

    def run(folder, resume=None):
        model = _model()
        mask = NeuronMask.random(model, 0.2, "row", seed=0)
        trainer = _case(spec).build(
            spec, folder, model=model, mask=mask, max_steps=3, save_strategy="steps", save_steps=2
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 3
    losses = {e["step"]: e["loss"] for e in full.state.log_history if "loss" in e}
    assert {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e} == losses
    full_params, resumed_params = _effective(full.model), _effective(resumed.model)
    assert set(full_params) == set(resumed_params)
    for name, value in full_params.items():
        torch.testing.assert_close(resumed_params[name], value, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("spec", MASKED, ids=_ids(MASKED))
def test_with_a_mask_precomputed_reference_log_probs_equal_the_live_deltas_off_reference(spec, tmp_path):
    """The reference of a masked run is the policy with its deltas off, live or precomputed once (the deltas are 0
    at the start): the same losses either way."""
    from hf_align.masks import NeuronMask

    losses = {}
    for precompute in (False, True):
        model = _model()
        mask = NeuronMask.random(model, 0.2, "row", seed=0)
        trainer = _case(spec).build(spec, tmp_path / str(precompute), model=model, mask=mask,
                                    precompute_ref_log_probs=precompute)  # fmt: skip
        trainer.train()
        losses[precompute] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses[True]) == COMMON["max_steps"]
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)


@pytest.mark.parametrize("spec", OWN, ids=_ids(OWN))
def test_save_and_load_round_trip_and_the_card_comes_from_the_registry(spec, tmp_path):
    from hf_align.masks import NeuronMask

    model = _model()
    mask = NeuronMask.random(model, 0.2, "row", seed=0) if spec.masked else None
    trainer = _case(spec).build(spec, tmp_path, model=model, mask=mask)
    trainer.train()
    trainer.save_model()
    folder = tmp_path / "out"
    _assert_reloads(spec, trainer, folder)
    card = (folder / "README.md").read_text()
    assert spec.paper.arxiv_id in card and spec.summary.rstrip(".") in card and f"hf-align {spec.name}" in card
    for bibtex in spec.paper.citation.split("\n@"):
        assert bibtex.splitlines()[0].lstrip("@") in card
    assert all(f"- {tag}" in card for tag in spec.tags)
    assert "training_args.json" in {p.name for p in folder.iterdir()}


def _assert_reloads(spec, trainer, folder):
    if spec.name == "adaptive-merge":
        from hf_align.merging.adaptive import LearnedAlphas

        loaded = LearnedAlphas.load(str(folder))
        assert loaded.block_params == trainer.alphas.blocks.detach().tolist()
        assert loaded.head_param == float(trainer.alphas.head.detach()) and loaded.modules == trainer.wrapped_modules
        return
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    live = trainer.accelerator.unwrap_model(trainer.model).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, live(input_ids=ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec", OWN, ids=_ids(OWN))
def test_a_bad_dataset_column_is_named_in_one_line(spec, tmp_path):
    """Rename a column that every accepted column set of the registry entry needs: refused before training, in one
    line that names it."""
    case = _case(spec)
    good = case.data()

    def accepted(names):
        return any(all(c in names for c in columns) for columns in spec.columns)

    assert accepted(good.column_names)
    needed = next(c for c in good.column_names if not accepted([n for n in good.column_names if n != c]))
    bad = good.rename_column(needed, "oops")
    with pytest.raises(UserError) as raised:
        dataclasses.replace(case, data=lambda: bad).build(spec, tmp_path)
    message = str(raised.value)
    assert "\n" not in message and needed in message, message
