"""``python -m benchmarks.fidelity --quick`` end to end (the CI smoke): every section runs, the report is complete."""

import json
import math

import pytest
import torch


@pytest.mark.slow
def test_fidelity_quick_writes_a_complete_report(tmp_path, monkeypatch):
    from benchmarks.fidelity import report as fidelity

    monkeypatch.setattr(fidelity, "RESULTS", tmp_path)  # never overwrite the committed results

    threads = torch.get_num_threads()
    try:
        assert fidelity.main(["--quick"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() pins one thread
    report = json.loads((tmp_path / "fidelity_quick.json").read_text())
    assert report["planned_sections"] == ["allo", "adapters", "unlearning"]
    assert set(report["sections"]) == set(report["planned_sections"])  # every section script finished
    sections = {n: json.loads((tmp_path / f"fidelity_{n}_quick.json").read_text()) for n in report["sections"]}

    allo = sections["allo"]
    names = [v["name"] for v in allo["variants"]]
    assert {"dpo", "mask_top10", "mask_random10", "mask_bottom10", "allo_forget", "allo_epsilon", "allo_full"} <= set(
        names
    )
    first = allo["runs"]["0"]
    for name in names:  # every variant swept over the same lrs, its lr chosen from them, scored on the test prompts
        assert sorted(first["sweep"][name], key=float) == [f"{lr:g}" for lr in allo["settings"]["lrs"]]
        assert allo["lr"][name] in first["sweep"][name] and math.isfinite(allo["summary"][name]["mean_reward"][0])
    adapters = sections["adapters"]
    assert set(adapters["summary"]) == {"no_ugh", "ugh_on_rev"}
    for entry in adapters["styles"]["no_ugh"].values():
        assert sorted(entry["sft_sweep"], key=float) == [f"{lr:g}" for lr in adapters["settings"]["lrs"]]

    run = report["runs"][0]
    assert [v["name"] for v in run["ama_variants"]] == [*fidelity.PARTWISE, "adaptive init 0.2", "adaptive init 0.4"]
    assert all(len(v["block_alphas"]) == 3 for v in run["ama_variants"][2:])
    summary = report["summary"]
    assert summary["feedback"][0]["step"] == 0 and "reward_bare" in summary["feedback"][-1]
    # one start model, one set of test prompts: ALLO's start equals the linear α = 1 merge in this file's AMA
    (ama,) = summary["ama"].values()
    assert ama["1.0"]["mean_reward"][0] == pytest.approx(allo["start"]["test"]["mean_reward"])

    markdown = (tmp_path / "fidelity_quick.md").read_text()
    for heading in ("## ALLO:", "## AMA:", "## Aligner vs its paper's baselines", "## Feedback", "## Not shown"):
        assert heading in markdown
    assert "partwise 0.4\\|0.3\\|0.2" in markdown and "Findings (ALLO):" in markdown
    assert {p.name for p in tmp_path.glob("*.png")} == set(report["plots"])
    # --rewrite renders the same report from the JSON files (how a separately run section is merged)
    assert fidelity.main(["--quick", "--rewrite"]) == 0
    assert (tmp_path / "fidelity_quick.md").read_text() == markdown
