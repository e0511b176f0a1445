"""Plots written next to a run's outputs and sent to the trackers the run reports to.

:class:`TrainingPlotsCallback` writes, into ``args.output_dir`` on the main process:

* ``mask_plot.png`` at train begin, when the run trains a neuron mask (the model card links it);
* at train end, every plot the logs have data for: ``reward_kl.png`` (DPO's ``rewards/*``, feedback's ``reward`` /
  ``kl``, NPO's ``forget/logratio``), ``forget_retain.png`` (NPO), ``pool_quantiles.png`` (Quark/ALT pool per
  quantile bin) and ``merge_alphas.png`` (adaptive AMA's learned α per block).

Each figure also goes to TensorBoard (through the Trainer's own ``TensorBoardCallback`` and its writer) and to W&B
(``WandbCallback``'s run) when ``report_to`` has them. hf-align's trainers add this callback unless
``plots=False`` or matplotlib (the ``plots`` extra) is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from hf_align import plots


logger = logging.getLogger(__name__)


def _alpha_source(model) -> tuple[dict[str, float], float] | None:
    """Adaptive AMA's normalised α's (``{block: α}``, start value) when ``model`` carries them."""
    alphas = getattr(model, "ama_alphas", None)
    if alphas is None or not callable(alphas):
        return None
    with torch.no_grad():
        blocks, head = alphas()
    values = {f"block {i}": float(a) for i, a in enumerate(blocks.detach().float().cpu().tolist())}
    return {**values, "lm_head": float(head)}, float(alphas.init_val)


def log_figures(callbacks, figures: dict[str, Any], args, step: int) -> list[str]:
    """Send ``{file name: Figure}`` to the TensorBoard writer and the W&B run of the Trainer's integration
    ``callbacks`` (tag ``plots/<name>``); the names of the trackers reached."""
    from transformers.integrations import TensorBoardCallback, WandbCallback

    reached = []
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback):
            closed = callback.tb_writer is None  # its on_train_end may have run first and closed the writer
            if closed:
                callback._init_summary_writer(args)
            if callback.tb_writer is None:
                continue
            for name, figure in figures.items():
                callback.tb_writer.add_figure(f"plots/{Path(name).stem}", figure, global_step=step)
            callback.tb_writer.flush()
            if closed:
                callback.tb_writer.close()
                callback.tb_writer = None
            reached.append("tensorboard")
        elif isinstance(callback, WandbCallback) and getattr(callback._wandb, "run", None) is not None:
            wandb = callback._wandb
            wandb.log({f"plots/{Path(name).stem}": wandb.Image(figure) for name, figure in figures.items()})
            reached.append("wandb")
    return reached


class TrainingPlotsCallback(TrainerCallback):
    """PNG plots of the run in ``args.output_dir``, also logged to TensorBoard / W&B (see the module docstring).

    ``trainer``: the Trainer this callback is added to (its ``neuron_mask`` is plotted and its integration callbacks
    receive the figures); ``mask``: a ``NeuronMask`` (or a zero-argument callable returning one) to plot instead.
    """

    def __init__(self, trainer=None, mask: Any | Callable[[], Any] | None = None):
        self.trainer, self.mask = trainer, mask
        self.written: list[Path] = []

    def _mask(self):
        mask = self.mask() if callable(self.mask) else self.mask
        if mask is None and self.trainer is not None:
            mask = getattr(self.trainer, "neuron_mask", None)
        return mask

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        mask = self._mask()
        if mask is None or not state.is_world_process_zero:
            return
        from hf_align.architectures import plain_name

        order = [n for n in (plain_name(name) for name, _ in model.named_parameters()) if n] if model else None
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)  # the Trainer makes it only at its first save
        path = plots.plot_selection_heatmap(mask, folder / plots.MASK_PLOT_FILE, order=order)
        self.written.append(path)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        figures = plots.training_figures(state.log_history)
        alphas = _alpha_source(model) if model is not None else None
        if alphas is not None:
            figures[plots.ALPHA_PLOT_FILE] = plots.alpha_figure(alphas[0], init=alphas[1], title="Learned α per block")
        folder = Path(args.output_dir)
        if figures:
            folder.mkdir(parents=True, exist_ok=True)
        self.written += [plots.save_figure(figure, folder / name) for name, figure in figures.items()]
        if figures and self.trainer is not None:
            log_figures(self.trainer.callback_handler.callbacks, figures, args, state.global_step)
        if figures:
            logger.info("hf-align: plots written to %s: %s", folder, ", ".join(sorted(figures)))
