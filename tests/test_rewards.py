"""hf_align.rewards: one spec resolution, one reward-model scorer (as TRL's GRPO), the same text in eval and training."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from hf_align import testbed
from hf_align.evaluation import evaluate_model
from hf_align.rewards import RewardModelScorer, check_scores, resolve_reward, resolve_reward_funcs, score_completions
from hf_align.testbed import load_random_tiny, load_tokenizer, quiet_training_args
from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer


CHAT = [[{"role": "user", "content": "12+30="}], [{"role": "user", "content": "rev 4821="}]]


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    """A tiny one-logit Llama reward model with the testbed tokenizer (which has a chat template)."""
    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("reward_model")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _rows_seen(model_class, monkeypatch) -> list[list[int]]:
    """Every unpadded token row the reward model's forward receives, in call order."""
    seen: list[list[int]] = []
    forward = model_class.forward

    def spy(self, input_ids=None, attention_mask=None, **kwargs):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            seen.append([i for i, m in zip(ids, mask, strict=True) if m])
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model_class, "forward", spy)
    return seen


def test_reward_model_sees_the_same_text_in_eval_and_in_training(reward_folder, monkeypatch):
    """Conversational prompts: ``hf-align eval`` and the feedback trainer feed the reward model the same tokens,
    the chat template over prompt + completion (as TRL's GRPO), for the same completions."""
    tokenizer = load_tokenizer()
    seen = _rows_seen(LlamaForSequenceClassification, monkeypatch)
    tb = testbed.load()
    funcs, names = resolve_reward_funcs([reward_folder])
    result = evaluate_model(tb.model, tb.tokenizer, CHAT, funcs, names, seed=3, max_new_tokens=6)
    completions = [s["completion"] for s in result["samples"]]
    from_eval = list(seen)
    seen.clear()

    config = FeedbackConditionedConfig(**quiet_training_args(
        output_dir="unused", num_rounds=1, steps_per_round=1,
        prompts_per_round=2, num_generations=1, reward_funcs=[reward_folder],
    ))  # fmt: skip
    trainer = FeedbackConditionedTrainer(
        load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=64), config,
        Dataset.from_dict({"prompt": CHAT}), processing_class=load_tokenizer(),
    )  # fmt: skip
    _, scores = trainer.score(CHAT, completions)
    from_training = list(seen)

    expected = [
        tokenizer(
            tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for p, c in zip(CHAT, completions, strict=True)
    ]
    assert from_eval == expected
    assert from_training == expected
    (name,) = names
    assert result["rewards"][name]["mean"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)


def test_reward_model_scores_each_row_as_if_alone(reward_folder):
    """Right padding with the tokenizer's pad id on the model config: a batch scores like single rows."""
    scorer = resolve_reward(reward_folder)
    assert isinstance(scorer, RewardModelScorer)
    prompts, completions = ["1+2=", "rev 4821="], ["3", "12840000"]
    batch = scorer(prompts, completions)
    alone = [scorer([p], [c])[0] for p, c in zip(prompts, completions, strict=True)]
    assert batch == pytest.approx(alone, abs=1e-5)
    assert scorer.texts(prompts, completions) == ["1+2=3", "rev 4821=12840000"]
    message = [{"role": "assistant", "content": "42"}]  # a completion as messages or as its text: one input
    assert scorer.texts(CHAT[:1], [message]) == scorer.texts(CHAT[:1], ["42"])


def test_resolution_forms(reward_folder):
    funcs, names = resolve_reward_funcs(["testbed", "hf_align.testbed:reward", "hf_align.testbed.reward"])
    assert names == ["reward", "reward_2", "reward_3"]  # GRPO's names (the function's), made unique
    assert all(f is testbed.reward for f in funcs)

    def mine(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    assert resolve_reward(mine) is mine
    assert resolve_reward_funcs(mine) == ([mine], ["mine"])
    model = AutoModelForSequenceClassification.from_pretrained(reward_folder, num_labels=1)
    from_object = resolve_reward(model)
    assert isinstance(from_object, RewardModelScorer) and from_object.model is model
    assert isinstance(resolve_reward(reward_folder), RewardModelScorer)
    assert resolve_reward_funcs([reward_folder])[1] == [reward_folder.rstrip("/").split("/")[-1]]  # as GRPO's
    assert resolve_reward_funcs(None) == ([], [])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown reward 'nosuch': expected 'testbed', 'package.module:function'"),
        ("no_such_module:f", "reward 'no_such_module:f' cannot be imported"),
        ("no_such_module.f", "reward 'no_such_module.f' cannot be imported"),
        ("hf_align.testbed:nosuch", "reward 'hf_align.testbed:nosuch' cannot be imported"),
        ("hf_align.testbed.MODEL_DIR", "reward 'hf_align.testbed.MODEL_DIR' is not callable"),
        ("nobody/no-such-reward-model", "reward 'nobody/no-such-reward-model' is not a loadable reward model"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_spec(spec, message):
    with pytest.raises(ValueError) as caught:
        resolve_reward(spec)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_score_validation_names_the_function_and_the_row():
    def half(prompts, completions, **kwargs):
        return [0.5, "bad"]

    with pytest.raises(
        ValueError, match=r"reward function '\S+:\S*half' returned 'bad' for completion 1; expected a number"
    ):
        score_completions([half], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        check_scores([1.0], 2, "Reward function 'f'")
    totals, per_func = score_completions([testbed.reward, testbed.reward], ["2+3="], ["5"], weights=[1.0, 0.5])
    assert totals == [1.5] and per_func == [[1.0], [1.0]]
