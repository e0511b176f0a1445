"""FeedbackConditionedTrainer speaks GRPO (issue #30, part 3): GRPO's config names, reward-function signature and
logged names, checked against ``trl.GRPOConfig`` / the reward functions of TRL's own docs (docs/grpo_trainer.md at
huggingface/trl f2cd57710, the quick start's ``reward_len`` and Examples 1-4)."""

import dataclasses
import re
import warnings

import numpy as np
import pytest
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig

from hf_align.testbed import load_random_tiny, load_tokenizer
from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer


# ---- reward functions exactly as TRL's docs write them ----------------------------------------------------------


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def reward_token_count(completion_ids, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of token count)."""
    return [float(len(ids)) for ids in completion_ids]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def ground_truth_reward(completions, ground_truth, **kwargs):
    return [1.0 if c.strip() == gt else 0.0 for c, gt in zip(completions, ground_truth)]


# ---- helpers ----------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, per_device_train_batch_size=4, num_rounds=1, steps_per_round=2,
        prompts_per_round=4, num_generations=2, max_completion_length=4, learning_rate=1e-3, logging_steps=1, seed=0,
    )  # fmt: skip
    base.update(overrides)
    return FeedbackConditionedConfig(**base)


def _tiny():
    return load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=64)


PROMPTS = Dataset.from_dict(
    {"prompt": ["1+2=", "3+4=", "rev 123=", "rev 4567="], "ground_truth": ["3", "7", "321", "7654"]}
)
CHAT = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in ["1+2=", "3+4=", "rev 12="]]})


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


# ---- config names ---------------------------------------------------------------------------------------------

# Fields FeedbackConditionedConfig shares with GRPOConfig by name, each meaning the same thing in both.
SAME_CONCEPT = {
    "beta", "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "generation_kwargs", "reward_weights", "generation_batch_size", "use_vllm", "vllm_mode",
    "vllm_gpu_memory_utilization", "entropy_coef", "remove_unused_columns",
}  # fmt: skip
RENAMED = {  # old: (new, a value, another value), neither the default
    "max_new_tokens": ("max_completion_length", 7, 9),
    "kl_coef": ("beta", 0.2, 0.3),
    "num_iterations": ("num_rounds", 3, 4),
    "steps_per_iteration": ("steps_per_round", 5, 6),
    "prompts_per_iteration": ("prompts_per_round", 6, 7),
    "unconditioned_first_iteration": ("unconditioned_first_round", False, True),
}


def test_grpo_names_exist_and_shared_names_are_the_same_concept():
    ours = {f.name for f in dataclasses.fields(FeedbackConditionedConfig)} - set(RENAMED)
    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert SAME_CONCEPT <= ours
    shared = (ours & grpo) - {f.name for f in dataclasses.fields(GRPOConfig.__mro__[1])}  # past TrainingArguments
    assert shared <= SAME_CONCEPT, f"same name as GRPO, different meaning: {sorted(shared - SAME_CONCEPT)}"
    # GRPO's num_iterations is μ (passes per generation batch): ours was the number of sample→train rounds
    assert "num_iterations" in grpo and "num_iterations" in RENAMED


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_names_still_work_for_one_release_with_a_one_line_future_warning(tmp_path, old):
    new, value, other = RENAMED[old]
    with pytest.warns(FutureWarning) as caught:
        config = FeedbackConditionedConfig(output_dir=str(tmp_path), **{old: value})
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any(f"{old} → {new}" in m and "\n" not in m for m in messages), messages
    assert getattr(config, new) == value
    with pytest.raises(ValueError, match=f"{old}.*{new}"):
        FeedbackConditionedConfig(output_dir=str(tmp_path), **{old: other, new: value})


def test_new_names_do_not_warn(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = FeedbackConditionedConfig(output_dir=str(tmp_path), beta=0.0, max_completion_length=3, num_rounds=2)
    assert not [w for w in caught if "FeedbackConditionedConfig" in str(w.message)]
    assert config.beta == 0.0 and config.max_completion_length == 3 and config.num_rounds == 2


def test_sampling_settings_reach_generate(tmp_path):
    config = _config(
        tmp_path, min_p=0.1, repetition_penalty=1.3, top_k=5, generation_kwargs={"no_repeat_ngram_size": 2}
    )
    trainer = FeedbackConditionedTrainer(
        _tiny(), config, PROMPTS, processing_class=load_tokenizer(), reward_funcs=reward_len
    )
    seen = {}
    model = trainer.model
    original = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    model.generate = spy
    trainer.collect(0)
    assert seen["min_p"] == 0.1 and seen["repetition_penalty"] == 1.3 and seen["top_k"] == 5
    assert seen["no_repeat_ngram_size"] == 2 and seen["max_new_tokens"] == 4


# ---- reward functions -----------------------------------------------------------------------------------------


def test_reward_functions_get_grpos_keyword_arguments(tmp_path):
    seen = []

    def spy(prompts, completions, completion_ids, trainer_state, ground_truth, **kwargs):
        seen.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                         trainer_state=trainer_state, ground_truth=ground_truth, **kwargs))  # fmt: skip
        return [0.0] * len(completions)

    tokenizer = load_tokenizer()
    trainer = FeedbackConditionedTrainer(
        _tiny(), _config(tmp_path), PROMPTS, processing_class=tokenizer, reward_funcs=spy
    )
    trainer.collect(0)
    (call,) = seen
    assert call["trainer_state"] is trainer.state
    assert callable(call["log_metric"]) and callable(call["log_extra"])
    truth = dict(zip(PROMPTS["prompt"], PROMPTS["ground_truth"]))
    assert call["ground_truth"] == [truth[p] for p in call["prompts"]]
    # completion_ids: the sampled ids up to and including EOS (as GRPO's), decoding to the completion text
    for ids, text in zip(call["completion_ids"], call["completions"], strict=True):
        assert isinstance(ids, list) and len(ids) <= 4
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert list(trainer.pool.length) == [len(ids) for ids in call["completion_ids"]]


def test_trl_doc_reward_functions_run_unchanged_standard(tmp_path):
    trainer = FeedbackConditionedTrainer(
        _tiny(),
        _config(tmp_path, reward_weights=[1.0, 0.5, 2.0]),
        PROMPTS,
        processing_class=load_tokenizer(),
        reward_funcs=[reward_len, reward_token_count, ground_truth_reward],
    )
    trainer.collect(0)
    rows = trainer.pool.rows()
    truth = dict(zip(PROMPTS["prompt"], PROMPTS["ground_truth"]))
    for row, length in zip(rows, trainer.pool.length, strict=True):
        expected = (
            -abs(20 - len(row["completion"]))
            + 0.5 * length
            + 2.0 * (row["completion"].strip() == truth[row["prompt"]])
        )
        assert row["score"] == pytest.approx(expected)


def test_conversational_completions_are_messages(tmp_path):
    seen = []

    def spy(prompts, completions, **kwargs):
        seen.append(completions)
        return format_reward_func(completions, **kwargs)

    trainer = FeedbackConditionedTrainer(
        _tiny(), _config(tmp_path), CHAT, processing_class=load_tokenizer(), reward_funcs=spy
    )
    trainer.collect(0)
    (completions,) = seen
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)
    assert [c[0]["content"] for c in completions] == list(trainer.pool.completion)
    assert trainer.pool.score.tolist() == [0.0] * len(completions)


def test_none_rewards_follow_grpo(tmp_path):
    """None = not applicable: the weighted sum is over the functions that scored (GRPO's nansum); a row no function
    scored cannot be binned, so it stays out of the pool (with a warning)."""

    def half(prompts, completions, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    def third(prompts, completions, **kwargs):
        return [None if i % 4 == 1 else 10.0 for i in range(len(completions))]

    trainer = FeedbackConditionedTrainer(
        _tiny(),
        _config(tmp_path, reward_weights=[1.0, 0.5]),
        PROMPTS,
        processing_class=load_tokenizer(),
        reward_funcs=[half, third],
    )
    with pytest.warns(UserWarning, match="no reward function scored"):
        trainer.collect(0)
    n = 4 * 2
    expected = [(1.0 if i % 2 == 0 else 0.0) + (0.0 if i % 4 == 1 else 5.0) for i in range(n) if i % 4 != 1]
    assert trainer.pool.score.tolist() == expected


def test_reward_function_import_path_from_the_working_directory_only_when_asked(tmp_path, monkeypatch):
    """Unlike trl's grpo.py script, the current folder is never searched (SECURITY.md): a stray module there is not
    imported, and the error says how to ask for it; on PYTHONPATH (``PYTHONPATH=.``) the same spec works."""
    (tmp_path / "my_rewards_for_hf_align.py").write_text(
        "def reward_len(completions, **kwargs):\n    return [-abs(20 - len(completion)) for completion in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    with pytest.raises(ValueError, match="never on the import path: PYTHONPATH=."):
        FeedbackConditionedTrainer(
            _tiny(), _config(tmp_path, reward_funcs=["my_rewards_for_hf_align:reward_len"]), PROMPTS,
            processing_class=load_tokenizer(),
        )  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config(tmp_path, reward_funcs=["my_rewards_for_hf_align:reward_len"])
    trainer = FeedbackConditionedTrainer(_tiny(), config, PROMPTS, processing_class=load_tokenizer())
    assert trainer.reward_func_names == ["reward_len"]
    trainer.collect(0)
    assert trainer.pool.score.tolist() == [-abs(20 - len(c)) for c in trainer.pool.completion]


# ---- logged names ---------------------------------------------------------------------------------------------


def test_logs_grpos_names_beside_the_pool_counts(tmp_path):
    logs = _Logs()
    config = _config(tmp_path, num_quantiles=3, beta=0.05, max_completion_length=3)
    trainer = FeedbackConditionedTrainer(
        _tiny(),
        config,
        PROMPTS,
        processing_class=load_tokenizer(),
        reward_funcs=[reward_len, reward_token_count],
        callbacks=[logs],
    )
    trainer.train()
    first = logs.logs[0]
    scores_len = [-abs(20 - len(c)) for c in trainer.pool.completion]
    counts = trainer.pool.length.astype(float)
    totals = np.array(scores_len) + counts
    assert first["reward"] == pytest.approx(totals.mean())
    assert first["reward_std"] == pytest.approx(totals.std(ddof=1))  # GRPO's nanstd: unbiased
    assert first["rewards/reward_len/mean"] == pytest.approx(np.mean(scores_len))
    assert first["rewards/reward_len/std"] == pytest.approx(np.std(scores_len, ddof=1))
    assert first["rewards/reward_token_count/mean"] == pytest.approx(counts.mean())
    assert first["completions/mean_length"] == pytest.approx(counts.mean())
    assert first["completions/min_length"] == counts.min() and first["completions/max_length"] == counts.max()
    assert 0.0 <= first["completions/clipped_ratio"] <= 1.0  # exact value: test_clipped_ratio_...
    assert "kl" in first and "nll" in first
    assert first["pool/size"] == len(trainer.pool)
    assert [first[f"pool/quantile_{i}"] for i in range(3)] == trainer.pool.bin_counts().tolist()
    assert "iteration/mean_score" not in first


def test_clipped_ratio_counts_completions_without_eos(tmp_path):
    trainer = FeedbackConditionedTrainer(
        _tiny(),
        _config(tmp_path, max_completion_length=2),
        PROMPTS,
        processing_class=load_tokenizer(),
        reward_funcs=reward_len,
    )
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen["ids"] = completion_ids
        return [0.0] * len(completions)

    trainer.reward_funcs = [spy]
    trainer.collect(0)
    eos = trainer.processing_class.eos_token_id
    expected = np.mean([ids[-1] != eos for ids in seen["ids"]])
    assert trainer._metrics["train/completions/clipped_ratio"][-1] == pytest.approx(expected)


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli_runs_a_grpo_doc_reward_function_unchanged_and_takes_the_old_flags(tmp_path, monkeypatch):
    from hf_align.cli import main
    from hf_align.data_pool import DataPool

    (tmp_path / "my_grpo_rewards.py").write_text(
        "def reward_len(completions, **kwargs):\n    return [-abs(20 - len(completion)) for completion in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # PYTHONPATH=. : the current folder is never searched otherwise
    out = tmp_path / "out"
    argv = [
        "feedback", "--no_launch", "--model_name_or_path", "testbed", "--dataset_name", "testbed:prompts",
        "--reward_funcs", "my_grpo_rewards:reward_len", "--per_device_train_batch_size", "2", "--use_cpu", "true",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--num_rounds", "1", "--steps_per_round", "2", "--prompts_per_round", "4", "--num_generations", "2",
        "--max_new_tokens", "3", "--beta", "0", "--output_dir", str(out),
    ]  # fmt: skip
    with pytest.warns(FutureWarning, match="max_new_tokens → max_completion_length"):
        assert main(argv) == 0
    pool = DataPool.load(out / "data_pool")
    assert len(pool) == 8 and pool.score.tolist() == [-abs(20 - len(c)) for c in pool.completion]
    assert pool.length.max() <= 3
