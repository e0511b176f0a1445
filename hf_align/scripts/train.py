"""The training script every training command runs, as ``trl/scripts/dpo.py`` does: data, model, trainer, train, save.

:func:`run` takes the dataclasses :mod:`hf_align.cli.training` parsed (TRL's ``ScriptArguments``, the trainer's
config, ``ModelConfig``, ``DatasetMixtureConfig``, then the command's own) and builds the registry's trainer
(:data:`hf_align.trainers.registry.TRAINERS`); :func:`train` and :func:`train_and_save` are the steps every command
shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_align.errors import UserError


def run(name: str, script_args, training_args, model_args, *more) -> int:
    """Train command ``name`` on the parsed dataclasses (``more``: the mixture config, then the command's own)."""
    from hf_align.trainers.registry import TRAINERS

    spec = TRAINERS[name]
    if name == "feedback":
        return _run_feedback(spec, script_args, training_args, model_args)
    dataset_args, *extra = more
    kwargs: dict[str, Any] = {}
    if name == "npo":
        kwargs["retain_dataset"] = _retain_data(extra[0])
    elif name == "warmup-dpo":
        kwargs["callbacks"] = [_mask_accumulation(extra[0], training_args.seed)]
    elif name.startswith("aligner-"):
        kwargs["peft_config"] = _aligner_config(extra[0], model_args, training_args)
    # hf-align's trainers check their columns themselves; for TRL's, the minimal sets (prompt is optional)
    columns = None if spec.own else [c for c in spec.columns if not any(set(o) < set(c) for o in spec.columns)]
    return train(spec.trainer_class(), script_args, training_args, model_args, dataset_args, columns, **kwargs)


def _retain_data(data_args):
    from hf_align.scripts.utils import load_split, require_columns

    if not data_args.retain_dataset_name:
        return None
    source = "retain_dataset_name"
    retain = load_split(
        data_args.retain_dataset_name, data_args.retain_dataset_split, source, data_args.retain_dataset_config
    )
    names = retain.column_names  # NPOTrainer checks the forget data, not yet the retain data
    if not ("completion" in names or "text" in names or "messages" in names):
        require_columns(retain, ["completion"], f"{source} {data_args.retain_dataset_name!r}", " Retain data needs "
                        "a 'completion' (with 'prompt'), 'text' or 'messages' column.")  # fmt: skip
    return retain


def _mask_accumulation(score_args, seed: int):
    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.config_checks import from_prefixed
    from hf_align.masks import MaskSelection
    from hf_align.scores import ScoreOptions

    options = from_prefixed(ScoreOptions, score_args, "score_")
    selection = from_prefixed(MaskSelection, score_args, "neuron_mask_", seed=seed)
    return MaskAccumulationCallback(options=options, selection=selection)


def _aligner_config(aligner_args, model_args, training_args):
    """The Aligner adapter, checked against the model's config alone, before any weight is loaded."""
    from transformers import AutoConfig

    from hf_align.loading import check_gguf_inputs
    from hf_align.peft_tuners import AlignerConfig
    from hf_align.peft_tuners.aligner.model import check_model_config
    from hf_align.scripts.utils import resolve_model_path

    peft_config = AlignerConfig(
        num_tokens=aligner_args.aligner_num_tokens,
        start_layer=aligner_args.aligner_start_layer,
        layers_to_transform=aligner_args.aligner_layers,
        task_type="CAUSAL_LM",
    )
    path = resolve_model_path(model_args.model_name_or_path)
    gguf = check_gguf_inputs(path)[0]  # a GGUF's config is read from its header
    config = AutoConfig.from_pretrained(
        str(gguf.parent) if gguf else path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        **({"gguf_file": gguf.name} if gguf else {}),
    )
    check_model_config(peft_config, config.to_dict())
    return peft_config


def _run_feedback(spec, script_args, training_args, model_args) -> int:
    """Online (``reward_funcs`` / ``feedback_fn``): prompts to sample from; offline: prompt/completion/feedback."""
    from trl import get_peft_config

    from hf_align.scripts.utils import load_split, require_columns

    online = bool(training_args.reward_funcs) or bool(training_args.feedback_fn)
    if training_args.feedback_type != "quantile" and online and not training_args.feedback_fn:
        raise UserError(
            f"feedback_type {training_args.feedback_type!r} needs feedback_fn ('package.module:function' returning "
            "a category or text per completion); reward_funcs only give scores."
        )
    train_data = load_split(
        script_args.dataset_name, script_args.dataset_train_split, "dataset_name", script_args.dataset_config
    )
    source = f"dataset_name {script_args.dataset_name!r}"
    offline_hint = (
        " Without reward_funcs or feedback_fn the feedback command trains offline on prompt/completion/feedback rows; "
        "set reward_funcs or feedback_fn ('package.module:function') to sample and score online."
    )
    require_columns(
        train_data,
        ["prompt"] if online else ["prompt", "completion", "feedback"],
        source,
        "" if online else offline_hint,
    )
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    trainer = spec.trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_data,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    train_and_save(trainer, training_args, script_args)
    return 0


def model_init_kwargs(model_args, training_args) -> dict[str, Any]:
    """The ``from_pretrained`` kwargs TRL's own scripts build from ``ModelConfig`` (``trl/scripts/dpo.py``), plus
    ``quantization_config`` (TRL's ``get_quantization_config``) when ``--load_in_4bit``/``--load_in_8bit`` asks for it:
    as in TRL, no ``device_map`` is forced (TRL's model loading picks it)."""
    from trl import get_quantization_config

    kwargs: dict[str, Any] = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(training_args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if getattr(training_args, "model_init_kwargs", None):
        kwargs.update(training_args.model_init_kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def load_model_and_tokenizer(model_args, training_args):
    """A loaded model and tokenizer (through :mod:`hf_align.loading`), for commands that need the objects first."""
    from hf_align.loading import load_model, load_tokenizer
    from hf_align.scripts.utils import resolve_model_path

    path = model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    model = load_model(path, **model_init_kwargs(model_args, training_args))
    tokenizer = load_tokenizer(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _get_mixture(get_dataset, dataset_args):
    """TRL's ``get_dataset``; a local data file of the mixture that does not parse is one line naming it (and the
    line), as for ``dataset_name`` (:func:`hf_align.scripts.utils.load_data_file`)."""
    try:
        return get_dataset(dataset_args)
    except Exception as err:  # noqa: BLE001 - diagnosed below; anything else keeps its cause
        from hf_align.scripts.utils import DATA_BUILDERS, load_data_file

        for entry in dataset_args.datasets:
            files = entry.data_files if entry.data_files is not None else [entry.path]
            files = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
            for name in (f for group in files for f in ([group] if isinstance(group, str) else group)):
                path = Path(name)
                if path.is_file() and path.suffix in DATA_BUILDERS:
                    load_data_file(path, DATA_BUILDERS[path.suffix], what="`datasets` entry")  # one line if broken
        raise UserError(f"the `datasets` mixture could not be loaded: {str(err).strip().splitlines()[0]}") from err


def load_training_data(script_args, dataset_args, training_args) -> tuple[Any, Any]:
    """(train, eval) as ``trl dpo``/``trl sft`` choose them: TRL's ``get_dataset`` for a ``datasets:`` mixture (with
    ``test_split_size``), else ``dataset_name`` (``dataset_streaming`` honoured); the eval split
    ``dataset_test_split`` only when ``eval_strategy`` is not ``no``."""
    from trl import get_dataset

    from hf_align.scripts.utils import load_dataset_any, split

    if getattr(dataset_args, "datasets", None):
        if script_args.dataset_name:
            import warnings

            warnings.warn("Both `datasets` and `dataset_name` are given: `datasets` is used.", stacklevel=2)
        dataset, source = _get_mixture(get_dataset, dataset_args), "the `datasets` mixture"
    elif script_args.dataset_name:
        dataset = load_dataset_any(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
        source = f"dataset_name {script_args.dataset_name!r}"
    else:
        raise UserError("Either `datasets` (a mixture) or `dataset_name` must be provided.")
    train_data = split(dataset, script_args.dataset_train_split, source)
    if training_args.eval_strategy == "no":
        return train_data, None
    hint = " (set test_split_size with a `datasets` mixture, or dataset_test_split)"
    return train_data, split(dataset, script_args.dataset_test_split, f"{source} (evaluation){hint}")


def train(trainer_class, script_args, training_args, model_args, dataset_args, columns=None, **trainer_kwargs) -> int:
    """What every training command does, as TRL's scripts do: data, a model path the trainer builds from
    ``training_args.model_init_kwargs`` (so a trainer that loads the model to check a mask builds the same one),
    the PEFT config from ``ModelConfig`` (unless the command gives its own), train, save.

    ``columns``: for TRL's own trainers, which fail on a missing column with a bare ``KeyError`` deep in
    ``datasets.map``, the column sets they accept.
    """
    from trl import get_peft_config

    from hf_align import _compat
    from hf_align.callbacks.defaults import add_default_callbacks
    from hf_align.scripts.utils import resolve_model_path
    from hf_align.trainers._data_checks import check_dataset

    train_data, evaluation = load_training_data(script_args, dataset_args, training_args)
    if columns is not None:
        check_dataset(train_data, "train_dataset", columns)
        check_dataset(evaluation, "eval_dataset", columns)
    trainer_kwargs.setdefault("peft_config", get_peft_config(model_args))
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=evaluation,
        **trainer_kwargs,
    )
    add_default_callbacks(trainer)  # TRL's own trainers (warmup-dpo, aligner-*) too: plots, no-op warnings
    if script_args.ignore_bias_buffers:  # TRL's scripts' DDP work-around for boolean buffers
        import torch

        bool_buffers = [name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool]
        _compat.ddp_ignore(trainer.model, bool_buffers)
    train_and_save(trainer, training_args, script_args)
    return 0


def train_and_save(trainer, training_args, script_args) -> None:
    """Train (resuming if asked), save, optionally push: the tail every command shares."""
    from hf_align.callbacks.json_training_args import JsonTrainingArgsCallback, replace_training_args_pickle

    if not any(isinstance(c, JsonTrainingArgsCallback) for c in trainer.callback_handler.callbacks):
        trainer.add_callback(JsonTrainingArgsCallback())
    trainer.card_dataset_name = script_args.dataset_name  # every card (checkpoints too) names the data
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir, _internal_call=True)  # all or nothing; the push below is the one
    trainer.save_state()  # trainer_state.json: the log history the pipeline summary reads
    if trainer.is_world_process_zero():
        replace_training_args_pickle(training_args.output_dir, trainer.args)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the process group
        trainer.end()
