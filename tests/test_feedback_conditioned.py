"""FeedbackConditionedTrainer (ALT / Quark): masking, loss vs hand computation, errors, resume, testbed learning."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_align import testbed
from hf_align.data_pool import DataPool
from hf_align.testbed import load_random_tiny, load_tokenizer, quiet_training_args
from hf_align.trainers import FeedbackConditionedConfig, FeedbackConditionedTrainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(tmp_path, **overrides):
    base = quiet_training_args(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_rounds=2,
        steps_per_round=2,
        prompts_per_round=4,
        num_generations=2,
        max_completion_length=4,
        learning_rate=1e-3,
        logging_steps=1,
        seed=0,
    )
    base.update(overrides)
    return FeedbackConditionedConfig(**base)


def _tiny():
    return load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=64)


def _offline_dataset():
    return Dataset.from_dict(
        {
            "prompt": ["1+2=", "rev 123=", "4+4=", "rev 98="],
            "completion": ["3", "321", "9", "89"],
            "feedback": [1.0, 0.9, 0.0, 0.5],
        }
    )


def _hand_logps(model, input_ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([input_ids])).logits[0].float(), dim=-1)


# ---- tokens, templates, masking ------------------------------------------------------------------------


def test_quantile_tokens_added_resized_and_initialised(tmp_path):
    tokenizer, model = load_tokenizer(), _tiny()
    old = model.get_input_embeddings().weight.detach().clone()
    trainer = FeedbackConditionedTrainer(
        model, _config(tmp_path, num_quantiles=3), _offline_dataset(), processing_class=tokenizer
    )
    ids = tokenizer.convert_tokens_to_ids(trainer.feedback_tokens)
    assert trainer.feedback_tokens == ["<|quantile_0|>", "<|quantile_1|>", "<|quantile_2|>"]
    weight = trainer.model.get_input_embeddings().weight.detach()
    assert weight.shape[0] == len(tokenizer) == old.shape[0] + 3
    torch.testing.assert_close(weight[: old.shape[0]], old)
    # New rows live where the old rows live (mean ± the old rows' spread) and differ from each other.
    new = weight[ids]
    assert torch.all((new - old.mean(0)).abs() <= 6 * old.std(0) + 1e-6)
    assert len({tuple(row.tolist()) for row in new}) == 3
    assert tokenizer("<|quantile_1|>1+2=", add_special_tokens=False)["input_ids"][0] == ids[1]  # one atomic token

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = load_tokenizer(tmp_path / "saved")
    assert reloaded.convert_tokens_to_ids("<|quantile_2|>") == ids[2]
    assert (tmp_path / "saved" / "data_pool" / "pool.parquet").exists()


def test_tokenizer_with_quantile_tokens_and_a_fresh_model_gets_the_rows(tmp_path):
    """Reusing a tokenizer saved by an earlier run (tokens present) with a fresh model: the rows are added too."""
    tokenizer = load_tokenizer()
    FeedbackConditionedTrainer(
        _tiny(), _config(tmp_path / "a", num_quantiles=3), _offline_dataset(), processing_class=tokenizer
    )
    model = _tiny()
    rows = model.get_input_embeddings().weight.shape[0]
    trainer = FeedbackConditionedTrainer(
        model, _config(tmp_path / "b", num_quantiles=3), _offline_dataset(), processing_class=tokenizer
    )
    ids = tokenizer.convert_tokens_to_ids(trainer.feedback_tokens)
    weight = trainer.model.get_input_embeddings().weight.detach()
    assert min(ids) >= rows and weight.shape[0] == len(tokenizer)
    assert len({tuple(row.tolist()) for row in weight[ids]}) == 3
    trainer.train()  # would index out of range without the rows


@pytest.mark.parametrize("conversational", [False, True])
def test_labels_mask_prompt_and_feedback_exactly(tmp_path, conversational):
    tokenizer = load_tokenizer()
    config = _config(tmp_path, feedback_type="category", categories=["Good.", "Bad."], beta=0.1)
    trainer = FeedbackConditionedTrainer(
        _tiny(),
        config,
        Dataset.from_dict({"prompt": ["x"]}),
        processing_class=tokenizer,
        feedback_fn=lambda p, c: ["Good."] * len(c),
    )
    prompt = [{"role": "user", "content": "12+30="}] if conversational else "12+30="
    example = trainer.tokenize_example(prompt, "42", "Bad.")
    if conversational:
        prefix_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Bad. 12+30="}], tokenize=False, add_generation_prompt=True
        )
        ref_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
        ref_prefix = tokenizer(ref_text, add_special_tokens=False)["input_ids"]
    else:
        prefix = tokenizer("Bad. input: 12+30=")["input_ids"]
        ref_prefix = tokenizer("input: 12+30=")["input_ids"]
    completion = tokenizer("42", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == prefix + completion
    assert example["labels"] == [-100] * len(prefix) + completion
    assert example["ref_input_ids"] == ref_prefix + completion
    assert example["ref_labels"] == [-100] * len(ref_prefix) + completion
    batch = trainer._collate([example, trainer.tokenize_example(prompt, "4200000", "Good.")])
    assert batch["labels"][0, len(example["labels"]) :].eq(-100).all()  # padding is masked as well
    assert batch["attention_mask"][0].sum() == len(example["input_ids"])


# ---- loss -----------------------------------------------------------------------------------------------


def _loss_inputs(trainer, rows):
    trainer.model.train()
    return trainer._collate([trainer.tokenize_example(*row) for row in rows])


ROWS = [("12+3=", "15", "<|quantile_0|>"), ("rev 4821=", "1284", "<|quantile_4|>")]


def test_loss_without_kl_and_entropy_is_conditional_nll(tmp_path):
    trainer = FeedbackConditionedTrainer(
        _tiny(), _config(tmp_path, beta=0.0), _offline_dataset(), processing_class=load_tokenizer()
    )
    inputs = _loss_inputs(trainer, ROWS)
    loss = trainer.compute_loss(trainer.model, inputs)
    total, count = 0.0, 0
    for prompt, completion, feedback in ROWS:
        example = trainer.tokenize_example(prompt, completion, feedback)
        logps = _hand_logps(trainer.model, example["input_ids"])
        for t, label in enumerate(example["labels"]):
            if label != -100:
                total -= logps[t - 1, label].item()
                count += 1
    assert count == 2 + 1 + 4 + 1  # completion tokens + EOS, nothing of prompt or feedback
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def _hand_kl(policy, reference, rows, trainer, ref_sees_feedback):
    total, count = 0.0, 0
    for prompt, completion, feedback in rows:
        example = trainer.tokenize_example(prompt, completion, feedback)
        policy_logps = _hand_logps(policy, example["input_ids"])
        ref_ids = example["input_ids"] if ref_sees_feedback else example["ref_input_ids"]
        ref_labels = example["labels"] if ref_sees_feedback else example["ref_labels"]
        ref_logps = _hand_logps(reference, ref_ids)
        p_pos = [t - 1 for t, label in enumerate(example["labels"]) if label != -100]
        q_pos = [t - 1 for t, label in enumerate(ref_labels) if label != -100]
        for i, j in zip(p_pos, q_pos, strict=True):
            p, q = policy_logps[i].tolist(), ref_logps[j].tolist()
            total += sum(math.exp(pv) * (pv - qv) for pv, qv in zip(p, q, strict=True))
            count += 1
    return total / count


def test_kl_term_matches_hand_computation(tmp_path):
    tokenizer = load_tokenizer()
    reference = load_random_tiny("llama", hidden_size=32, num_layers=2, intermediate_size=64, seed=1)
    reference.resize_token_embeddings(len(tokenizer) + 5)
    config = _config(tmp_path, beta=0.5, entropy_coef=0.0)
    trainer = FeedbackConditionedTrainer(
        _tiny(), config, _offline_dataset(), processing_class=tokenizer, ref_model=reference
    )
    inputs = _loss_inputs(trainer, ROWS)
    loss = trainer.compute_loss(trainer.model, inputs)
    kl = trainer._metrics["train/kl"][-1]
    nll = trainer._metrics["train/nll"][-1]
    expected = _hand_kl(trainer.model, reference, ROWS, trainer, ref_sees_feedback=False)
    assert kl == pytest.approx(expected, rel=1e-4)
    assert expected > 0.01
    assert loss.item() == pytest.approx(nll + 0.5 * kl, rel=1e-5)


def test_kl_is_zero_for_identical_policies_and_entropy_matches(tmp_path):
    config = _config(tmp_path, beta=1.0, entropy_coef=0.3, ref_sees_feedback=True)
    trainer = FeedbackConditionedTrainer(_tiny(), config, _offline_dataset(), processing_class=load_tokenizer())
    inputs = _loss_inputs(trainer, ROWS)
    assert "ref_input_ids" not in inputs  # the reference reads the same conditioned input
    loss = trainer.compute_loss(trainer.model, inputs)
    assert trainer._metrics["train/kl"][-1] == pytest.approx(0.0, abs=1e-6)
    entropies = []
    for prompt, completion, feedback in ROWS:
        example = trainer.tokenize_example(prompt, completion, feedback)
        logps = _hand_logps(trainer.model, example["input_ids"])
        entropies += [
            -(logps[t - 1].exp() * logps[t - 1]).sum().item() for t, lab in enumerate(example["labels"]) if lab != -100
        ]
    assert trainer._metrics["train/entropy"][-1] == pytest.approx(np.mean(entropies), rel=1e-5)
    assert loss.item() == pytest.approx(trainer._metrics["train/nll"][-1] - 0.3 * np.mean(entropies), rel=1e-5)


# ---- online loop: errors, generate, resume ------------------------------------------------------------


PROMPTS = Dataset.from_dict({"prompt": ["1+2=", "3+4=", "rev 123=", "rev 4567=", "10+10="]})


def test_unknown_category_is_a_clear_error(tmp_path):
    config = _config(tmp_path, feedback_type="category", categories=["good", "bad"])
    trainer = FeedbackConditionedTrainer(
        _tiny(),
        config,
        PROMPTS,
        processing_class=load_tokenizer(),
        feedback_fn=lambda p, c: ["good", "meh"] * (len(c) // 2),
    )
    with pytest.raises(
        ValueError,
        match=r"feedback_fn '\S+:\S*<lambda>' returned unknown category 'meh' for completion 1.*\['good', 'bad'\]",
    ):
        trainer.train()


def test_non_finite_score_is_a_clear_error(tmp_path):
    def flaky_reward(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1) + [float("nan")]

    trainer = FeedbackConditionedTrainer(
        _tiny(), _config(tmp_path), PROMPTS, processing_class=load_tokenizer(), reward_funcs=flaky_reward
    )
    with pytest.raises(
        ValueError, match=r"reward function '\S+:\S*flaky_reward' returned a non-finite score nan for completion 7"
    ):
        trainer.train()
    with pytest.raises(ValueError, match="non-finite score inf"):
        FeedbackConditionedTrainer(
            _tiny(),
            _config(tmp_path, feedback_type="text"),
            PROMPTS,
            processing_class=load_tokenizer(),
            feedback_fn=lambda p, c: [("ok", math.inf)] * len(c),
        ).train()


def test_text_feedback_loop_conditions_on_top_scoring_feedback(tmp_path):
    seen = []

    def judge(prompts, completions):
        return [(f"length {len(c)}", float(len(c))) for c in completions]

    config = _config(tmp_path, feedback_type="text", beta=0.0)
    trainer = FeedbackConditionedTrainer(
        _tiny(), config, PROMPTS, processing_class=load_tokenizer(), feedback_fn=judge
    )
    original = trainer._sample

    def spy(prompts, feedback, seed, **kw):
        seen.append(feedback)
        return original(prompts, feedback, seed, **kw)

    trainer._sample = spy
    trainer.train()
    assert seen[0] is None  # iteration 1 samples unconditioned (ALT)
    assert seen[1] == f"length {int(trainer.pool.score[trainer.pool.iteration == 0].max())}"
    assert set(trainer.pool.iteration.tolist()) == {0, 1} and len(trainer.pool) == 2 * 4 * 2
    trainer.generate(["1+2="])
    assert seen[-1] == trainer.pool.best_text_feedback()


def test_generate_conditions_on_best_bin_by_default(tmp_path):
    trainer = FeedbackConditionedTrainer(
        _tiny(), _config(tmp_path), _offline_dataset(), processing_class=load_tokenizer()
    )
    captured = {}
    trainer._sample = lambda prompts, feedback, seed, **kw: (
        captured.update(feedback=feedback) or ([""] * len(prompts), [0])
    )
    trainer.generate(["1+2="])
    assert captured["feedback"] == "<|quantile_0|>"
    trainer.generate(["1+2="], feedback=4)
    assert captured["feedback"] == "<|quantile_4|>"


def test_checkpoint_resume_restores_the_pool_and_continues_identically(tmp_path):
    def run(output, resume=None, max_steps=None):
        config = _config(
            tmp_path, output_dir=str(tmp_path / output), save_strategy="steps", save_steps=2, num_rounds=2
        )
        trainer = FeedbackConditionedTrainer(
            _tiny(), config, PROMPTS, processing_class=load_tokenizer(), reward_funcs=testbed.reward
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = DataPool.load(checkpoint / "data_pool")
    assert saved.last_iteration == 0 and len(saved) == 8
    resumed = run("resumed", resume=str(checkpoint))
    assert resumed.pool.completion.tolist() == full.pool.completion.tolist()
    np.testing.assert_array_equal(resumed.pool.score, full.pool.score)
    assert resumed.pool.rng.bit_generator.state == full.pool.rng.bit_generator.state


def test_offline_mode_requires_feedback_columns(tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['feedback'\]"):
        FeedbackConditionedTrainer(
            _tiny(),
            _config(tmp_path),
            Dataset.from_dict({"prompt": ["a"], "completion": ["b"]}),
            processing_class=load_tokenizer(),
        )


def test_offline_training_runs_as_conditional_sft(tmp_path):
    config = _config(tmp_path, max_steps=3, beta=0.0)
    trainer = FeedbackConditionedTrainer(_tiny(), config, _offline_dataset(), processing_class=load_tokenizer())
    before = copy.deepcopy(trainer.model.state_dict())
    output = trainer.train()
    assert output.global_step == 3
    assert trainer.pool.bins().tolist() == [0, 1, 3, 2]  # scores 1.0, 0.9, 0.0, 0.5: fewer rows than bins
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_vllm_missing_is_a_clear_import_error(tmp_path):
    from trl.import_utils import is_vllm_available

    if is_vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match="use_vllm=True needs vLLM"):
        FeedbackConditionedTrainer(
            _tiny(),
            _config(tmp_path, use_vllm=True),
            PROMPTS,
            processing_class=load_tokenizer(),
            reward_funcs=testbed.reward,
        )


def test_generate_warns_about_a_bin_no_pool_row_is_in(tmp_path):
    """Tied scores share a bin, so the last bins can stay empty; their tokens never get a training signal."""
    trainer = FeedbackConditionedTrainer(
        _tiny(), _config(tmp_path, num_quantiles=3), _offline_dataset(), processing_class=load_tokenizer()
    )
    trainer.pool.add(["1+1="] * 4, ["0"] * 4, scores=[0.0] * 4, iteration=1)  # many ties at the minimum
    counts = trainer.pool.bin_counts()
    assert counts.tolist() == [np.sum(trainer.pool.bins() == b) for b in range(3)] and counts[2] == 0
    with pytest.warns(UserWarning, match=r"bin\(s\) \[2\].*use bin 1"):
        trainer.generate(["1+2="], feedback=2, max_new_tokens=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.generate(["1+2="], feedback=1, max_new_tokens=2)
    assert not [w for w in caught if "hold no pool rows" in str(w.message)]


def test_testbed_quantile_loop_beats_the_start_and_the_worst_bin(tmp_path):
    """Online Quark loop on the shipped testbed model, the issue's "must show" (~40 s).

    Measured over seeds 0-3 (docs/feedback.md): conditioned on the best bin the samples score 0.47-0.52
    after 4 iterations, the untrained model ~0.38, the worst populated bin ~0.2. The quantile token in
    front of the prompt first *costs* reward (the tiny model only ever saw bare prompts), so the loop needs
    a few hundred steps on a pool of thousands of samples before the conditioning pays; fewer steps or
    smaller pools end below the start.
    """
    from hf_align.testbed import score, solve
    from hf_align.testbed.evaluation import eval_prompts

    tb = testbed.load()
    config = _config(
        tmp_path,
        num_quantiles=5,
        feedback_template="{feedback}{prompt}",
        num_rounds=4,
        steps_per_round=150,
        prompts_per_round=256,
        num_generations=4,
        max_completion_length=6,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        beta=0.0,
        logging_steps=1000,
        seed=3,
    )
    trainer = FeedbackConditionedTrainer(
        tb.model, config, tb.prompt_dataset(2048), processing_class=tb.tokenizer, reward_funcs=testbed.reward
    )
    prompts = eval_prompts(256, seed=1234)

    def mean_reward(feedback):
        completions = trainer.generate(prompts, feedback=feedback, seed=1)
        return float(np.mean([score(solve(p), c) for p, c in zip(prompts, completions)]))

    start = float(  # the bare prompt, before any training
        np.mean([score(solve(p), c) for p, c in zip(prompts, trainer.generate(prompts, unconditioned=True, seed=1))])
    )
    trainer.train()
    worst_populated = int(np.flatnonzero(trainer.pool.bin_counts())[-1])
    best, worst = mean_reward(0), mean_reward(worst_populated)
    first, last = trainer.iteration_timings[0]["mean_score"], trainer.iteration_timings[-1]["mean_score"]
    print(
        f"start {start:.3f}  best {best:.3f}  worst (bin {worst_populated}) {worst:.3f}  pool {first:.3f} -> {last:.3f}"
    )
    assert best > start + 0.04
    assert best > worst + 0.1


def test_reference_copy_stays_the_initial_policy_after_a_trl_trainer_patched_the_model(tmp_path):
    """TRL's fused LM head makes a plain deepcopy run the original model: the KL reference would track the policy."""
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny()
    add_fused_lm_head(model)  # as left behind by an earlier SFT/DPO run in the same process
    ids = torch.tensor([[21, 22, 16, 23, 34]])
    with torch.no_grad():
        initial = model(input_ids=ids).logits.clone()
    trainer = FeedbackConditionedTrainer(
        model, _config(tmp_path, beta=0.5, max_steps=3, learning_rate=1e-2), _offline_dataset(),
        processing_class=load_tokenizer(),
    )  # fmt: skip
    trainer.train()
    with torch.no_grad():
        policy, reference = trainer.model(input_ids=ids).logits, trainer.ref_model(input_ids=ids).logits
    vocab = initial.shape[-1]  # the quantile tokens' rows come after the original vocabulary
    torch.testing.assert_close(reference[..., :vocab], initial)
    assert (policy[..., :vocab] - initial).abs().max() > 1e-3


def test_generate_unconditioned_renders_the_prompt_without_feedback(tmp_path):
    config = _config(tmp_path, num_quantiles=2, feedback_template="{feedback} input: {prompt}")
    trainer = FeedbackConditionedTrainer(_tiny(), config, _offline_dataset(), processing_class=load_tokenizer())
    seen = []
    trainer._sample = lambda prompts, feedback, seed, **kw: seen.append((prompts, feedback)) or ([""], [0])
    trainer.generate(["1+2="], unconditioned=True)
    assert seen[-1] == (["1+2="], None)
    assert trainer.render_prompt("1+2=", None) == "input: 1+2="  # the unconditioned template
    trainer.generate(["1+2="])
    assert seen[-1] == (["1+2="], "<|quantile_0|>")
    with pytest.raises(ValueError, match="either feedback or unconditioned"):
        trainer.generate(["1+2="], feedback=0, unconditioned=True)


def test_quantile_rule_reaches_the_pool_and_is_checked(tmp_path):
    config = _config(tmp_path, num_quantiles=3, quantile_rule="quark")
    trainer = FeedbackConditionedTrainer(_tiny(), config, _offline_dataset(), processing_class=load_tokenizer())
    assert trainer.pool.quantile_rule == "quark"
    assert trainer.pool.bins().tolist() == [0, 1, 2, 2]  # scores 1.0, 0.9, 0.0, 0.5: one per bin, rest in the last
    with pytest.raises(ValueError, match="quantile_rule"):
        _config(tmp_path, quantile_rule="rank")


def test_config_is_trls_base_config_and_saves_json_arguments_only(tmp_path):
    """On TRL's base config (defaults shared with every hf-align trainer); the shared mixin writes
    training_args.json (no pickle) on every save; the model card knows the papers."""
    from trl.trainer.base_config import _BaseConfig

    from hf_align.callbacks.json_training_args import JsonTrainingArgsCallback
    from hf_align.trainers._base import HFAlignTrainerMixin

    config = FeedbackConditionedConfig(output_dir=str(tmp_path / "defaults"), report_to="none", use_cpu=True)
    assert isinstance(config, _BaseConfig)
    assert config.logging_steps == 10 and config.bf16 is False and config.gradient_checkpointing is True
    trainer = FeedbackConditionedTrainer(
        _tiny(), _config(tmp_path, max_steps=1), _offline_dataset(), processing_class=load_tokenizer()
    )
    assert type(trainer).__mro__[1] is HFAlignTrainerMixin
    assert not any(isinstance(cb, JsonTrainingArgsCallback) for cb in trainer.callback_handler.callbacks)
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "training_args.json").exists()
    assert not (tmp_path / "saved" / "training_args.bin").exists()
    assert {"alt", "quark"} <= set(trainer._tag_names)
    trainer.create_model_card()  # TRL's card: the papers' id and BibTeX from _paper
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2205.13636" in card and "@inproceedings{lu2022quark" in card and "lloret2024alt" in card


def test_peft_adapter_trains_under_the_default_gradient_checkpointing(tmp_path):
    """TRL's base config turns gradient checkpointing on: LoRA layers still get gradients (transformers enables
    input grads when it turns checkpointing on)."""
    from peft import LoraConfig

    words = ["Excellent.", "Good.", "Mediocre.", "Bad.", "Horrible."]
    config = _config(
        tmp_path, max_steps=2, quantile_words=words, beta=0.1, learning_rate=1e-2,
        gradient_checkpointing_kwargs={"use_reentrant": True},  # the variant that needs input grads
    )  # fmt: skip
    assert config.gradient_checkpointing
    trainer = FeedbackConditionedTrainer(
        _tiny(), config, _offline_dataset(), processing_class=load_tokenizer(),
        peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )  # fmt: skip
    assert trainer.ref_model is None  # the reference is the model with its adapter off
    before = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    assert trainer.model.base_model.model.is_gradient_checkpointing
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[k], v) for k, v in before.items())
