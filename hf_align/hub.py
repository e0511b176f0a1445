"""Model cards and Hub uploads for what hf-align produces: neuron masks, delta checkpoints, merged models.

Trainers push through TRL/transformers' own ``push_to_hub`` (their cards carry our ``_tag_names`` and ``_paper``);
this module covers the artefacts no trainer owns. Cards are ``huggingface_hub.ModelCard`` objects with YAML
metadata (``library_name``, ``base_model``, ``datasets``, ``tags``) and sections: method, base model, data,
hyperparameters, how to load, citation.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from hf_align.citations import CITATIONS
from hf_align.io import PathLike, atomic_file


__all__ = [
    "CITATIONS",
    "build_model_card",
    "hub_id",
    "merge_model_card",
    "mask_summary",
    "push_folder",
    "push_neuron_mask",
    "write_model_card",
]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub id of a model, never a local path.

    ``name_or_path`` itself when it is no local folder and reads as an id (``org/name``); a Hub cache snapshot
    (``…/models--org--name/snapshots/<rev>``) gives ``org/name``; another local folder gives the ``base_model`` of
    its own model card when it has one (a model hf-align or TRL trained from a Hub model); else ``None``.
    """
    if not name_or_path:
        return None
    text = str(name_or_path)
    folder = Path(text)
    if not folder.is_dir():
        return text if _HUB_ID.match(text) and not text.startswith((".", "/")) else None
    cached = _CACHE_SNAPSHOT.search(folder.resolve().as_posix())
    if cached:
        return f"{cached['org']}/{cached['name']}"
    readme = folder / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            base = ModelCard.load(readme).data.base_model
        except Exception:  # a README that is no model card: nothing to learn from it
            return None
        base = base[0] if isinstance(base, list) and base else base
        return base if isinstance(base, str) and _HUB_ID.match(base) else None
    return None


def mask_summary(mask, plot: str | None = None) -> list[str]:
    """Markdown lines that say what a ``NeuronMask`` trains: granularity, ratio, counts, the fraction per layer;
    ``plot``: the mask plot's file name next to the card (``mask_plot.png``), shown as an image."""
    lines = [
        "## Neuron mask",
        "",
        f"- granularity: `{mask.granularity}` ({'output features' if mask.granularity == 'row' else 'entries'})",
        f"- selected: {mask.num_selected} of {mask.num_total} ({mask.ratio:.4%})",
        *(
            [f"- weights trained: {mask.num_params_selected} of {mask.num_params_total} ({mask.param_ratio:.4%})"]
            if mask.granularity == "row" and mask.param_ratio is not None
            else []
        ),
        *([f"- ratio counted in: {mask.info['budget']}"] if mask.info.get("budget") else []),
        "",
        *([f"![Neurons trained per layer and module]({plot})", ""] if plot else []),
        "| layer | module | selected fraction |",
        "|---|---|---|",
    ]
    from hf_align.plots import module_order

    fractions = mask.per_layer_fraction()
    rank = {m: i for i, m in enumerate(module_order(module for _, module in fractions))}
    order = sorted(fractions.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, rank[kv[0][1]]))
    lines += [
        f"| {'other' if layer is None else layer} | {module} | {fraction:.4f} |" for (layer, module), fraction in order
    ]
    return [*lines, ""]


def build_model_card(
    title: str,
    method: str,
    how_to_load: str,
    base_model: str | list[str] | None = None,
    datasets: list[str] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    citations: list[str] | None = None,
    tags: list[str] | None = None,
    library_name: str = "transformers",
    sections: list[str] | None = None,
    base_model_relation: str | None = None,
):
    """A ``huggingface_hub.ModelCard`` with hf-align's metadata and sections (unknown citation keys are an error).

    ``base_model`` goes through :func:`hub_id`: a local path never reaches the card. ``sections``: extra
    Markdown lines (e.g. :func:`mask_summary`) placed before "How to load".
    """
    from huggingface_hub import ModelCard, ModelCardData

    unknown = sorted(c for c in set(citations or []) - set(CITATIONS) if not c.lstrip().startswith("@"))
    if unknown:
        raise ValueError(f"Unknown citation key(s) {unknown}; known: {sorted(CITATIONS)} (or a BibTeX entry).")
    ids = list(
        dict.fromkeys(i for i in map(hub_id, base_model if isinstance(base_model, list) else [base_model]) if i)
    )
    extra = {"base_model_relation": base_model_relation} if base_model_relation and ids else {}
    data = ModelCardData(
        library_name=library_name,
        base_model=(ids if isinstance(base_model, list) else ids[0]) if ids else None,
        datasets=datasets or None,
        tags=list(dict.fromkeys(["hf-align", *(tags or [])])),
        **extra,
    )
    lines = [f"# {title}", "", method, ""]
    if ids:
        links = ", ".join(f"[`{i}`](https://huggingface.co/{i})" for i in ids)
        lines += [f"**Base model{'s' if len(ids) > 1 else ''}:** {links}", ""]
    if datasets:
        lines += ["**Data:** " + ", ".join(f"`{d}`" for d in datasets), ""]
    if hyperparameters:
        lines += ["## Hyperparameters", "", "| name | value |", "|---|---|"]
        lines += [f"| {key} | `{value}` |" for key, value in sorted(hyperparameters.items())] + [""]
    lines += list(sections or [])
    lines += ["## How to load", "", "```python", how_to_load.strip(), "```", ""]
    lines += ["Made with [hf-align](https://github.com/hf-align/hf-align).", ""]
    if citations:
        lines += ["## Citation", "", "```bibtex", *(CITATIONS.get(c, c) for c in citations), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def merge_model_card(base: str, aligned: str, plan, repo: str | None = None):
    """The card of an AMA merge: both inputs as Hub ids when known (a local path never), α per tensor group."""
    from collections import Counter

    groups = Counter((plan.groups.get(name, "other"), alpha) for name, alpha in plan.alphas.items())
    lines = ["## α per tensor group", "", "| group | α | tensors |", "|---|---|---|"]
    lines += [f"| {group} | {alpha:g} | {count} |" for (group, alpha), count in sorted(groups.items())] + [""]
    name = hub_id(aligned) or Path(str(aligned)).name
    target = repo or "<this folder>"
    return build_model_card(
        title=f"AMA merge of {name}",
        method=(
            "Model averaging (AMA): θ = α·θ_base + (1−α)·θ_aligned, α weighing the pre-alignment model, streamed "
            f"tensor by tensor by hf-align ({plan.description}). The full per-tensor plan is in merge_plan.json."
        ),
        how_to_load=f'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{target}")',
        base_model=[aligned, base],
        base_model_relation="merge",
        hyperparameters={"base": hub_id(base) or Path(str(base)).name, "aligned": name, "plan": plan.description},
        citations=["ama"],
        tags=["merge", "ama"],
        sections=lines,
    )


def write_model_card(card, folder: PathLike) -> Path:
    """Write ``card`` as ``folder/README.md`` (atomically: a half-written card is never left behind)."""
    path = Path(folder) / "README.md"
    with atomic_file(path, "w") as handle:
        handle.write(str(card))
    return path


def push_folder(
    folder: PathLike,
    repo_id: str,
    card=None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with hf-align",
    api=None,
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder`` (with ``card`` written as its README.md)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Nothing to push: {str(folder)!r} is not a directory.")
    api = api or HfApi(token=token)
    if card is not None:
        write_model_card(card, folder)
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token)


def push_neuron_mask(
    mask,
    repo_id: str,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    api=None,
) -> Any:
    """Upload a ``NeuronMask`` alone (``neuron_mask.safetensors`` + ``neuron_mask.json`` + a card)."""
    info = {k: v for k, v in mask.info.items() if isinstance(v, str | int | float | bool)}
    card = build_model_card(
        title=f"Neuron mask ({mask.granularity}, {mask.ratio:.2%} of {mask.num_total} neurons)",
        method=(
            "A neuron mask from hf-align: the parameter entries (element granularity) or output rows (row "
            "granularity) that an ALLO stage trains. Bit-packed safetensors plus a JSON header; no pickle."
        ),
        how_to_load=(
            "from huggingface_hub import snapshot_download\nfrom hf_align.masks import NeuronMask\n\n"
            f'mask = NeuronMask.load(snapshot_download("{repo_id}"))'
        ),
        base_model=base_model,
        hyperparameters={**info, "num_selected": mask.num_selected, "num_total": mask.num_total},
        citations=["allo"],
        sections=mask_summary(mask),
        tags=["neuron-mask", "allo"],
        library_name="hf-align",
    )
    with tempfile.TemporaryDirectory() as tmp:
        mask.save(tmp)
        return push_folder(tmp, repo_id, card, private=private, token=token, api=api)
