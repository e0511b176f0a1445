import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    from hf_align.testbed import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def tiny_model():
    """A fresh random 4-layer Llama (hidden 64, GQA) with the testbed vocabulary."""
    from hf_align.testbed import load_random_tiny

    return load_random_tiny("llama")


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded on the shared CI cores; the thread count is restored afterwards.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bf16_tied_base(tmp_path_factory):
    """A bf16 Llama checkpoint with tied embeddings (as SmolLM2), its tokenizer beside it: what a saved model must
    come back as (dtype, config, size)."""
    import torch

    from hf_align import testbed

    folder = tmp_path_factory.mktemp("bf16_base")
    model = testbed.load_random_tiny(
        "llama", hidden_size=32, num_layers=3, intermediate_size=64, tie_word_embeddings=True
    )
    model.to(torch.bfloat16).save_pretrained(folder)
    testbed.load_tokenizer().save_pretrained(folder)
    return folder
