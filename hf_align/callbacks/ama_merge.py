"""``AMAMergeCallback``: write the AMA-averaged model θ = α·θ_base + (1−α)·θ_trained during any Trainer run.

After each checkpoint save (``merge_on="save"``), at train end (``"end"``) or both, the callback streams
``base_model`` and the freshly trained weights through :func:`hf_align.merging.merge_models` with a fixed
``alpha`` or a plan (a :class:`~hf_align.merging.MergePlan` or a builder ``(names, config) → MergePlan``,
e.g. ``partwise_builder("10#20", "0.4|0.3|0.2")``, which reads the layer count and tied embeddings from the
checkpoint's config), into ``<checkpoint>/<subdir>`` and
``<output_dir>/<subdir>``. PEFT checkpoints (adapter folders) are merged into their base first; a masked
trainer's model gives the plain weights its neuron deltas make (from memory when ``save_merged=False`` left only
the deltas on disk). Each merged folder gets a card naming the run; with ``push_to_hub`` it is uploaded with
:func:`hf_align.hub.push_folder`, its card naming ``hub_repo_id``. Needs no mergekit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from hf_align.io import PathLike, scratch_dir
from hf_align.merging.plan import MergePlan, check_alpha


class AMAMergeCallback(TrainerCallback):
    """Averages each saved checkpoint (and/or the final model) with ``base_model``; see the module docstring."""

    def __init__(
        self,
        base_model: PathLike,
        alpha: float | None = None,
        plan: MergePlan | Callable | None = None,
        merge_on: str = "both",
        subdir: str = "ama_merged",
        dtype: str | None = None,
        max_shard_size: int | str = "500MB",
        push_to_hub: bool = False,
        hub_repo_id: str | None = None,
        hub_private: bool | None = None,
    ):
        if (alpha is None) == (plan is None):
            raise ValueError("AMAMergeCallback: pass exactly one of alpha or plan.")
        if alpha is not None:
            check_alpha(alpha, "alpha")
        if merge_on not in ("save", "end", "both"):
            raise ValueError(f"merge_on must be 'save', 'end' or 'both', got {merge_on!r}.")
        if push_to_hub and not hub_repo_id:
            raise ValueError("push_to_hub=True needs hub_repo_id (where the merged model goes).")
        self.base_model, self.alpha, self.plan = str(base_model), alpha, plan
        self.merge_on, self.subdir, self.dtype, self.max_shard_size = merge_on, subdir, dtype, max_shard_size
        self.push_to_hub, self.hub_repo_id, self.hub_private = push_to_hub, hub_repo_id, hub_private
        self.merged_dirs: list[Path] = []
        from hf_align.loading import check_gguf_inputs

        self._base_gguf = check_gguf_inputs(self.base_model)[0]  # a bad file: one line now, not at the first save
        self._converted: contextlib.ExitStack | None = None
        self._base_checkpoint: str | None = None

    def merge(self, trained: PathLike, output_dir: PathLike, aligned: str | None = None) -> Path:
        """Merge ``trained`` with the base into ``output_dir`` (and push it); ``aligned``: what the card calls the
        trained model (the run's Hub id or name) when ``trained`` is a folder of the run's."""
        from hf_align.merging.streaming import merge_models

        result = merge_models(
            self._base_for_merge(), trained, output_dir, alpha=self.alpha, plan=self.plan, dtype=self.dtype,
            max_shard_size=self.max_shard_size, overwrite=True, progress=False,
        )  # fmt: skip
        self.merged_dirs.append(result.output_dir)
        from hf_align.hub import merge_model_card, push_folder, write_model_card

        repo = self.hub_repo_id if self.push_to_hub else f"./{Path(output_dir).name}"  # what its quick start loads
        card = merge_model_card(self.base_model, aligned or str(trained), result.plan, repo=repo)
        write_model_card(card, result.output_dir)  # names the run, not its scratch folder; uploaded with it
        if self.push_to_hub:
            message = f"AMA merge of {Path(trained).name}"
            push_folder(result.output_dir, self.hub_repo_id, private=self.hub_private, commit_message=message)
        return result.output_dir

    @staticmethod
    def _run_name(args, step: int | None = None) -> str:
        """The trained model as a card names it: the run's Hub id when the run pushes there (the Hub refuses a
        ``base_model`` that does not exist), else its output folder's name; and the checkpoint."""
        name = args.hub_model_id if args.push_to_hub and args.hub_model_id else Path(args.output_dir).name
        return name if step is None else f"{name} (checkpoint-{step})"

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.merge_on in ("save", "both") and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not checkpoint.is_dir():
                return control
            name = self._run_name(args, state.global_step)
            if _holds_deltas_only(model, args):  # a masked trainer's save_merged=False: no full weights on disk
                self._merge_live(model, processing_class, args, checkpoint / self.subdir, name)
            else:
                self.merge(checkpoint, checkpoint / self.subdir, name)
        return control

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        try:
            if self.merge_on in ("end", "both") and state.is_world_process_zero and model is not None:
                # the final weights may not be on disk yet (save_model comes later)
                output_dir = Path(args.output_dir) / self.subdir
                self._merge_live(model, processing_class, args, output_dir, self._run_name(args))
        finally:
            self._release_base()
        return control

    def _base_for_merge(self) -> str:
        """The base as the merge reads it: a GGUF is converted once per run (float32, exact), not at every save."""
        if self._base_gguf is None:
            return self.base_model
        if self._base_checkpoint is None:
            from hf_align.loading import gguf_as_checkpoints

            self._converted = contextlib.ExitStack()
            self._base_checkpoint = str(gguf_as_checkpoints(self._converted, self.base_model)[0])
        return self._base_checkpoint

    def _release_base(self) -> None:
        if self._converted is not None:
            self._converted.close()  # removes the converted folder
        self._converted = self._base_checkpoint = None

    def _merge_live(self, model, processing_class, args, output_dir: Path, aligned: str) -> None:
        """Merge the model as it is in memory: saved into a scratch folder first, as plain weights (a masked
        trainer's model holds its neuron deltas as parametrizations)."""
        from hf_align.sparse_update import has_deltas, merged_state_dict

        with scratch_dir(Path(args.output_dir) / "ama_final") as tmp:  # a killed run leaves it; the next removes it
            model.save_pretrained(tmp, state_dict=merged_state_dict(model) if has_deltas(model) else None)
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(tmp)
            self.merge(tmp, output_dir, aligned)


def _holds_deltas_only(model, args) -> bool:
    """Whether the checkpoint just saved holds a masked trainer's deltas but no merged weights."""
    if model is None or getattr(args, "save_merged", True):
        return False
    from hf_align.sparse_update import has_deltas

    return has_deltas(model)


__all__ = ["AMAMergeCallback"]
