"""Rebuild the shipped testbed model and tokenizer (deterministic, offline, CPU, a few minutes).

python scripts/build_testbed.py [--output hf_align/testbed/assets/model] [--seed 0] [--steps 3000]
"""

import argparse
from pathlib import Path

import torch

from hf_align.testbed.build import build_testbed


DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "hf_align" / "testbed" / "assets" / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    info = build_testbed(args.output, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    print(info)


if __name__ == "__main__":
    main()
