"""MaskAccumulationCallback: statistics checked against hand computation, accumulation, resume, PEFT, files."""

import shutil

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_align.callbacks import MaskAccumulationCallback
from hf_align.scores import CheckpointReader, load_scores, plain_name, save_scores
from hf_align.testbed import quiet_training_args


C = torch.tensor([[1.0, -1.0, 0.25, 0.0], [3.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, -0.5]])


class Toy(nn.Module):
    """``linear=True``: loss = Σ(W ⊙ C) · mean(x) so grad W = C · mean(x) exactly; else a squared error."""

    def __init__(self, linear: bool = True, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(4, 3, bias=False)
        self.norm = nn.Parameter(torch.ones(3))
        self.linear = linear

    def forward(self, x):
        if self.linear:
            return {"loss": (self.proj.weight * C).sum() * x.mean() + 0.0 * self.norm.sum()}
        return {"loss": ((self.proj(x) * self.norm - 1.0) ** 2).mean()}


def _data(n=4, linear=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if linear:
        return [{"x": torch.tensor(v)} for v in (0.5, 1.0, 1.5, 2.0)[:n]]
    return [{"x": torch.randn(4, generator=g)} for _ in range(n)]


def _args(tmp_path, **kw):
    base = quiet_training_args(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=0.1,
        max_steps=3,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_strategy="no",
        max_grad_norm=0.0,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _train(tmp_path, callback, model=None, data=None, resume=None, **kw):
    model = model if model is not None else Toy()
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=data or _data(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_gradient_rows_rank_as_computed_by_hand(tmp_path):
    cb = MaskAccumulationCallback(method="gradient", granularity="row")
    _train(tmp_path, cb)
    mean_x = 1.25  # batch of all four samples every step
    expected = 3 * mean_x * C.abs().sum(1)  # three steps of grad = C · mean(x)
    scores, meta = load_scores(tmp_path)
    torch.testing.assert_close(scores["proj.weight"], expected)
    assert scores["proj.weight"].argsort(descending=True).tolist() == [1, 0, 2]
    assert scores["norm"].shape == (3,) and scores["norm"].abs().sum() == 0
    assert meta["num_steps"] == 3 and meta["method"] == "gradient" and meta["granularity"] == "row"


def test_gradient_elements_and_square_statistic(tmp_path):
    cb = MaskAccumulationCallback(method="gradient", granularity="element", statistic="square")
    _train(tmp_path / "sq", cb)
    torch.testing.assert_close(cb.scores()["proj.weight"], 3 * (1.25 * C) ** 2)
    cb16 = MaskAccumulationCallback(
        method="gradient", granularity="element", score_dtype="bfloat16", offload_to_cpu=True
    )
    _train(tmp_path / "bf16", cb16)
    assert cb16.totals["proj.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(cb16.scores()["proj.weight"].float(), 3 * 1.25 * C.abs(), rtol=1e-2, atol=1e-2)


def test_pre_clip_reads_raw_gradients_and_still_clips(tmp_path):
    max_norm = 0.5
    raw_norm = float((1.25 * C).norm())
    coef = max_norm / (raw_norm + 1e-6)
    pre = MaskAccumulationCallback(method="gradient", grad_stage="pre_clip", granularity="element")
    trainer_pre = _train(tmp_path / "pre", pre, max_grad_norm=max_norm)
    assert trainer_pre.args.max_grad_norm == max_norm  # restored after the run
    torch.testing.assert_close(pre.scores()["proj.weight"], 3 * 1.25 * C.abs())
    post = MaskAccumulationCallback(method="gradient", grad_stage="post_clip", granularity="element")
    _train(tmp_path / "post", post, max_grad_norm=max_norm)
    torch.testing.assert_close(post.scores()["proj.weight"], 3 * coef * 1.25 * C.abs())
    # Training itself is unchanged by the callback taking over clipping: same weights as a plain clipped run.
    plain = Trainer(model=Toy(), args=_args(tmp_path / "plain", max_grad_norm=max_norm), train_dataset=_data())
    plain.train()
    torch.testing.assert_close(trainer_pre.model.proj.weight, plain.model.proj.weight)
    unclipped = _train(
        tmp_path / "unclipped", MaskAccumulationCallback(method="gradient", granularity="row"), max_grad_norm=0.0
    )
    assert not torch.allclose(unclipped.model.proj.weight, plain.model.proj.weight)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    data = _data(8, linear=False)
    big = MaskAccumulationCallback(method="gradient", granularity="element")
    _train(tmp_path / "big", big, Toy(linear=False), data, per_device_train_batch_size=4, max_steps=2)
    acc = MaskAccumulationCallback(method="gradient", granularity="element")
    _train(
        tmp_path / "acc", acc, Toy(linear=False), data, per_device_train_batch_size=1, gradient_accumulation_steps=4,
        max_steps=2,
    )  # fmt: skip
    assert acc.num_steps == big.num_steps == 2
    for name in big.totals:
        torch.testing.assert_close(acc.scores()[name], big.scores()[name], rtol=1e-5, atol=1e-7)
    assert big.scores()["proj.weight"].sum() > 0


def test_resume_gives_the_same_scores(tmp_path):
    data = _data(8, linear=False)
    kw = dict(per_device_train_batch_size=2, max_steps=6, save_strategy="steps", save_steps=3)
    full = MaskAccumulationCallback(method="gradient", granularity="row")
    _train(tmp_path / "full", full, Toy(linear=False), data, **kw)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "neuron_scores.safetensors").exists()
    # A fresh run that resumes from the step-3 checkpoint (copied away from the full run's folder).
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")
    resumed = MaskAccumulationCallback(method="gradient", granularity="row")
    _train(
        tmp_path / "resumed",
        resumed,
        Toy(linear=False, seed=1),
        data,
        resume=str(tmp_path / "resumed" / "checkpoint-3"),
        **kw,
    )
    assert resumed.num_steps == full.num_steps == 6
    for name, value in full.scores().items():
        torch.testing.assert_close(resumed.scores()[name], value)
    half, _ = load_scores(checkpoint)
    assert not torch.allclose(half["proj.weight"], full.scores()["proj.weight"])


def test_resume_without_saved_scores_is_an_error(tmp_path):
    data = _data(8, linear=False)
    kw = dict(per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2)
    _train(
        tmp_path,
        MaskAccumulationCallback(method="gradient", granularity="row", save_to_checkpoints=False),
        Toy(linear=False),
        data,
        **kw,
    )
    with pytest.raises(FileNotFoundError, match="running totals"):
        _train(
            tmp_path,
            MaskAccumulationCallback(method="gradient", granularity="row"),
            Toy(linear=False),
            data,
            resume=str(tmp_path / "checkpoint-2"),
            **kw,
        )


def test_weight_diff_equals_hand_delta(tmp_path):
    model = Toy(linear=False)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    cb = MaskAccumulationCallback(method="weight_diff", granularity="element")
    _train(tmp_path, cb, model, _data(8, linear=False), per_device_train_batch_size=2)
    scores, meta = load_scores(tmp_path)
    for name, param in model.named_parameters():
        torch.testing.assert_close(scores[name], (param.detach() - start[name]).abs())
    assert scores["proj.weight"].sum() > 0
    assert meta["method"] == "weight_diff"
    assert (tmp_path / "_neuron_scores_init" / "model.safetensors.index.json").exists()
    # An explicit init checkpoint on disk and row granularity: Σ_row |ΔW|.
    init = tmp_path / "init.safetensors"
    from hf_align.io import save_tensors

    save_tensors(init, {k: torch.zeros_like(v) for k, v in start.items()})
    rows = MaskAccumulationCallback(method="weight_diff", granularity="row", init_path=str(init))
    rows.on_train_begin(_args(tmp_path / "rows"), _State(), None, model=model)
    assert not (tmp_path / "rows" / "_neuron_scores_init").exists()
    for name, param in model.named_parameters():
        expected = param.detach().abs().sum(-1) if param.dim() > 1 else param.detach().abs()
        torch.testing.assert_close(rows.scores(model)[name], expected)


def test_weight_diff_resumes_a_run_whose_snapshot_has_the_earlier_name(tmp_path):
    """The snapshot folder got a leading "_" (so a push skips it): a run started before still finds θ_start."""
    import shutil

    model = Toy(linear=False)
    first = MaskAccumulationCallback(method="weight_diff", granularity="element")
    first.on_train_begin(_args(tmp_path), _State(), None, model=model)
    shutil.move(tmp_path / "_neuron_scores_init", tmp_path / "neuron_scores_init")  # as the earlier version wrote it
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    resumed = MaskAccumulationCallback(method="weight_diff", granularity="element")
    state = _State()
    state.global_step = 2
    resumed.on_train_begin(_args(tmp_path), state, None, model=model)
    assert not (tmp_path / "_neuron_scores_init").exists()
    torch.testing.assert_close(resumed.scores(model)["proj.weight"], torch.ones(3, 4))


class _State:
    global_step = 0
    is_world_process_zero = True


def test_weight_diff_snapshot_is_sharded_and_streamed(tmp_path, tiny_model, monkeypatch):
    from hf_align.callbacks import mask_accumulation

    monkeypatch.setattr(mask_accumulation, "_SHARD_BYTES", 200_000)
    mask_accumulation.write_snapshot(tmp_path / "snap", tiny_model)
    reader = CheckpointReader(tmp_path / "snap")
    assert len(list((tmp_path / "snap").glob("model-*.safetensors"))) > 1
    assert sorted(reader.keys()) == sorted(n for n, _ in tiny_model.named_parameters())
    torch.testing.assert_close(reader.get("model.norm.weight"), tiny_model.model.norm.weight.detach())


def test_peft_names_and_merged_weight_diff(tmp_path, tiny_model):
    import peft

    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert plain_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert plain_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    with pytest.raises(ValueError, match="weight_diff"):
        MaskAccumulationCallback(granularity="row", method="gradient").on_train_begin(
            _args(tmp_path), _State(), None, model=model
        )
    cb = MaskAccumulationCallback(method="weight_diff", granularity="element", target=["q_proj"])
    cb.on_train_begin(_args(tmp_path), _State(), None, model=model)
    with torch.no_grad():  # move the adapter by hand: ΔW = scale · B A
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param))
    scores = cb.scores(model)
    assert sorted(scores) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]).abs()
    torch.testing.assert_close(scores["model.layers.0.self_attn.q_proj.weight"], expected)


def test_save_scores_roundtrip_and_errors(tmp_path):
    save_scores(tmp_path, {"a.weight": torch.arange(3.0)}, {"method": "gradient"})
    scores, meta = load_scores(tmp_path)
    expected = {"method": "gradient", "parameter_order": ["a.weight"]}  # the order the files' sorted keys lose
    assert meta == expected and scores["a.weight"].tolist() == [0.0, 1.0, 2.0]
    (tmp_path / "neuron_scores.json").unlink()  # the safetensors header carries the same metadata
    assert load_scores(tmp_path)[1] == expected
    with pytest.raises(FileNotFoundError, match="neuron_scores.safetensors"):
        load_scores(tmp_path / "missing")
    with pytest.raises(TypeError, match="a.weight"):
        save_scores(tmp_path, {"a.weight": torch.arange(3)})
    with pytest.raises(ValueError, match="granularity"):
        MaskAccumulationCallback(method="gradient", granularity="column")
