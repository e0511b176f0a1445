"""The model card of what a trainer saves, from the trainer registry: TRL's card (quick start, training procedure,
framework versions, citations of the method and of TRL) with the method's own hyperparameters, the neuron mask, the
data by name and a quick start that runs as written for that artifact (merged model, deltas + mask, adapter, α's).

One entry point for every trainer, hf-align's own and the TRL trainers the CLI runs (``warmup-dpo``,
``aligner-sft``/``aligner-dpo``): :func:`model_card_for` (``spec`` names the registry entry of a TRL trainer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


__all__ = ["COMMON_CARD_ARGS", "adopt_card", "model_card_for", "registry_spec", "tracking_links", "write_card_for"]

COMMON_CARD_ARGS = (
    "learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed", "max_length", "warmup_steps", "weight_decay", "optim",
)  # fmt: skip
"""transformers' training knobs every card shows; the method's own come from ``TrainerSpec.card_fields``."""


def card_hyperparameters(trainer, spec=None) -> dict:
    """The common knobs, the method's own (``spec.card_fields``), the effective batch, and every hf-align field
    set away from its default (``None``/``-1``: unset, not shown)."""
    from hf_align.config_checks import own_fields

    args = trainer.args
    names = (*COMMON_CARD_ARGS, *(spec.card_fields if spec is not None else ()))
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) not in (None, -1)}
    values["total_train_batch_size"] = (
        args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    )
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    for name in own_fields(type(args)):
        value = getattr(args, name, None)
        if name in defaults and value != defaults[name] and isinstance(value, str | int | float | bool):
            values[name] = value
    return values


def tracking_links() -> dict[str, str]:
    """The links of the run's trackers, as TRL's cards give them (Weights & Biases, Trackio, Comet)."""
    from transformers import is_wandb_available
    from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

    links = {}
    if is_wandb_available():
        import wandb

        if wandb.run is not None:
            links["Weights & Biases"] = wandb.run.url
    for label, url in (("Trackio", get_trackio_space_url()), ("Comet", get_comet_experiment_url())):
        if url:
            links[label] = url
    return links


def _base_model_source(model) -> str | None:
    """What the model was loaded from (a Hub id, a folder or a ``.gguf`` file): the card keeps only its Hub id."""
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import get_config_model_id

    if is_peft_model(model):
        return next(iter(model.peft_config.values())).base_model_name_or_path
    return get_config_model_id(model.config) if hasattr(model, "config") else None


def registry_spec(trainer):
    """The registry entry of ``trainer``: its class's for hf-align's trainers; for the TRL trainers the CLI runs,
    ``warmup-dpo`` (a :class:`~hf_align.callbacks.MaskAccumulationCallback` attached) or ``aligner-sft``/``-dpo``
    (an Aligner adapter); None otherwise."""
    from accelerate.utils import is_peft_model

    from hf_align.callbacks import MaskAccumulationCallback
    from hf_align.trainers.registry import TRAINERS, spec_for

    spec = spec_for(type(trainer))
    if spec is not None:
        return spec
    dpo = any(klass.__name__ == "DPOTrainer" for klass in type(trainer).__mro__)
    if dpo and any(isinstance(cb, MaskAccumulationCallback) for cb in trainer.callback_handler.callbacks):
        return TRAINERS["warmup-dpo"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model) and str(next(iter(model.peft_config.values())).peft_type).endswith("ALIGNER"):
        return TRAINERS["aligner-dpo" if dpo else "aligner-sft"]
    return None


def adopt_card(trainer, spec=None) -> None:
    """Make a TRL trainer's ``create_model_card`` (what ``push_to_hub`` calls) write hf-align's card."""

    def create_model_card(model_name=None, dataset_name=None, tags=None, **_):
        if trainer.is_world_process_zero():
            write_card_for(trainer, spec=spec, model_name=model_name, dataset_name=dataset_name, tags=tags)

    trainer.create_model_card = create_model_card


def _deltas_only(trainer) -> bool:
    return getattr(trainer, "neuron_mask", None) is not None and not getattr(trainer.args, "save_merged", True)


def quick_start(trainer, repo: str, base: str | None, spec=None, folder=None) -> str:
    """Python that loads what ``trainer`` saved at ``repo`` (a Hub id, or ``./<folder>`` beside the caller), and
    generates with it when the trainer says how (``card_generate_snippet``: e.g. conditioned on feedback)."""
    if hasattr(trainer, "card_how_to_load"):
        return trainer.card_how_to_load(repo)
    if spec is not None and spec.name == "warmup-dpo":  # what later stages read: the scores and the selected mask
        from hf_align.hub import scores_quick_start
        from hf_align.masks import MASK_META_FILE

        selected = folder is not None and (Path(folder) / "neuron_mask" / MASK_META_FILE).is_file()
        return scores_quick_start(repo, with_mask=selected)
    load = _load_snippet(trainer, repo, base)
    if hasattr(trainer, "card_generate_snippet"):
        load += "\n\n" + trainer.card_generate_snippet()
    return load


def _load_snippet(trainer, repo: str, base: str | None) -> str:
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    base_text = base or "<the base model's Hub id>"
    if is_peft_model(model):
        config = next(iter(model.peft_config.values()))
        register = (
            "import hf_align  # registers Aligner with PEFT (PEFT has no plugin hook)\n"
            if str(config.peft_type).endswith("ALIGNER")
            else ""
        )
        return (
            f"{register}from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_text}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base_text}")  # an adapter keeps the base\'s vocabulary'
        )
    if _deltas_only(trainer):
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\nfrom hf_align.sparse_update import "
            "load_deltas\n\n# this repo holds only the trained deltas + their neuron mask: load the base, then them\n"
            f'model = load_deltas(AutoModelForCausalLM.from_pretrained("{base_text}"), "{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")'
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")\ntokenizer = AutoTokenizer.from_pretrained("{repo}")'
    )


def model_card_for(
    trainer,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags=None,
    folder=None,
    spec=None,
):
    """The model card of what ``trainer`` saves (into ``folder``, default ``args.output_dir``).

    ``spec``: the registry entry (a :class:`~hf_align.trainers.registry.TrainerSpec` or its command name) — found
    from the trainer's class for hf-align's trainers; pass it for a TRL trainer the CLI runs (``"aligner-sft"``).
    ``dataset_name`` (default ``trainer.card_dataset_name``): the data by name (a local path shows its last part).
    """
    from hf_align.hub import build_model_card, mask_summary
    from hf_align.plots import MASK_PLOT_FILE
    from hf_align.trainers.registry import TRAINERS

    spec = TRAINERS[spec] if isinstance(spec, str) else spec or registry_spec(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    from hf_align.hub import hub_id

    source = _base_model_source(model)
    base = hub_id(source)
    paper = spec.paper_dict if spec is not None else getattr(trainer, "_paper", {}) or {}
    trainer_name = getattr(trainer, "_name", None) or type(trainer).__name__
    method = f"Trained with hf-align's `{type(trainer).__name__}` ({trainer_name})"
    if paper.get("id"):
        method += f", the method of [{paper['title']}](https://huggingface.co/papers/{paper['id']})"
    if spec is not None:
        method += f". {spec.summary.rstrip('.')} (`hf-align {spec.name}`)"
    out = Path(trainer.args.output_dir)
    repo = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id or f"./{out.name}"
    mask = getattr(trainer, "neuron_mask", None)
    deltas_only = _deltas_only(trainer)
    sections = []
    if mask is not None:
        plot = MASK_PLOT_FILE if folder and (Path(folder) / MASK_PLOT_FILE).exists() else None
        sections += mask_summary(mask, plot=plot)
    if hasattr(trainer, "card_sections"):
        sections += trainer.card_sections(repo)
    dataset_name = dataset_name or getattr(trainer, "card_dataset_name", None)
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    return build_model_card(
        title=model_name or out.name,
        method=method + ".",
        how_to_load=quick_start(trainer, repo, base, spec, folder or trainer.args.output_dir),
        base_model=source,
        base_model_relation="adapter" if deltas_only else None,
        datasets=[dataset_name] if dataset_name else None,
        hyperparameters=card_hyperparameters(trainer, spec),
        citations=[
            *([paper["citation"]] if paper.get("citation") else []),
            *(["allo"] if mask is not None and "chen2024allo" not in paper.get("citation", "") else []),
        ],
        tags=[
            *(spec.tags if spec is not None else getattr(trainer, "_tag_names", [])),
            *(["neuron-deltas"] if deltas_only else []),
            *extra_tags,
        ],
        library_name="hf-align"
        if deltas_only or (spec is not None and spec.name == "warmup-dpo")
        else getattr(trainer, "card_library_name", "transformers"),
        needs=(
            f"the base model ({f'`{base}`' if base else 'the one it was trained from'}) and `pip install hf-align`: "
            "the repo holds the trained deltas and their neuron mask, no full weights."
            if deltas_only
            else None
        ),
        sections=sections,
        tracking=tracking_links(),
    )


def write_card_for(trainer, folder=None, spec=None, model_name=None, dataset_name=None, tags=None) -> Path:
    """Write :func:`model_card_for` as ``folder/README.md`` (default ``args.output_dir``); returns its path."""
    from hf_align.hub import write_model_card

    folder = folder or trainer.args.output_dir
    card = model_card_for(trainer, model_name, dataset_name, tags, folder=folder, spec=spec)
    return write_model_card(card, folder)
