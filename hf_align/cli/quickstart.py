"""``hf-align quickstart``: see alignment happen on a laptop CPU in a minute.

Default (``--method masked-dpo``, ALLO in miniature): a short warm-up DPO with ``MaskAccumulationCallback`` scores
every decoder row by its accumulated gradient, ``NeuronMask.from_scores`` keeps the top 10 %, and
``MaskedDPOTrainer`` aligns the embedded testbed model training only those rows. ``--method dpo`` runs plain
``trl.DPOTrainer`` instead. Prints the mean reward of the model's samples before and after. Offline; writes only
under ``--output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_align.config_checks import AT_LEAST_ONE, FRACTION, CheckedConfig, option


@dataclass
class QuickstartArguments(CheckedConfig):
    """The quickstart's knobs (defaults: the README's numbers)."""

    method: str = option(
        "masked-dpo",
        help="masked-dpo: warm-up scores + MaskedDPOTrainer on the top rows (ALLO); dpo: plain trl.DPOTrainer.",
        choices=("masked-dpo", "dpo"),
    )
    max_steps: int = option(60, help="Optimizer steps of the alignment run.", range=AT_LEAST_ONE)
    warmup_steps: int = option(20, help="Warm-up DPO steps that score the rows.", range=AT_LEAST_ONE)
    learning_rate: float | None = option(None, help="Defaults to a value tuned per method.")
    neuron_mask_ratio: float = option(0.1, help="Fraction of rows trained (masked-dpo).", range=FRACTION)
    num_pairs: int = option(512, help="Preference pairs generated from the testbed task.", range=AT_LEAST_ONE)
    eval_prompts: int = option(256, help="Prompts sampled to measure the reward.", range=AT_LEAST_ONE)
    output_dir: str | None = option(None, help="Where the aligned model goes (default: a temp dir).")
    overwrite: bool = option(False, help="Write into an --output_dir that is not empty.")
    seed: int = option(0, help="Training seed.")


def main(argv: list[str] | None = None) -> int:
    from hf_align.cli.common import parse_command

    (args,) = parse_command("hf-align quickstart", (QuickstartArguments,), argv, description=__doc__)
    from hf_align.scripts.quickstart import run

    run(args)
    return 0
