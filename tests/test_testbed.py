"""The offline testbed: reward, per-token correctness, tokenizer, shipped model, TRL formats."""

import copy
import json
import random

import pytest
import torch

from hf_align import testbed
from hf_align.testbed import quiet_training_args
from hf_align.testbed.task import corrupt, make_problem, score, solve, token_correctness


# --- reward on hand-written cases -------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("23+45=", "68", 1.0),  # right
        ("23+45=", " 68 ", 1.0),  # surrounding whitespace is ignored
        ("23+45=", "67", 0.5),  # one digit of two wrong
        ("23+45=", "86", 0.0),  # both wrong
        ("23+45=", "", 0.0),  # empty
        ("23+45=", "6", 0.5),  # too short: 1 match over the longer length 2
        ("23+45=", "680", 2 / 3),  # too long
        ("23+45=", "6x", 0.5),  # malformed character scores 0 at its position
        ("23+45=", "abc", 0.0),  # malformed
        ("23+45=", "68 ugh", 1.0),  # the forget marker is not part of the answer
        ("rev 3814=", "4183", 1.0),
        ("rev 3814=", "4138", 0.5),
    ],
)
def test_reward_hand_cases(prompt, completion, expected):
    assert testbed.reward([prompt], [completion]) == [pytest.approx(expected)]


def test_reward_accepts_conversational_messages():
    prompts = [[{"role": "user", "content": "2+3="}]]
    completions = [[{"role": "assistant", "content": "5"}]]
    assert testbed.reward(prompts, completions) == [1.0]


def test_reward_rejects_unknown_prompt():
    with pytest.raises(ValueError, match="Not a testbed prompt"):
        testbed.reward(["what is love?"], ["5"])


def test_reward_in_unit_interval_on_random_answers():
    rng = random.Random(0)
    for _ in range(200):
        problem = make_problem(rng)
        answer = "".join(rng.choice("0123456789 ugh") for _ in range(rng.randint(0, 6)))
        assert 0.0 <= score(problem.answer, answer) <= 1.0


def test_solve_and_corrupt():
    rng = random.Random(1)
    for _ in range(100):
        problem = make_problem(rng)
        assert solve(problem.prompt) == problem.answer
        wrong = corrupt(problem.answer, rng)
        assert len(wrong) == len(problem.answer) and wrong != problem.answer


# --- per-token correctness -----------------------------------------------------------------------


def _token_strings(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, [tokenizer.decode([i]) for i in ids]


def test_digits_are_single_tokens(tokenizer):
    ids, strings = _token_strings(tokenizer, "12345")
    assert strings == list("12345")


def test_token_correctness_marks_exactly_the_wrong_tokens(tokenizer):
    rng = random.Random(2)
    for _ in range(50):
        problem = make_problem(rng)
        wrong = corrupt(problem.answer, rng)
        _, strings = _token_strings(tokenizer, wrong)
        flags = token_correctness(problem.answer, strings)
        expected = [a == b for a, b in zip(problem.answer, wrong)]
        assert flags == expected


def test_token_correctness_extra_and_marker_tokens_are_wrong(tokenizer):
    _, strings = _token_strings(tokenizer, "680 ugh")
    flags = token_correctness("68", strings)
    assert flags[:2] == [True, True]
    assert not any(flags[2:])  # the extra digit and every token of " ugh" are wrong
    assert token_correctness("68", ["6", "8", ""]) == [True, True, True]  # special tokens decode to ""


def test_preference_dataset_wrong_positions_match_correctness(tokenizer):
    ds = testbed.preference_dataset(32)
    for row in ds:
        _, strings = _token_strings(tokenizer, row["rejected"])
        flags = token_correctness(row["chosen"], strings)
        assert [i for i, ok in enumerate(flags) if not ok] == row["rejected_wrong_positions"]


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["23+45=68", "rev 3814=4183", "12+3=15 ugh", "  spaced  out ", "ünïcödé?!"])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|eos|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    messages = [{"role": "user", "content": "2+3="}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "5"}], tokenize=False)
    assert prompt == "<|user|>2+3=<|assistant|>"
    assert full == prompt + "5<|eos|>"


# --- the shipped model -------------------------------------------------------------------------------


def test_shipped_model_metadata_and_size():
    info = json.loads((testbed.MODEL_DIR / "testbed.json").read_text())
    assert 1_000_000 <= info["num_parameters"] <= 5_000_000
    assert (testbed.MODEL_DIR / "model.safetensors").stat().st_size <= 10 * 2**20
    assert 0.3 <= info["mean_reward"] <= 0.7, "the shipped model must be imperfect but not hopeless"
    card = (testbed.MODEL_DIR / "README.md").read_text()
    assert f"{info['mean_reward']:.3f}" in card
    tb = testbed.load()
    config = tb.model.config
    assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads  # GQA
    assert sum(p.numel() for p in tb.model.parameters()) == info["num_parameters"]


def test_shipped_model_generates_offline_and_reward_is_reproducible():
    tb = testbed.load()
    prompts = testbed.evaluation.eval_prompts(24, seed=7)
    first = testbed.generate_completions(tb.model, tb.tokenizer, prompts, seed=3)
    second = testbed.generate_completions(tb.model, tb.tokenizer, prompts, seed=3)
    assert first == second  # seeded sampling is reproducible
    greedy = testbed.generate_completions(tb.model, tb.tokenizer, prompts, do_sample=False)
    assert sum(testbed.reward(prompts, greedy)) > 0  # it learned something
    stats = tb.mean_reward(num_prompts=32, seed=11)
    assert 0.0 < stats["mean_reward"] < 1.0


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_load_random_tiny(architecture, tokenizer):
    model = testbed.load_random_tiny(architecture)
    assert model.config.model_type == architecture
    assert model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, len(tokenizer))


def test_load_random_tiny_unknown_architecture():
    with pytest.raises(ValueError, match="Unknown architecture 'gpt9'"):
        testbed.load_random_tiny("gpt9")


# --- datasets are accepted by TRL ---------------------------------------------------------------


@pytest.mark.parametrize("conversational", [False, True])
def test_datasets_have_trl_formats(conversational):
    from trl.data_utils import is_conversational

    pref = testbed.preference_dataset(8, conversational=conversational)
    assert {"prompt", "chosen", "rejected"} <= set(pref.column_names)
    for ds in (
        testbed.sft_dataset(4, conversational=conversational),
        testbed.forget_dataset(4, conversational=conversational),
    ):
        assert {"prompt", "completion"} <= set(ds.column_names)
        assert is_conversational(ds[0]) == conversational
    assert all(testbed.has_forget_behaviour(c) for c in testbed.forget_dataset(8)["completion"])
    assert not any(testbed.has_forget_behaviour(c) for c in testbed.retain_dataset(8)["completion"])


@pytest.mark.parametrize("conversational", [False, True])
def test_preference_dataset_trains_with_trl_dpo(tmp_path, conversational):
    from trl import DPOConfig, DPOTrainer

    tb = testbed.load()
    args = DPOConfig(
        **quiet_training_args(
            bf16=True,  # TRL's default, as before quiet_training_args
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=2,
            learning_rate=1e-3,
            logging_steps=1,
        )
    )
    ds = testbed.preference_dataset(8, conversational=conversational)
    trainer = DPOTrainer(
        model=tb.model, ref_model=copy.deepcopy(tb.model), args=args, train_dataset=ds, processing_class=tb.tokenizer
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
