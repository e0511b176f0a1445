"""Every config field is checked when the config is built: its type and its range, with the field named.

A recipe value of the wrong type or outside its range must not reach TRL (where it fails at step 1) or, worse,
train (a negative beta trains toward the rejected answers; an infinite EOS weight makes every weight NaN).
"""

import math
import warnings

import pytest

from hf_align.config_checks import RANGES, Range, check_config_values
from hf_align.testbed import quiet_training_args
from hf_align.trainers import AdaptiveMergeConfig, FeedbackConditionedConfig, MaskedDPOConfig, NPOConfig


BASE = quiet_training_args()

BAD = [
    # (config class, field, value, what the message must say)
    (MaskedDPOConfig, "beta", 0.0, "in (0, inf]"),
    (MaskedDPOConfig, "beta", -0.1, "in (0, inf]"),
    (MaskedDPOConfig, "beta", math.nan, "a finite number"),
    (MaskedDPOConfig, "beta", math.inf, "a finite number"),
    (MaskedDPOConfig, "beta", True, "a finite number"),
    (MaskedDPOConfig, "beta", [0.1, 0.2], "a finite number"),
    (MaskedDPOConfig, "beta", "0.1", "a finite number"),
    (MaskedDPOConfig, "eos_token_weight", math.inf, "a finite number"),
    (MaskedDPOConfig, "eos_token_weight", math.nan, "a finite number"),
    (MaskedDPOConfig, "eos_token_weight", -1.0, "in [0, inf]"),
    (MaskedDPOConfig, "rejected_token_ratio", 0.0, "in (0, 1]"),
    (MaskedDPOConfig, "rejected_token_ratio", 1.5, "in (0, 1]"),
    (MaskedDPOConfig, "neuron_mask_ratio", 1.2, "in (0, 1]"),
    (MaskedDPOConfig, "neuron_mask_ratio", True, "a finite number"),
    (MaskedDPOConfig, "neuron_mask_exclude_top", 1.0, "in [0, 1)"),
    (MaskedDPOConfig, "neuron_mask_exclude_top", -0.1, "in [0, 1)"),
    (MaskedDPOConfig, "neuron_mask_granularity", 3, "a string"),
    (MaskedDPOConfig, "neuron_mask_path", 5, "a string"),
    (MaskedDPOConfig, "save_merged", "yes", "true or false"),
    (MaskedDPOConfig, "label_smoothing", 0.5, "in [0, 0.5)"),
    (MaskedDPOConfig, "learning_rate", -1e-5, "in [0, inf]"),
    (MaskedDPOConfig, "per_device_train_batch_size", 0, "in [1, inf]"),
    (MaskedDPOConfig, "per_device_train_batch_size", 2.5, "an integer"),
    (MaskedDPOConfig, "gradient_accumulation_steps", 0, "in [1, inf]"),
    (MaskedDPOConfig, "max_length", 0, "in [1, inf]"),
    (MaskedDPOConfig, "weight_decay", -0.1, "in [0, inf]"),
    (NPOConfig, "beta", 0.0, "in (0, inf]"),
    (NPOConfig, "beta", True, "a finite number"),
    (NPOConfig, "retain_weight", -1.0, "in [0, inf]"),
    (NPOConfig, "simnpo_gamma", math.nan, "a finite number"),
    (NPOConfig, "retain_batch_size", 0, "in [1, inf]"),
    (NPOConfig, "eos_token_weight", math.inf, "a finite number"),
    (NPOConfig, "precompute_ref_log_probs", "no", "true or false"),
    (FeedbackConditionedConfig, "num_quantiles", 2.7, "an integer"),
    (FeedbackConditionedConfig, "num_quantiles", 0, "in [1, inf]"),
    (FeedbackConditionedConfig, "categories", "good", "a list of strings"),
    (FeedbackConditionedConfig, "top_p", 0.0, "in (0, 1]"),
    (FeedbackConditionedConfig, "temperature", 0.0, "in (0, inf]"),
    (FeedbackConditionedConfig, "top_k", -1, "in [0, inf]"),
    (FeedbackConditionedConfig, "kl_coef", -1.0, "in [0, inf]"),
    (FeedbackConditionedConfig, "entropy_coef", math.inf, "a finite number"),
    (FeedbackConditionedConfig, "num_generations", 0, "in [1, inf]"),
    (FeedbackConditionedConfig, "max_new_tokens", 0, "in [1, inf]"),
    (FeedbackConditionedConfig, "reward_weights", [1.0, "a"], "a list of numbers"),
    (FeedbackConditionedConfig, "quantile_words", "Good.", "a list of strings"),
    (AdaptiveMergeConfig, "learning_rate", math.nan, "a finite number"),
    (AdaptiveMergeConfig, "per_device_train_batch_size", -2, "in [1, inf]"),
]


@pytest.mark.parametrize("config_class, name, value, expected", BAD, ids=lambda v: repr(v)[:20])
def test_a_bad_field_is_refused_by_name_when_the_config_is_built(tmp_path, config_class, name, value, expected):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        config_class(output_dir=str(output_dir), **BASE, **{name: value})
    message = str(error.value)
    assert f"{config_class.__name__}.{name}" in message and expected in message
    assert repr(value) in message
    assert "\n" not in message
    assert not output_dir.exists()  # nothing written


@pytest.mark.parametrize("config_class", [MaskedDPOConfig, NPOConfig, AdaptiveMergeConfig, FeedbackConditionedConfig])
def test_defaults_and_good_values_pass(tmp_path, config_class):
    config_class(output_dir=str(tmp_path), **BASE)
    config_class(output_dir=str(tmp_path), learning_rate=1, max_steps=3, **BASE)  # an int where a float is asked


def test_a_quantile_token_format_without_the_bin_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"quantile_token_format must contain '\{i\}'.*'<q>'"):
        FeedbackConditionedConfig(output_dir=str(tmp_path), quantile_token_format="<q>", **BASE)


def test_a_trl_string_that_trl_normalises_is_left_to_trl(tmp_path):
    """TRL turns ``loss_type: sigmoid`` into ``["sigmoid"]``: a TRL recipe must keep working."""
    assert MaskedDPOConfig(output_dir=str(tmp_path), loss_type="sigmoid", **BASE).loss_type == ["sigmoid"]


def test_a_zero_learning_rate_warns_that_nothing_will_be_learned(tmp_path):
    with pytest.warns(UserWarning, match="learning_rate is 0"):
        MaskedDPOConfig(output_dir=str(tmp_path), learning_rate=0.0, **BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        check_config_values(MaskedDPOConfig(output_dir=str(tmp_path), learning_rate=1e-6, **BASE))


def test_ranges_written_out():
    assert Range(0, None, open_low=True).holds(1e-9) and not Range(0, None, open_low=True).holds(0.0)
    assert Range(0, 1).holds(0.0) and Range(0, 1).holds(1.0) and not Range(0, 1).holds(1.0000001)
    assert not Range(0, 1, open_high=True).holds(1.0)
    assert RANGES["beta"].describe() == "in (0, inf]"
