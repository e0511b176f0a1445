"""`hf-align quickstart` (the README's first command) really aligns the testbed model, for both methods."""

import pytest

from hf_align.cli import main
from hf_align.cli.quickstart import QuickstartArguments
from hf_align.scripts.quickstart import run


def test_masked_dpo_quickstart_raises_reward_and_trains_only_its_rows(tmp_path):
    result = run(QuickstartArguments(output_dir=str(tmp_path), eval_prompts=128))
    assert result["after"]["mean_reward"] > result["before"]["mean_reward"] + 0.05, result
    mask_dir = tmp_path / "warmup" / "neuron_mask"
    assert (mask_dir / "neuron_mask.safetensors").exists() and (mask_dir / "neuron_mask.json").exists()
    assert (tmp_path / "model.safetensors").exists()  # merged, loadable without hf_align


@pytest.mark.parametrize("method", ["dpo"])
def test_plain_dpo_quickstart_through_the_cli(tmp_path, capsys, method):
    argv = [
        "quickstart",
        "--method",
        method,
        "--max_steps",
        "20",
        "--eval_prompts",
        "32",
        "--output_dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reward before:" in out and "reward after:" in out
    assert (tmp_path / "model.safetensors").exists()
