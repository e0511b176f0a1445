"""benchmarks/fidelity.py --quick end to end (the issue's CI smoke): every section runs and the report is complete."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fidelity_quick_writes_a_complete_report(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    monkeypatch.setattr(fidelity, "RESULTS", tmp_path)  # never overwrite the committed results

    threads = torch.get_num_threads()
    try:
        assert fidelity.main(["--quick"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() pins one thread
    report = json.loads((tmp_path / "fidelity_quick.json").read_text())
    summary = report["summary"]
    assert set(summary["ablation"]) == {
        "start", "dpo", "masked_top10", "masked_random10", "masked_bottom10", "allo_pipeline"
    }  # fmt: skip
    adapters = report["adapters"]  # benchmarks/fidelity_adapters.py, run as a section
    assert set(adapters["summary"]) == {"no_ugh", "ugh_on_rev"}
    assert set(adapters["summary"]["no_ugh"]) == {
        "aligner_n1",
        "aligner_n10",
        "lora_r8",
        "llama_adapter",
        "logit_bias",
    }
    assert all("dpo" in v for v in adapters["summary"]["no_ugh"].values())
    for entry in adapters["styles"]["no_ugh"].values():  # every adapter swept over the same lrs, one chosen from them
        assert sorted(entry["sft_sweep"], key=float) == [f"{lr:g}" for lr in adapters["settings"]["lrs"]]
        assert entry["sft_lr"] in adapters["settings"]["lrs"] and entry["dpo_lr"] in adapters["settings"]["dpo_lrs"]
    assert (tmp_path / "fidelity_adapters_quick.json").exists() and adapters["findings"]
    assert [v["name"] for v in report["runs"][0]["ama_variants"]] == [
        *fidelity.PARTWISE, "adaptive init 0.2", "adaptive init 0.4"
    ]  # fmt: skip
    assert summary["feedback"][0]["step"] == 0 and "reward_bare" in summary["feedback"][-1]
    numbers = [v[0] for row in summary["ablation"].values() for v in row.values()]
    assert all(math.isfinite(x) for x in numbers)
    # the start model is the same model everywhere: the ablation's start equals the linear α = 1 merge
    assert summary["ama"]["1.0"]["mean_reward"][0] == pytest.approx(summary["ablation"]["start"]["mean_reward"][0])
    markdown = (tmp_path / "fidelity_quick.md").read_text()
    assert "allo_pipeline" in markdown and "partwise 0.4\\|0.3\\|0.2" in markdown and "## Findings" in markdown
    assert "## Aligner vs its paper's baselines" in markdown and "| no_ugh | llama_adapter |" in markdown
    assert {p.name for p in tmp_path.glob("*.png")} == set(report["plots"])
    # --rewrite renders the same adapters section from the JSON files (how a separately run section is merged)
    assert fidelity.main(["--quick", "--rewrite"]) == 0

    def section(text):
        return text[text.index("## Aligner vs") : text.index("## Feedback")]

    assert section((tmp_path / "fidelity_quick.md").read_text()) == section(markdown)
