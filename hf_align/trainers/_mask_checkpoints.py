"""Trainer glue for neuron deltas, shared by MaskedDPO, NPO and the rest: attaching them, saving, resuming."""

from __future__ import annotations

from pathlib import Path

import torch


DELTAS_DIR = "neuron_deltas"


def attach_mask(model, mask, args, peft_config=None):
    """Load ``model`` if it is a path (with the config's ``model_init_kwargs``) and attach trainable deltas at the
    neurons of ``mask`` (which is checked against it); returns the model. Masks and PEFT adapters exclude each other."""
    from accelerate.utils import is_peft_model

    if peft_config is not None or is_peft_model(model):
        raise ValueError("A neuron mask and a PEFT adapter cannot be combined: train one or the other.")
    if isinstance(model, str):
        from trl.trainer.utils import create_model_from_path

        init_kwargs = dict(args.model_init_kwargs or {})
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        model = create_model_from_path(model, **init_kwargs)
    from hf_align.sparse_update import attach_deltas

    dtype = getattr(args, "neuron_delta_dtype", "auto")
    return attach_deltas(model, mask, None if dtype == "auto" else getattr(torch, dtype))  # validates the mask too


class NeuronMaskTrainerMixin:
    """Checkpointing for a trainer whose model carries neuron deltas (``self.neuron_mask`` set, or None).

    Final saves are a normal transformers checkpoint with the deltas merged (``save_merged=True``) or only the
    deltas + mask; checkpoints always keep the exact deltas under ``neuron_deltas/`` so resuming continues from the
    frozen base plus deltas.
    """

    neuron_mask = None

    def _trainable_fraction(self) -> float:
        model = self.accelerator.unwrap_model(self.model)
        if self.neuron_mask is not None:
            from hf_align.sparse_update import trainable_fraction

            return float(trainable_fraction(model))
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return trainable / max(total, 1)

    def _has_deltas(self) -> bool:
        if self.neuron_mask is None:
            return False
        from hf_align.sparse_update import has_deltas

        return has_deltas(self.accelerator.unwrap_model(self.model))

    def _save_checkpoint(self, model, trial):
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self._has_deltas():
            return super()._save(output_dir, state_dict)
        from hf_align.sparse_update import save_model_with_deltas

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # Checkpoints keep the exact deltas so `resume_from_checkpoint` continues from the frozen base + deltas.
        save_model_with_deltas(
            self.accelerator.unwrap_model(self.model),
            output_dir,
            self.neuron_mask,
            save_merged=self.args.save_merged,
            keep_deltas=getattr(self, "_in_checkpoint", False),
            deltas_dir=DELTAS_DIR,
        )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._has_deltas():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_deltas_dir(resume_from_checkpoint)

    def _load_best_model(self):
        if not self._has_deltas():
            return super()._load_best_model()
        self._load_deltas_dir(self.state.best_model_checkpoint)

    def _load_deltas_dir(self, checkpoint: str) -> None:
        from hf_align.sparse_update import load_deltas

        path = Path(checkpoint) / DELTAS_DIR
        if not path.is_dir():
            path = Path(checkpoint)
        load_deltas(self.accelerator.unwrap_model(self.model), path)
