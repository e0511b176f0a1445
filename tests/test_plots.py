"""Each plot's content (axes, tick order, bar heights, curve values), the callback that writes and logs them, the
card's link to the mask plot, and the one-line warnings of runs that train nothing."""

import logging
import types

import pytest
import torch


pytest.importorskip("matplotlib")

from hf_align import plots  # noqa: E402
from hf_align.masks import NeuronMask  # noqa: E402


MODEL_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


def _mask(selected_rows: dict[str, int]) -> NeuronMask:
    """Two layers of a Llama layout in model order; module m selects its first ``selected_rows[m]`` of 8 rows."""
    masks = {}
    for layer in (0, 1):
        for module in MODEL_ORDER:
            part = "self_attn" if module in ATTN else "mlp"
            mask = torch.zeros(8, dtype=torch.bool)
            mask[: selected_rows[module] + layer] = True
            masks[f"model.layers.{layer}.{part}.{module}.weight"] = mask
    masks["lm_head.weight"] = torch.tensor([True, False, False, False])
    return NeuronMask(masks)


ROWS = {"q_proj": 1, "k_proj": 2, "v_proj": 3, "o_proj": 0, "gate_proj": 4, "up_proj": 5, "down_proj": 6}


def _panels(figure):
    return {axes.get_title(): axes for axes in figure.axes if axes.images}


def _ticks(labels):
    return [t.get_text() for t in labels]


def test_mask_plot_columns_follow_the_model_and_show_rows_and_fraction(tmp_path):
    mask = _mask(ROWS)
    figure = plots.mask_figure(mask)
    panels = _panels(figure)
    assert set(panels) == {"rows trained", "fraction trained"}
    for axes in panels.values():
        assert _ticks(axes.get_xticklabels()) == [*MODEL_ORDER, "lm_head"]  # not alphabetical (down_proj first)
        assert _ticks(axes.get_yticklabels()) == ["0", "1", "other"]
        assert axes.get_xlabel() == "module type (model order)" and axes.get_ylabel() == "layer"
    rows = panels["rows trained"].images[0].get_array()
    fraction = panels["fraction trained"].images[0].get_array()
    for j, module in enumerate(MODEL_ORDER):
        for i in (0, 1):
            assert rows[i][j] == ROWS[module] + i
            assert fraction[i][j] == pytest.approx((ROWS[module] + i) / 8)
    assert rows[2][7] == 1 and fraction[2][7] == 0.25 and fraction.mask[2][0]  # lm_head: row "other"; NaN elsewhere


def test_a_saved_mask_reads_back_in_model_order_and_an_old_one_still_plots_in_model_order(tmp_path):
    import json

    mask = _mask(ROWS)
    folder = mask.save(tmp_path / "mask")
    header = json.loads((folder / "neuron_mask.json").read_text())
    assert list(header["shapes"]) == sorted(mask.masks)  # the header's keys are sorted (down_proj before q_proj) ...
    assert header["parameter_order"] == list(mask.masks)  # ... the model's order is kept beside them
    loaded = NeuronMask.load(folder)
    assert list(loaded.masks) == list(mask.masks) and "parameter_order" not in loaded.info
    del header["parameter_order"]  # a mask written before: alphabetical, the plot still in model order
    (folder / "neuron_mask.json").write_text(json.dumps(header))
    old = NeuronMask.load(folder)
    assert list(old.masks) == sorted(old.masks)
    axes = _panels(plots.mask_figure(old))["fraction trained"]
    assert _ticks(axes.get_xticklabels()) == [*MODEL_ORDER, "lm_head"]
    path = plots.plot_selection_heatmap(old, tmp_path / "mask.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header["parameter_order"] = "q_proj"
    (folder / "neuron_mask.json").write_text(json.dumps(header))
    with pytest.raises(Exception, match="parameter_order must be a list of parameter names"):
        NeuronMask.load(folder)


def test_scores_and_masks_keep_the_model_order_through_files_and_select_mask(tmp_path, monkeypatch):
    """A checkpoint's scores come in the model's order (its config), survive save/load, and select-mask --plot
    draws its heatmap with that order (a module type the plot does not know comes where the model has it)."""
    from hf_align import testbed
    from hf_align.cli import main
    from hf_align.scores import load_scores, save_scores, weight_diff_scores

    model_order = [name for name, _ in testbed.load().model.named_parameters()]
    assert model_order != sorted(model_order)
    scores = weight_diff_scores(testbed.MODEL_DIR, testbed.MODEL_DIR)
    assert list(scores) == [name for name in model_order if name in scores]
    save_scores(tmp_path / "scores", scores, {"method": "weight_diff"})
    assert list(load_scores(tmp_path / "scores")[0]) == list(scores)
    mask = NeuronMask.from_scores({name: torch.rand(3) for name in reversed(model_order)}, 0.5)
    assert list(mask.masks) == list(reversed(model_order))  # the caller's order, whatever the ranking's

    drawn = {}
    monkeypatch.setattr(plots, "plot_selection_heatmap", lambda mask, path, order=None: drawn.update(order=order))
    monkeypatch.setattr(plots, "plot_score_distribution", lambda *args, **kwargs: None)
    argv = ["select-mask", "--init", str(testbed.MODEL_DIR), "--trained", str(testbed.MODEL_DIR), "--plot",
            "--neuron_mask_ratio", "0.5", "--output_dir", str(tmp_path / "mask")]  # fmt: skip
    with pytest.warns(UserWarning, match="Every score is equal"):
        assert main(argv) == 0
    assert drawn["order"] == list(scores)
    assert list(NeuronMask.load(tmp_path / "mask").masks) == list(scores)


def test_explicit_parameter_order_wins_and_unknown_modules_keep_their_order():
    names = ["m.layers.0.zeta.weight", "m.layers.0.alpha.weight"]
    assert plots.module_order(["alpha", "zeta"], order=names) == ["zeta", "alpha"]
    assert plots.module_order(["zeta", "alpha", "q_proj"]) == ["q_proj", "zeta", "alpha"]
    axes = plots.mask_figure({(0, "alpha"): 0.5, (0, "zeta"): 0.25}, order=names).axes[0]
    assert _ticks(axes.get_xticklabels()) == ["zeta", "alpha"]
    assert axes.images[0].get_array()[0].tolist() == [0.25, 0.5]


def test_card_table_lists_modules_in_model_order_and_links_the_plot():
    from hf_align.hub import mask_summary

    lines = mask_summary(_mask(ROWS), plot="mask_plot.png")
    assert "![Neurons trained per layer and module](mask_plot.png)" in lines
    layer0 = [line.split("|")[2].strip() for line in lines if line.startswith("| 0 |")]
    assert layer0 == list(MODEL_ORDER)
    assert not any("mask_plot" in line for line in mask_summary(_mask(ROWS)))


def test_alpha_per_block_from_a_merge_plan_is_the_mean_per_layer_in_model_order():
    from hf_align.merging.plan import MergePlan

    alphas = {"model.embed_tokens.weight": 0.1, "lm_head.weight": 0.9, "model.norm.weight": 0.7}
    for layer in (0, 2, 10):
        alphas[f"model.layers.{layer}.self_attn.q_proj.weight"] = 0.2 + layer / 100
        alphas[f"model.layers.{layer}.mlp.up_proj.weight"] = 0.4 + layer / 100
    figure = plots.alpha_figure(MergePlan(alphas=alphas, description="partwise"), init=0.5)
    axes = figure.axes[0]
    assert _ticks(axes.get_xticklabels()) == ["embed", "layer 0", "layer 2", "layer 10", "final_norm", "head"]
    heights = [bar.get_height() for bar in axes.patches]
    assert heights == pytest.approx([0.1, 0.3, 0.32, 0.4, 0.7, 0.9])
    assert axes.get_title() == "partwise" and axes.get_ylabel() == "α (weight of the base model)"
    assert axes.lines[0].get_ydata()[0] == 0.5  # the start value
    with pytest.raises(ValueError, match="MergePlan"):
        plots.alpha_figure({})


def test_alpha_per_block_from_learned_alphas():
    learned = types.SimpleNamespace(block_alphas=[0.2, 0.6], head_alpha=0.8)
    axes = plots.alpha_figure(learned).axes[0]
    assert _ticks(axes.get_xticklabels()) == ["block 0", "block 1", "lm_head"]
    assert [bar.get_height() for bar in axes.patches] == pytest.approx([0.2, 0.6, 0.8])


DPO_LOGS = [
    {"loss": 0.69, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "step": 1},
    {"loss": 0.6, "rewards/chosen": 0.2, "rewards/rejected": -0.1, "rewards/margins": 0.3, "step": 2},
    {"eval_loss": 0.5, "step": 2},
    {"train_runtime": 1.0, "step": 2},
]
FEEDBACK_LOGS = [
    {"loss": 2.0, "reward": 0.1, "kl": 0.0, "pool/quantile_0": 2.0, "pool/quantile_1": 2.0, "step": 1},
    {"loss": 1.5, "reward": 0.4, "kl": 0.05, "pool/quantile_0": 4.0, "pool/quantile_1": 3.0, "step": 3},
]
NPO_LOGS = [
    {"loss": 1.0, "forget/loss": 0.7, "retain/loss": 0.3, "forget/nll": 2.0, "forget/logratio": 0.0, "step": 1},
    {"loss": 1.2, "forget/loss": 0.6, "retain/loss": 0.35, "forget/nll": 2.5, "forget/logratio": -0.4, "step": 2},
]


def _curves(axes):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}


def test_dpo_reward_curves():
    figure = plots.reward_kl_figure(DPO_LOGS)
    (axes,) = figure.axes  # DPO logs no KL: one panel
    assert axes.get_ylabel() == "reward" and axes.get_xlabel() == "step"
    assert _curves(axes) == {
        "rewards/chosen": ([1, 2], [0.0, 0.2]),
        "rewards/rejected": ([1, 2], [0.0, -0.1]),
        "rewards/margins": ([1, 2], [0.0, 0.3]),
    }


def test_feedback_reward_and_kl_curves_and_quantile_bins():
    reward, kl = plots.reward_kl_figure(FEEDBACK_LOGS).axes
    assert _curves(reward) == {"reward": ([1, 3], [0.1, 0.4])}
    assert _curves(kl) == {"kl": ([1, 3], [0.0, 0.05])} and kl.get_ylabel().startswith("KL")
    axes = plots.quantile_figure(FEEDBACK_LOGS).axes[0]
    assert _ticks(axes.get_xticklabels()) == ["quantile 0", "quantile 1"]
    assert [bar.get_height() for bar in axes.patches] == [2.0, 2.0, 4.0, 3.0]  # step 1's bins, then step 3's
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["step 1", "step 3"]
    assert axes.get_xlabel() == "quantile bin (0 = best)" and axes.get_ylabel() == "rows in the pool"


def test_npo_forget_retain_curve():
    (axes,) = plots.forget_retain_figure(NPO_LOGS).axes
    assert _curves(axes) == {
        "forget/loss": ([1, 2], [0.7, 0.6]),
        "retain/loss": ([1, 2], [0.3, 0.35]),
        "forget/nll": ([1, 2], [2.0, 2.5]),
    }
    assert _curves(plots.reward_kl_figure(NPO_LOGS).axes[0]) == {"forget/logratio": ([1, 2], [0.0, -0.4])}


def test_only_plots_with_data_are_made():
    assert set(plots.training_figures(DPO_LOGS)) == {plots.REWARD_PLOT_FILE}
    assert set(plots.training_figures(NPO_LOGS)) == {plots.REWARD_PLOT_FILE, plots.FORGET_RETAIN_PLOT_FILE}
    assert set(plots.training_figures(FEEDBACK_LOGS)) == {plots.REWARD_PLOT_FILE, plots.QUANTILE_PLOT_FILE}
    assert plots.training_figures([{"loss": 1.0, "step": 1}]) == {}


# ---- the callback ----------------------------------------------------------------------------------------------


class FakeWriter:
    """Stands in for tensorboard's SummaryWriter: the callback's calls, checked without an event file."""

    opened: list = []

    def __init__(self, log_dir=None):
        self.figures, self.closed = [], False
        FakeWriter.opened.append(self)

    def add_figure(self, tag, figure, global_step=None):
        self.figures.append((tag, figure, global_step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def _tensorboard_callback(writer):
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback.__new__(TensorBoardCallback)  # its __init__ needs tensorboard installed
    callback.tb_writer, callback._SummaryWriter, callback.logging_dir = writer, FakeWriter, "runs"
    return callback


def _state(log_history, step=2):
    from transformers import TrainerState

    state = TrainerState()
    state.log_history, state.global_step = log_history, step
    return state


def test_callback_writes_pngs_and_logs_them_to_tensorboard_and_wandb(tmp_path):
    from transformers.integrations import WandbCallback

    from hf_align.callbacks import TrainingPlotsCallback

    live, closed = FakeWriter(), _tensorboard_callback(None)  # the second's writer was closed by its on_train_end
    logged = []
    wandb = types.SimpleNamespace(run=object(), Image=lambda figure: ("image", figure), log=logged.append)
    wandb_callback = WandbCallback.__new__(WandbCallback)
    wandb_callback._wandb = wandb
    trainer = types.SimpleNamespace(
        neuron_mask=_mask(ROWS),
        callback_handler=types.SimpleNamespace(callbacks=[_tensorboard_callback(live), closed, wandb_callback]),
    )
    callback = TrainingPlotsCallback(trainer=trainer)
    args = types.SimpleNamespace(output_dir=str(tmp_path))
    callback.on_train_begin(args, _state([]), None, model=None)
    callback.on_train_end(args, _state(FEEDBACK_LOGS, step=3), None, model=None)
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == sorted([plots.MASK_PLOT_FILE, plots.REWARD_PLOT_FILE, plots.QUANTILE_PLOT_FILE])
    assert [(tag, step) for tag, _, step in live.figures] == [("plots/reward_kl", 3), ("plots/pool_quantiles", 3)]
    reopened = FakeWriter.opened[-1]
    assert reopened is not live and len(reopened.figures) == 2 and reopened.closed and closed.tb_writer is None
    assert set(logged[0]) == {"plots/reward_kl", "plots/pool_quantiles"}


def test_callback_plots_learned_alphas_of_an_adaptive_merge(tmp_path):
    from hf_align.callbacks import TrainingPlotsCallback
    from hf_align.merging.adaptive import AlphaParameters

    model = torch.nn.Module()
    model.ama_alphas = AlphaParameters(2, init_val=0.3, epsilon=0.0)
    callback = TrainingPlotsCallback()
    callback.on_train_end(types.SimpleNamespace(output_dir=str(tmp_path)), _state([]), None, model=model)
    assert [p.name for p in callback.written] == [plots.ALPHA_PLOT_FILE]
    with torch.no_grad():
        blocks, head = model.ama_alphas()
    expected = [*blocks.tolist(), float(head)]
    figure = plots.alpha_figure({"block 0": expected[0], "block 1": expected[1], "lm_head": expected[2]}, init=0.3)
    assert [bar.get_height() for bar in figure.axes[0].patches] == pytest.approx(expected)


# ---- no silent no-op --------------------------------------------------------------------------------------------


def test_a_run_whose_parameters_did_not_move_says_so_once(caplog):
    from hf_align.callbacks import NoOpWarningCallback

    model = torch.nn.Linear(3, 2)
    callback = NoOpWarningCallback()
    with caplog.at_level(logging.WARNING, logger="hf_align.callbacks.no_op_warnings"):
        callback.on_train_begin(None, _state([], step=0), None, model=model)
        callback.on_log(None, _state([], step=1), None, logs={"loss": 0.6931, "learning_rate": 0.0}, model=model)
        callback.on_log(None, _state([], step=2), None, logs={"loss": 0.6931, "learning_rate": 0.0}, model=model)
    assert len(callback.warned) == 1 and "no trainable parameter changed in the first 1 step(s)" in caplog.text
    assert "loss 0.6931" in callback.warned[0] and "learning rate 0.0" in callback.warned[0]

    moved = NoOpWarningCallback()
    moved.on_train_begin(None, _state([], step=0), None, model=model)
    with torch.no_grad():
        model.bias[0] += 1e-6
    moved.on_log(None, _state([], step=1), None, logs={"loss": 0.5}, model=model)
    assert moved.warned == []


def test_a_4bit_base_is_confirmed_in_one_line():
    from hf_align.callbacks import NoOpWarningCallback

    model = torch.nn.Linear(2, 2)
    model.is_loaded_in_4bit = True
    model.config = types.SimpleNamespace(
        quantization_config={"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
    )
    callback = NoOpWarningCallback()
    callback.on_train_begin(None, _state([], step=0), None, model=model)
    assert callback.warned == [
        "hf-align: base model loaded in 4-bit (nf4, compute dtype bfloat16); trainable weights stay unquantized."
    ]
    callback = NoOpWarningCallback()
    callback.on_train_begin(None, _state([], step=0), None, model=torch.nn.Linear(2, 2))
    assert callback.warned == []


def test_merge_writes_the_alpha_plot_of_its_plan_when_asked(tmp_path):
    from hf_align import testbed
    from hf_align.merging import merge_models
    from hf_align.plots import alpha_blocks

    result = merge_models(
        testbed.MODEL_DIR, testbed.MODEL_DIR, tmp_path / "merged", alpha=0.3, progress=False, plot=True
    )
    assert (tmp_path / "merged" / plots.ALPHA_PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(alpha_blocks(result.plan).values()) == {0.3}
    merge_models(testbed.MODEL_DIR, testbed.MODEL_DIR, tmp_path / "plain", alpha=0.3, progress=False)
    assert not (tmp_path / "plain" / plots.ALPHA_PLOT_FILE).exists()  # off by default


def test_callback_makes_the_output_folder_it_writes_into(tmp_path):
    from hf_align.callbacks import TrainingPlotsCallback

    args = types.SimpleNamespace(output_dir=str(tmp_path / "not" / "yet"))
    TrainingPlotsCallback(mask=_mask(ROWS)).on_train_begin(args, _state([]), None, model=None)
    assert (tmp_path / "not" / "yet" / plots.MASK_PLOT_FILE).is_file()


def test_the_aligner_commands_get_the_default_callbacks(tmp_path, caplog):
    """`aligner-dpo` runs TRL's own DPOTrainer: the CLI adds hf-align's callbacks to it (reward/KL plot written; the
    zero-initialised gate at lr 0 on step one is named as a no-op). Fails on the old CLI: no plot, no warning."""
    import logging

    from hf_align.cli.training import run_command

    out = tmp_path / "out"
    argv = ["--model_name_or_path", "testbed", "--dataset_name", "testbed:preference", "--use_cpu", "true",
            "--bf16", "false", "--report_to", "none", "--max_steps", "2", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--learning_rate", "0", "--save_strategy", "no",
            "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert run_command("aligner-dpo", argv, launch=False) == 0
    assert (out / "reward_kl.png").is_file()
    assert any("changed" in record.getMessage() for record in caplog.records)


def test_plots_reach_a_real_tensorboard_event_file(tmp_path):
    """With tensorboard installed, the Trainer's own TensorBoardCallback (its real SummaryWriter) receives the
    figures: the event file holds one image per plot under ``plots/<name>`` at the run's last step."""
    pytest.importorskip(
        "tensorboard", reason="tensorboard is not installed here; the FakeWriter test above covers the calls"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerControl
    from transformers.integrations import TensorBoardCallback

    from hf_align.callbacks import TrainingPlotsCallback

    board = TensorBoardCallback()
    trainer = types.SimpleNamespace(callback_handler=types.SimpleNamespace(callbacks=[board]))
    args = types.SimpleNamespace(output_dir=str(tmp_path), logging_dir=str(tmp_path / "runs"))
    board.logging_dir = str(tmp_path / "runs")
    board._init_summary_writer(args)
    state = _state(DPO_LOGS, step=4)
    TrainingPlotsCallback(trainer=trainer).on_train_end(args, state, TrainerControl(), model=None)
    board.tb_writer.close()
    events = EventAccumulator(str(tmp_path / "runs"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["plots/reward_kl"]
    (image,) = events.Images("plots/reward_kl")
    assert image.step == 4 and image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 100


def test_a_pushed_mask_card_shows_its_plot(tmp_path):
    """`push_neuron_mask` uploads mask_plot.png beside the mask and its card links it."""
    from hf_align.hub import push_neuron_mask

    uploaded = {}

    class Api:
        def create_repo(self, *args, **kwargs):
            pass

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update({p.name: p.read_bytes() for p in __import__("pathlib").Path(folder_path).iterdir()})

    push_neuron_mask(_mask(ROWS), "me/mask", api=Api())
    assert uploaded[plots.MASK_PLOT_FILE][:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![Neurons trained per layer and module]({plots.MASK_PLOT_FILE})" in uploaded["README.md"].decode()
