"""One line when a run is not doing what its user thinks: a 4-bit base (said once, so it is confirmed), and
trainable parameters that did not change in the first logged steps (e.g. Aligner's zero-initialised gate under a
learning rate of 0 at step one: the loss stays at log 2 = 0.6931 and nothing says why).

hf-align's trainers add :class:`NoOpWarningCallback`; any ``transformers.Trainer`` can (``trainer.add_callback``).
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)


def parameter_fingerprint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per trainable parameter, ``(sum, sum of squares)`` in float64: two numbers that any optimizer step with a
    nonzero update changes, without keeping a copy of the weights. A ZeRO-3 parameter is read from its local shard."""
    prints = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            data = getattr(param, "ds_tensor", param).detach().double()
            prints[name] = torch.stack([data.sum(), data.square().sum()])
    return prints


def quantization_line(model: torch.nn.Module) -> str | None:
    """``"base model loaded in 4-bit (nf4, compute dtype bfloat16)"`` for a bitsandbytes 4-bit model, else None."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return None
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    quant_type = get("bnb_4bit_quant_type", "4-bit")
    compute = str(get("bnb_4bit_compute_dtype", "float32")).replace("torch.", "")
    return f"hf-align: base model loaded in 4-bit ({quant_type}, compute dtype {compute}); trainable weights stay unquantized."


class NoOpWarningCallback(TrainerCallback):
    """Warns once, at the first training log, when no trainable parameter changed since training began; confirms a
    4-bit base in one line at train begin."""

    def __init__(self):
        self._start: dict[str, torch.Tensor] | None = None
        self.warned: list[str] = []

    def _warn(self, message: str) -> None:
        logger.warning(message)
        self.warned.append(message)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        line = quantization_line(model)
        if line is not None and state.is_world_process_zero:
            self._warn(line)
        if state.global_step == 0:  # a resumed run compares nothing: its first steps are long past
            self._start = parameter_fingerprint(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._start is None or model is None or state.global_step < 1 or "loss" not in (logs or {}):
            return
        start, self._start = self._start, None
        now = parameter_fingerprint(model)
        changed = any(not torch.equal(now[name], value) for name, value in start.items() if name in now)
        if start and not changed and state.is_world_process_zero:
            self._warn(
                f"hf-align: no trainable parameter changed in the first {state.global_step} step(s) (loss "
                f"{logs['loss']:.4g}, learning rate {logs.get('learning_rate', 'n/a')}): check the learning rate and "
                "warmup (a zero-initialised gate or adapter at lr 0 trains nothing)."
            )
