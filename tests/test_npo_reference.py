"""NPO's precomputed reference log-probs under 2 CPU processes (gloo): sharded like DPO's, gathered, same column.

One worker script (written to ``tmp_path``) builds an ``NPOTrainer`` with ``precompute_ref_log_probs=True`` on 11
forget rows (odd, so the last shard is padded with a repeated row that ``gather_for_metrics`` must drop; prompts of
different lengths, so the ranks' batches differ in width and must be padded before the gather) and saves the
``ref_token_logps`` column plus the number of rows this rank ran through the reference. It runs once as a plain
process and once under ``torch.distributed.run --nproc_per_node 2`` (see ``tests/test_distributed.py`` for why not
``accelerate launch``).
"""

import json
import sys
import textwrap

import pytest
from launch_helpers import run_launch


ROWS = 11

WORKER = textwrap.dedent(
    """
    import json, os, sys

    import torch

    out_dir = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)

    from hf_align import testbed
    from hf_align.trainers import NPOConfig, NPOTrainer

    seen = []
    forward = NPOTrainer._reference_log_probs

    def counting(self, inputs, *rest):
        seen.append(int(inputs["input_ids"].size(0)))
        return forward(self, inputs, *rest)

    NPOTrainer._reference_log_probs = counting
    args = NPOConfig(
        output_dir=f"{out_dir}/npo", per_device_train_batch_size=2, report_to="none", use_cpu=True, bf16=False,
        dataloader_num_workers=0, disable_tqdm=True, precompute_ref_log_probs=True, seed=0,
    )
    torch.manual_seed(0)
    trainer = NPOTrainer(
        testbed.load_random_tiny("llama", hidden_size=32, num_layers=2), args=args,
        train_dataset=testbed.forget_dataset(ROWS, seed=5), processing_class=testbed.load_tokenizer(),
    )
    info = {
        "column": trainer.train_dataset["ref_token_logps"][:],
        "input_ids": trainer.train_dataset["input_ids"][:],
        "rows_run": sum(seen),
        "world_size": trainer.accelerator.num_processes,
    }
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(info, f)
    """
).replace("ROWS", str(ROWS))


def _run(cmd, out):
    run_launch(cmd, out, timeout=240)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("npo_reference")
    script = root / "worker.py"
    script.write_text(WORKER)
    single = _run([sys.executable, str(script), str(root / "single")], root / "single")
    ddp = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        + [str(root / "ddp")],
        root / "ddp",
    )
    return single, ddp


def test_two_processes_precompute_the_one_process_column(runs):
    single, ddp = runs
    assert [r["world_size"] for r in single] == [1] and [r["world_size"] for r in ddp] == [2, 2]
    (one,) = single
    assert len(one["column"]) == ROWS and len({len(ids) for ids in one["input_ids"]}) > 1  # widths differ
    for rank in ddp:
        assert rank["input_ids"] == one["input_ids"]
        assert [len(row) for row in rank["column"]] == [len(ids) for ids in one["input_ids"]]
        assert rank["column"] == one["column"]  # same batches (batch k = rows 2k, 2k+1) on whichever rank: bitwise
    assert ddp[0]["column"] == ddp[1]["column"]  # every rank holds the same, whole column


def test_each_process_runs_only_its_shard(runs):
    single, ddp = runs
    assert single[0]["rows_run"] == ROWS
    # 11 rows in batches of 2 over 2 ranks: 6 batches, 3 per rank, the last one padded with a repeated row.
    assert [rank["rows_run"] for rank in ddp] == [6, 6]
