"""How the multi-process tests launch their workers: one environment (offline, one thread, this checkout on the
import path, no inherited rank variables) and one runner that shows the worker's stderr when it fails."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


def launch_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", WANDB_DISABLED="true",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
        **extra,
    )  # fmt: skip
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return env


def run_launch(cmd: list, out: Path, timeout: int = 240, **extra_env: str) -> Path:
    """Run ``cmd`` (a launcher line) with ``out`` created for its results; raise with its stderr on failure."""
    out.mkdir()
    proc = subprocess.run(cmd, env=launch_env(**extra_env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
    return out


# The sharded engines as users configure them for `accelerate launch --config_file` (2 processes on this machine).
ACCELERATE_CONFIGS = {
    "zero2": """
        compute_environment: LOCAL_MACHINE
        distributed_type: DEEPSPEED
        deepspeed_config:
          zero_stage: 2
          offload_optimizer_device: none
          offload_param_device: none
        mixed_precision: 'no'
        num_machines: 1
        num_processes: 2
        machine_rank: 0
        use_cpu: false
    """,
    "zero3": """
        compute_environment: LOCAL_MACHINE
        distributed_type: DEEPSPEED
        deepspeed_config:
          zero_stage: 3
          zero3_init_flag: true
          zero3_save_16bit_model: true
          offload_optimizer_device: none
          offload_param_device: none
        mixed_precision: 'no'
        num_machines: 1
        num_processes: 2
        machine_rank: 0
        use_cpu: false
    """,
    "fsdp2": """
        compute_environment: LOCAL_MACHINE
        distributed_type: FSDP
        fsdp_config:
          fsdp_version: 2
          fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
          fsdp_reshard_after_forward: true
          fsdp_state_dict_type: FULL_STATE_DICT
          fsdp_cpu_ram_efficient_loading: false
          fsdp_offload_params: false
        mixed_precision: 'no'
        num_machines: 1
        num_processes: 2
        machine_rank: 0
        use_cpu: false
    """,
}

# The start of every engine worker: its arguments, one thread, no DeepSpeed shm-op build (a 4-minute JIT build, not
# needed), the config built on the engine's state, and a parameter's elements on this rank.
WORKER_PRELUDE = textwrap.dedent(
    """
    import importlib, json, math, os, sys

    import torch

    out, engine, per_device, data = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    if engine.startswith("zero"):
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    import accelerate


    def on_engine(args):
        _ = args.device  # builds the CPU/gloo state
        if engine == "fsdp2":  # test-only: accelerate enables FSDP only for GPU-like distributed types
            from hf_align._compat import pretend_distributed_type

            pretend_distributed_type(accelerate.utils.DistributedType.MULTI_GPU)
        return args


    def local_numel(param):
        if hasattr(param, "ds_tensor"):
            return param.ds_tensor.numel()
        return param.to_local().numel() if hasattr(param, "to_local") else param.numel()
    """
)

# The end of every engine worker: a clean gloo teardown. Without it a rank's gloo threads can abort the process at
# exit under load ("terminate called without an active exception", exit -6) after all its work is written.
WORKER_EPILOGUE = textwrap.dedent(
    """

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """
)


class EngineLaunches:
    """One worker script run once as a plain process and once per engine (a launch costs 30-50 s of start-up, so
    each is launched once per module and shared by its tests). The worker gets ``out engine per_device data``."""

    def __init__(self, data: Path, ports: dict[str, int], timeout: int):
        self.data, self.ports, self.timeout = data, ports, timeout
        self.launched: dict[str, Path] = {}
        self.failed: dict[str, AssertionError] = {}

    def single(self) -> Path:
        cmd = [sys.executable, str(self.data / "worker.py"), str(self.data / "single"), "single", "4", str(self.data)]
        return run_launch(cmd, self.data / "single", timeout=self.timeout, DS_ACCELERATOR="cpu")

    def engine(self, engine: str) -> Path:
        if engine in self.failed:  # the same failure for every test of that engine, not a FileExistsError
            raise self.failed[engine]
        if engine not in self.launched:
            if engine.startswith("zero"):
                import deepspeed  # noqa: F401  -- a dev dependency: a missing DeepSpeed fails these tests

            config = self.data / f"{engine}.yaml"
            config.write_text(textwrap.dedent(ACCELERATE_CONFIGS[engine]))
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
            cmd += ["--main_process_port", str(self.ports[engine]), str(self.data / "worker.py")]
            cmd += [str(self.data / engine), engine, "2", str(self.data)]
            try:
                self.launched[engine] = run_launch(cmd, self.data / engine, timeout=self.timeout, DS_ACCELERATOR="cpu")
            except AssertionError as error:
                self.failed[engine] = error
                raise
        return self.launched[engine]


def read_info(folder: Path, name: str, rank: int = 0) -> dict:
    """The JSON record a worker wrote for configuration ``name`` on ``rank``."""
    return json.loads((folder / f"{name}.rank{rank}.json").read_text())


def run_two_cpu_processes(tmp_path: Path, *launch: str) -> dict:
    """``hf-align aligner-sft`` on 8 rows, batch 2, 2 steps, with the ``launch`` arguments; its stdout and the
    ``trainer_state.json`` of ``checkpoint-2`` (two processes make it one epoch, one process half of one)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "hf_align.cli", "aligner-sft", *launch,
        "--model_name_or_path", "testbed", "--dataset_name", str(data),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--bf16", "false", "--report_to", "none",
        "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out), "--dataloader_num_workers", "0",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"stdout": result.stdout, "state": json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())}
