"""The callbacks every training command gets: hf-align's trainers add them in ``__init__``; the CLI adds them to
the TRL trainers it runs unchanged (``aligner-sft``, ``aligner-dpo``) with :func:`add_default_callbacks`."""

from __future__ import annotations


def add_default_callbacks(trainer, plots: bool | None = None) -> None:
    """Add :class:`~hf_align.callbacks.NoOpWarningCallback` to ``trainer``, and
    :class:`~hf_align.callbacks.TrainingPlotsCallback` when ``plots`` (default: ``trainer.args.plots``, True for a
    config without that field) and matplotlib is installed. Adding them twice adds nothing (a trainer whose
    ``__init__`` runs both the library trainer's set-up and hf-align's mixin gets each once)."""
    from hf_align.callbacks.no_op_warnings import NoOpWarningCallback
    from hf_align.plots import matplotlib_available

    if any(isinstance(callback, NoOpWarningCallback) for callback in trainer.callback_handler.callbacks):
        return
    trainer.add_callback(NoOpWarningCallback())
    if plots is None:
        plots = getattr(trainer.args, "plots", True)
    if plots and matplotlib_available():
        from hf_align.callbacks.plots import TrainingPlotsCallback

        trainer.add_callback(TrainingPlotsCallback(trainer=trainer))
