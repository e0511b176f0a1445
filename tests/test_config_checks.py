"""Every config field is checked when the config is built: its type and its range, with the field named.

A recipe value of the wrong type or outside its range must not reach TRL (where it fails at step 1) or, worse,
train (a negative beta trains toward the rejected answers; an infinite EOS weight makes every weight NaN).
"""

import math
import warnings

import pytest

from hf_align.config_checks import LIBRARY_RANGES, Range, check_config_values
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
    (FeedbackConditionedConfig, "beta", -1.0, "in [0, inf]"),
    (FeedbackConditionedConfig, "entropy_coef", math.inf, "a finite number"),
    (FeedbackConditionedConfig, "num_generations", 0, "in [1, inf]"),
    (FeedbackConditionedConfig, "max_completion_length", 0, "in [1, inf]"),
    (FeedbackConditionedConfig, "reward_weights", [1.0, "a"], "a list of numbers"),
    (FeedbackConditionedConfig, "quantile_words", "Good.", "a list of strings"),
    # choices declared in the field's metadata (were hand-written "must be one of" checks)
    (MaskedDPOConfig, "neuron_mask_scope", "layer", "one of ('global', 'tensor')"),
    (MaskedDPOConfig, "neuron_mask_select", "best", "one of ('top', 'bottom', 'random')"),
    (MaskedDPOConfig, "neuron_mask_granularity", "column", "one of ('row', 'element')"),
    (MaskedDPOConfig, "neuron_delta_dtype", "int8", "one of ('auto', 'float32', 'bfloat16', 'float16')"),
    (MaskedDPOConfig, "neuron_sampled_gradient_density", 1.5, "in [0, 1]"),
    (NPOConfig, "neuron_mask_scope", "layer", "one of ('global', 'tensor')"),
    (NPOConfig, "npo_loss_type", "dpo", "one of ('npo', 'simnpo')"),
    (NPOConfig, "npo_level", "word", "one of ('sequence', 'token')"),
    (NPOConfig, "retain_loss_type", "mse", "one of ('nll', 'kl')"),
    (FeedbackConditionedConfig, "feedback_type", "score", "one of ('quantile', 'category', 'text')"),
    (FeedbackConditionedConfig, "quantile_rule", "median", "one of ("),
    (FeedbackConditionedConfig, "pool_keep", "oldest", "one of ('newest', 'best')"),
    (AdaptiveMergeConfig, "reg_type", "l2", "one of ('l1', 'weighted')"),
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
    assert LIBRARY_RANGES["trl.DPOConfig"]["beta"].describe() == "in (0, inf]"


# ------------------------------------------------------------------------------------ one declaration per option
def _declaration(field):
    return field.default, field.metadata.get("help"), field.metadata.get("choices"), field.metadata.get("range")


def test_mask_and_score_options_are_declared_once_and_read_everywhere():
    """The trainer configs' ``neuron_mask_*`` and warm-up's ``score_*`` / ``select_*`` fields are MaskSelection's and
    ScoreOptions' own declarations (default, help, choices, range), not copies that can drift."""
    import dataclasses

    from hf_align.cli.training import _score_arguments
    from hf_align.masks import MaskSelection
    from hf_align.scores import ScoreOptions

    NeuronScoreArguments = _score_arguments()  # noqa: N806 (warmup-dpo's dataclass, built on use)

    selection = {f.name: f for f in dataclasses.fields(MaskSelection)}
    scoring = {f.name: f for f in dataclasses.fields(ScoreOptions)}
    for config in (MaskedDPOConfig, NPOConfig):
        fields = config.__dataclass_fields__
        for name, field in selection.items():
            if name != "seed":  # the run's own seed seeds select='random'
                assert _declaration(fields[f"neuron_mask_{name}"]) == _declaration(field)
    fields = NeuronScoreArguments.__dataclass_fields__
    for name, field in selection.items():
        if name != "seed":
            assert _declaration(fields[f"neuron_mask_{name}"]) == _declaration(field)
    for name, field in scoring.items():
        assert _declaration(fields[name if name.startswith("score_") else f"score_{name}"]) == _declaration(field)
    assert selection["ratio"].metadata["range"].describe() == "in (0, 1]"


def test_select_ratio_goes_through_the_same_checks_as_every_field():
    from hf_align.callbacks import MaskAccumulationCallback

    for value, expected in ((1.5, "MaskSelection.ratio must be in (0, 1], got 1.5."), (True, "a finite number")):
        with pytest.raises(ValueError) as error:
            MaskAccumulationCallback(select_ratio=value)
        assert expected in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"ScoreOptions.granularity must be one of \('row', 'element'\)"):
        MaskAccumulationCallback(granularity="column")
    with pytest.raises(ValueError, match="exclude_top \\+ ratio must be at most 1"):
        MaskAccumulationCallback(select_ratio=0.6, exclude_top=0.5)


def test_every_config_still_parses_with_trl_parser():
    """``range`` lives in field metadata, which transformers' HfArgumentParser hands to argparse: it must stay out
    of what argparse sees (choices go through and show in --help)."""
    import dataclasses

    from trl import TrlParser

    from hf_align.cli.training import _score_arguments
    from hf_align.config_checks import CheckedConfig, Range

    NeuronScoreArguments = _score_arguments()  # noqa: N806

    for config_class in (MaskedDPOConfig, NPOConfig, FeedbackConditionedConfig, AdaptiveMergeConfig):
        assert "{global,tensor}" in TrlParser((config_class,)).format_help() or config_class not in (
            MaskedDPOConfig,
            NPOConfig,
        )
    (args,) = TrlParser((NeuronScoreArguments,)).parse_args_into_dataclasses(["--neuron_mask_ratio", "0.2"])
    assert args.neuron_mask_ratio == 0.2 and args.score_method == "weight_diff"

    @dataclasses.dataclass
    class Plain(CheckedConfig):  # a plain metadata dict with a range is made parser-safe too
        weight: float = dataclasses.field(default=1.0, metadata={"help": "h", "range": Range(0, None)})

    (plain,) = TrlParser((Plain,)).parse_args_into_dataclasses(["--weight", "2"])
    assert plain.weight == 2.0
    with pytest.raises(ValueError, match=r"Plain.weight must be in \[0, inf\], got -1.0"):
        Plain(weight=-1.0)


def test_library_ranges_follow_the_declaring_class_not_the_field_name():
    """``beta`` is DPO's β (> 0) in a DPOConfig; a same-named field of a class that is no DPOConfig is not judged by
    DPO's rule."""
    import dataclasses

    from hf_align.config_checks import CheckedConfig

    @dataclasses.dataclass
    class Other(CheckedConfig):
        beta: float = 0.0

    Other(beta=-1.0)  # no range declared for it
    with pytest.raises(ValueError, match=r"MaskedDPOConfig.beta must be in \(0, inf\]"):
        MaskedDPOConfig(output_dir="unused", beta=0.0, **BASE)


def test_library_ranges_reach_a_config_on_another_trl_parent(tmp_path):
    """A masked trainer on ``trl.KTOConfig`` (wip/registry's masked KTO) gets KTO's ranges and the mask options'
    choices without declaring either again."""
    import dataclasses

    from trl import KTOConfig

    from hf_align.trainers._base import TokenWeightArguments
    from hf_align.trainers._masking import NeuronMaskArguments

    @dataclasses.dataclass
    class KTOLike(NeuronMaskArguments, TokenWeightArguments, KTOConfig):
        pass

    for name, value, expected in [
        ("beta", 0.0, "KTOLike.beta must be in (0, inf], got 0.0."),
        ("undesirable_weight", -1.0, "KTOLike.undesirable_weight must be in [0, inf], got -1.0."),
        ("neuron_mask_scope", "layer", "KTOLike.neuron_mask_scope must be one of ('global', 'tensor'), got 'layer'."),
    ]:
        with pytest.raises(ValueError) as error:
            KTOLike(output_dir=str(tmp_path), **BASE, **{name: value})
        assert str(error.value) == expected


def test_the_feedback_fields_are_feedback_format_s_declarations():
    """FeedbackConditionedConfig carries FeedbackFormat's and PoolOptions' fields, declared there once."""
    import dataclasses

    from hf_align.data_pool import PoolOptions
    from hf_align.feedback_format import FeedbackFormat

    config = {f.name: f for f in dataclasses.fields(FeedbackConditionedConfig)}
    for owner in (FeedbackFormat, PoolOptions):
        for field in dataclasses.fields(owner):
            ours = config[field.name]
            assert (ours.default, ours.metadata["help"]) == (field.default, field.metadata["help"])
            assert ours.metadata.get("choices") == field.metadata.get("choices")


def test_must_be_one_of_is_written_once():
    from pathlib import Path

    import hf_align

    root = Path(hf_align.__file__).parent
    assert [p.name for p in sorted(root.rglob("*.py")) if "must be one of" in p.read_text()] == ["config_checks.py"]
