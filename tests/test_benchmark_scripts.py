"""The step-time benchmarks run end to end (a smoke run: tiny model, one repeat; numbers are not checked here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Llama saved as a transformers folder with its own tokenizer (what ``--model`` takes)."""
    from hf_align import testbed

    folder = tmp_path_factory.mktemp("bench") / "model"
    testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=48).save_pretrained(folder)
    testbed.load_tokenizer().save_pretrained(folder)
    return folder


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", f"benchmarks.{module}", *args]
    return subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)


def test_masked_dpo_benchmark_reports_medians_targets_and_load(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks.masked_dpo", "--quick", "--repeats", "2", "--steps", "1"]
    command += ["--reference", "live", "masked_row0.1", "trl_lora_r8", "--output", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    rows = {(r["config"], r["allocator"]): r for r in record["results"]}
    configs = {"masked_row0.1", "trl_lora_r8"}
    assert set(rows) == {(c, a) for c in configs for a in ("glibc", "retain")}
    assert not any("error" in r for r in rows.values())
    for allocator in ("glibc", "retain"):  # ratios never mix allocators
        row, lora = rows["masked_row0.1", allocator], rows["trl_lora_r8", allocator]
        assert len(row["step_time_s_repeats"]) == 2 and min(row["step_time_s_repeats"]) <= row["step_time_s"]
        assert row["step_time_vs_trl_lora_r8"] == row["step_time_s"] / lora["step_time_s"]
        assert row["trainable_bytes"] < 0.2 * 4 * row["num_params"]
        assert row["page_faults_per_step"] >= 0 and len(row["page_faults_per_step_repeats"]) == 2
    assert {"before", "after"} <= set(record["load_average"])
    assert record["retain_env"]["MALLOC_TRIM_THRESHOLD_"]
    targets = {(t["target"], t["allocator"]) for t in record["targets"]}
    for allocator in ("glibc", "retain"):
        assert any(
            t.startswith("masked_row0.1 (live ref) step <= 1.08x trl_lora_r8") and a == allocator for t, a in targets
        )


@pytest.mark.slow  # ~45 s: four subprocesses
def test_masked_dpo_benchmark_takes_a_model_folder_and_compares_within_each_dtype(tmp_path):
    """``--model PATH``: a transformers folder (here a tiny Llama saved from a config, with its own tokenizer) in bf16
    and fp32; ratios never mix dtypes; the sampled-gradient configuration runs."""
    from hf_align import testbed

    folder = tmp_path / "model"
    testbed.load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=48).save_pretrained(folder)
    testbed.load_tokenizer().save_pretrained(folder)
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "benchmarks.masked_dpo", "--model", str(folder), "--repeats", "1", "--steps", "1"]
    command += ["--digits", "8", "--mask_source", "random", "trl_full", "masked_element0.1_sampled"]
    command += ["--output", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    rows = {(r["config"], r["dtype"]): r for r in record["results"]}
    assert set(rows) == {(c, d) for c in ("trl_full", "masked_element0.1_sampled") for d in ("bfloat16", "float32")}
    assert not any("error" in r for r in rows.values())
    for dtype in ("bfloat16", "float32"):
        row, full = rows["masked_element0.1_sampled", dtype], rows["trl_full", dtype]
        assert row["allocator"] == "glibc" and row["reference"] == "live"
        assert row["step_time_vs_trl_full"] == row["step_time_s"] / full["step_time_s"]
    assert rows["trl_full", "float32"]["trainable_bytes"] == 2 * rows["trl_full", "bfloat16"]["trainable_bytes"]
    assert record["model"]["num_hidden_layers"] == 2 and record["batch"] == 2
    assert {"before", "after"} <= set(record["load_average"]) and record["machine"]["torch"]


def test_sampled_gradient_benchmark_smoke(tmp_path):
    out = tmp_path / "sampled.json"
    command = [sys.executable, "-m", "benchmarks.sampled_gradient", "--quick", "--repeats", "1", "--output", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=120)
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert row["dense_ms"] > 0 and row["sddmm_ms"] > 0 and row["sddmm_max_rel_err"] < 1e-5
    assert {"before", "after"} <= set(record["load_average"]) and record["torch"]


def test_mask_statistics_counts_density_and_the_rows_and_columns_a_mask_touches():
    import torch

    from benchmarks.masked_dpo import mask_statistics
    from hf_align.masks import NeuronMask

    entries = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    mask = NeuronMask({"layers.0.q_proj.weight": entries, "layers.1.q_proj.weight": torch.ones(2, 3).bool()})
    stats = mask_statistics(mask)
    assert stats["per_parameter"]["layers.0.q_proj.weight"] == {
        "shape": [2, 3], "density": 1 / 6, "rows_touched": 1 / 2, "columns_touched": 1 / 3,
    }  # fmt: skip
    assert stats["per_kind"]["q_proj"] == {"density": 7 / 12, "rows_touched": 3 / 4, "columns_touched": 4 / 6}
    # a Conv1D weight (GPT-2) keeps its output features on axis 1: its "rows" are the tensor's columns
    conv = mask_statistics(NeuronMask({"h.0.c_attn.weight": entries}), {"h.0.c_attn.weight": 1})
    assert conv["per_kind"]["c_attn"] == {"density": 1 / 6, "rows_touched": 1 / 3, "columns_touched": 1 / 2}
    rows = mask_statistics(NeuronMask({"layers.0.o_proj.weight": torch.tensor([True, False, False, False])}))
    assert rows["per_kind"]["o_proj"] == {"density": 0.25, "rows_touched": 0.25, "columns_touched": 1.0}
    assert stats["density"] == mask.ratio and len(stats["digest"]) == 16


@pytest.mark.slow  # 21-40 s (idle-busy 2 cores): the warm-up and one configuration, each in a subprocess
def test_masked_dpo_on_a_model_folder_trains_with_masks_from_accumulated_gradients(model_folder, tmp_path):
    """The default on a model folder: a warm-up DPO's accumulated |gradient| ranks the entries (ALLO); each
    configuration's process trains with that very mask (its digest), and the JSON says what the mask touches."""
    from transformers import AutoModelForCausalLM

    from benchmarks.masked_dpo import mask_digest
    from hf_align.masks import NeuronMask

    out = tmp_path / "bench.json"
    _run("masked_dpo", "--model", str(model_folder), "--dtype", "float32", "--repeats", "1", "--steps", "1",
         "--warmup_steps", "1", "--digits", "8", "masked_element0.1", "--output", str(out))  # fmt: skip
    record = json.loads(out.read_text())
    masks = record["masks"]
    assert masks["source"] == "accumulated" and masks["warmup_steps"] == 1 and masks["ratio"] == 0.1
    (row,) = record["results"]
    assert "error" not in row and row["dtype"] == "float32" and row["torch_threads"] >= 1
    assert row["mask"]["digest"] == masks["element"]["digest"]
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    assert masks["element"]["digest"] != mask_digest(NeuronMask.random(model, 0.1, "element", seed=0))
    element, rows = masks["element"], masks["row"]
    total = sum(p.numel() for p in model.parameters())
    assert element["density"] == round(0.1 * total) / total
    assert set(element["per_parameter"]) == {name for name, _ in model.named_parameters()}
    assert {"q_proj", "v_proj", "down_proj", "embed_tokens"} <= set(element["per_kind"])
    for stats in [*element["per_kind"].values(), *element["per_parameter"].values()]:
        assert 0 <= stats["density"] <= min(stats["rows_touched"], stats["columns_touched"]) <= 1
    # only the tokens of the data get an embedding gradient: a gradient-ranked mask leaves the other rows alone
    # (a random 10 % mask touches ~96 % of a 32-wide embedding's rows)
    assert element["per_kind"]["embed_tokens"]["rows_touched"] < 0.5
    assert set(rows["per_kind"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(stats["columns_touched"] in (0.0, 1.0) for stats in rows["per_parameter"].values())
    assert record["machine"]["torch_threads"] >= 1 and {"before", "after"} <= set(record["load_average"])


@pytest.mark.slow  # 23-42 s: the warm-up, one configuration, the plot
def test_scaling_adds_a_model_folder_with_its_accumulated_masks(model_folder, tmp_path):
    out = tmp_path / "scaling.json"
    _run("scaling", "--model", str(model_folder), "--dtype", "float32", "--sizes", "--repeats", "1", "--steps", "1",
         "--allocator", "glibc", "--warmup_steps", "1", "masked_row0.1", "--output", str(out))  # fmt: skip
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert "error" not in row and (row["size"], row["dtype"], row["config"]) == ("model", "float32", "masked_row0.1")
    assert record["masks"]["model"]["source"] == "accumulated" and record["batch"] == 4
    assert row["mask"]["digest"] == record["masks"]["model"]["row"]["digest"]
    assert record["model"]["num_hidden_layers"] == 2 and record["machine"]["torch_threads"] >= 1
    assert {"before", "after"} <= set(record["load_average"]) and out.with_suffix(".png").is_file()


@pytest.mark.slow  # ~25 s (2 busy cores): one profiled configuration in a subprocess
def test_profile_takes_a_model_folder_and_dtype(model_folder, tmp_path):
    out = tmp_path / "profile.json"
    _run("profile_masked_dpo", "--model", str(model_folder), "--dtype", "float32", "--mask_source", "random",
         "masked_row0.1", "--output", str(out))  # fmt: skip
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert (row["config"], row["dtype"]) == ("masked_row0.1", "float32") and row["top_ops"]
    assert record["masks"]["source"] == "random" and record["model"]["num_hidden_layers"] == 2
    assert record["machine"]["torch_threads"] >= 1 and {"before", "after"} <= set(record["load_average"])


@pytest.mark.parametrize("module", ["masked_dpo", "scaling", "profile_masked_dpo"])
def test_bad_model_options_are_one_line_before_any_work(module, tmp_path):
    for args, expected in (
        (["--model", str(tmp_path)], f"--model {tmp_path}: expected a transformers model folder"),
        (["--warmup_steps", "0"], "--warmup_steps: expected a positive number of steps, got 0"),
    ):
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 2 and expected in proc.stderr.strip().splitlines()[-1]
