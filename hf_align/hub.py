"""Model cards and Hub uploads for what hf-align produces: neuron masks, delta checkpoints, merged models.

Trainers push through TRL/transformers' own ``push_to_hub`` (their cards carry our ``_tag_names`` and ``_paper``);
this module covers the artefacts no trainer owns. Cards are ``huggingface_hub.ModelCard`` objects with YAML
metadata (``library_name``, ``base_model``, ``datasets``, ``tags``) and sections: method, base model, data,
hyperparameters, how to load, citation.
"""

from __future__ import annotations

import re
import tempfile
import textwrap
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from hf_align.citations import CITATIONS
from hf_align.hub_download import _REPO_PATH, MODEL_FILE_PATTERNS, resolve_local, split_revision
from hf_align.io import PathLike, atomic_file


__all__ = [
    "CITATIONS",
    "MODEL_FILE_PATTERNS",
    "build_model_card",
    "hub_id",
    "merge_model_card",
    "mask_summary",
    "push_folder",
    "framework_versions",
    "neuron_mask_card",
    "public_value",
    "push_neuron_mask",
    "resolve_local",
    "scores_quick_start",
    "split_revision",
    "write_model_card",
]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def _gguf_info(name_or_path: str | None):
    """The checked header of the ``.gguf`` file ``name_or_path`` names (what a model loaded from one records as its
    ``name_or_path``), else ``None``."""
    from hf_align.gguf import gguf_file_of, read_gguf_info

    path = gguf_file_of(name_or_path) if name_or_path else None
    return read_gguf_info(path) if path is not None and path.is_file() else None


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub id of a model, never a local path.

    ``name_or_path`` itself when it is no local folder and reads as an id (``org/name``); a Hub cache snapshot
    (``…/models--org--name/snapshots/<rev>``) gives ``org/name``; another local folder gives the ``base_model`` of
    its own model card when it has one (a model hf-align or TRL trained from a Hub model); a ``.gguf`` file gives the
    Hub id its header states (:attr:`hf_align.gguf.GGUFInfo.hub_id`); else ``None``.
    """
    if not name_or_path:
        return None
    text = str(name_or_path)
    folder = Path(text)
    gguf = _gguf_info(text)
    if gguf is not None:  # a model loaded from a GGUF: what its header says
        return gguf.hub_id
    if not folder.is_dir():
        return text if _HUB_ID.match(text) and not text.startswith((".", "/")) else None
    cached = _CACHE_SNAPSHOT.search(folder.resolve().as_posix())
    if cached:
        return f"{cached['org']}/{cached['name']}"
    return card_base_model(folder)


def card_base_model(folder: str | Path) -> str | None:
    """The ``base_model`` a local folder's model card names (the first of a list), when it is a Hub id."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        base = ModelCard.load(readme).data.base_model
    except Exception:  # a README that is no model card: nothing to learn from it
        return None
    base = base[0] if isinstance(base, list) and base else base
    return base if isinstance(base, str) and _HUB_ID.match(base) else None


def mask_summary(mask, plot: str | None = None) -> list[str]:
    """Markdown lines that say what a ``NeuronMask`` trains: granularity, the fraction of rows *and* of weights
    (rows differ in length), one row per module type, the fraction per layer; ``plot``: the mask plot's file name
    next to the card (``mask_plot.png``), shown as an image."""
    from hf_align.plots import module_order

    sizes = mask.neuron_sizes or {}
    row = mask.granularity == "row"
    lines = [
        "### Neuron mask",
        "",
        f"- granularity: `{mask.granularity}` ({'output features' if row else 'entries'})",
        f"- {'rows' if row else 'entries'} selected: {mask.num_selected} of {mask.num_total} ({mask.ratio:.4%})",
        *(
            [f"- weights trained: {mask.num_params_selected} of {mask.num_params_total} ({mask.param_ratio:.4%})"]
            if row and mask.param_ratio is not None
            else []
        ),
        *([f"- ratio counted in: {mask.info['budget']}"] if mask.info.get("budget") else []),
        "",
        *([f"![Neurons trained per layer and module]({plot})", ""] if plot else []),
    ]
    per_module: dict[str, list[int]] = {}  # module type → [selected, total, weights selected, weights total]
    for name, selected in mask.masks.items():
        parts = name.split(".")
        counts = per_module.setdefault(parts[-2] if len(parts) > 1 else parts[-1], [0, 0, 0, 0])
        count, size = int(selected.sum()), sizes.get(name, 1) if row else 1
        counts[0], counts[1] = counts[0] + count, counts[1] + selected.numel()
        counts[2], counts[3] = counts[2] + count * size, counts[3] + selected.numel() * size
    weights = row and bool(sizes)  # rows differ in length across modules: where do the trained weights sit?
    trained = sum(counts[2] for counts in per_module.values())
    lines += [f"| module | selected | fraction{' | share of the trained weights' if weights else ''} |"]
    lines += ["|---|---|---|" + ("---|" if weights else "")]
    for module in module_order(per_module):
        sel, total, wsel, _ = per_module[module]
        share = f" {wsel / max(trained, 1):.4f} |" if weights else ""
        lines += [f"| {module} | {sel} / {total} | {sel / max(total, 1):.4f} |{share}"]
    lines += ["", "| layer | module | selected fraction |", "|---|---|---|"]
    fractions = mask.per_layer_fraction()
    rank = {m: i for i, m in enumerate(module_order(module for _, module in fractions))}
    order = sorted(fractions.items(), key=lambda kv: (kv[0][0] is None, kv[0][0] or 0, rank[kv[0][1]]))
    lines += [
        f"| {'other' if layer is None else layer} | {module} | {fraction:.4f} |" for (layer, module), fraction in order
    ]
    return [*lines, ""]


TRL_CITATION = textwrap.dedent("""\
    @software{vonwerra2020trl,
        title   = {{TRL: Transformers Reinforcement Learning}},
        author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallou{\\'e}dec, Quentin},
        license = {Apache-2.0},
        url     = {https://github.com/huggingface/trl},
        year    = {2020}
    }""")  # fmt: skip
"""TRL's own citation, as TRL's model cards give it (hf-align's trainers extend TRL's)."""
_FRAMEWORKS = {"hf-align": "hf-align", "TRL": "trl", "Transformers": "transformers", "PEFT": "peft",
               "PyTorch": "torch", "Datasets": "datasets", "Tokenizers": "tokenizers"}  # fmt: skip


def framework_versions() -> dict[str, str]:
    """The installed versions of the libraries an artifact was made with (TRL's "Framework versions")."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for label, package in _FRAMEWORKS.items():
        try:
            versions[label] = version(package)
        except PackageNotFoundError:
            if package == "hf-align":
                from hf_align import __version__

                versions[label] = __version__
    return versions


def public_value(value: Any) -> Any:
    """What a card may print for a setting: an enum's value (``cosine``, not ``SchedulerType.COSINE``), and for a
    local path its Hub id or, failing that, its last component — never the writer's path."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, list | tuple):
        return type(value)(public_value(v) for v in value)
    if isinstance(value, dict):
        return {key: public_value(v) for key, v in value.items()}
    if isinstance(value, PurePath) or (
        isinstance(value, str) and (value.startswith(("/", "~", "./", "../")) or Path(value).exists())
    ):
        return hub_id(str(value)) or Path(str(value)).name
    return value


def _dataset_link(name: str) -> str:
    return f"[{name}](https://huggingface.co/datasets/{name})" if _REPO_PATH.match(name) else f"`{name}`"


def _gguf_source(name_or_path: str | None) -> str | None:
    """The card line of a base loaded from a ``.gguf`` file (its file name and quantization), else ``None``."""
    from hf_align.gguf import gguf_source_line

    info = _gguf_info(name_or_path)
    return None if info is None else gguf_source_line(info)


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
    model_name: str | None = None,
    tracking: dict[str, str] | None = None,
    needs: str | None = None,
):
    """A ``huggingface_hub.ModelCard`` laid out as TRL's (model card, quick start, training procedure, framework
    versions, citations of the method and of TRL) with hf-align's sections.

    ``base_model``, ``datasets`` and every hyperparameter go through :func:`public_value`: a local path never
    reaches the card; a base that is a ``.gguf`` file gets a line naming the file and its quantization.
    ``how_to_load``: the quick start, Python that runs as written. ``sections``: extra Markdown lines (e.g.
    :func:`mask_summary`) in the training procedure. ``tracking``: ``{"Weights & Biases": url}`` links of the run.
    ``needs``: what loading requires beyond the files (e.g. the base model of a delta repo). Unknown citation keys
    are an error.
    """
    from huggingface_hub import ModelCard, ModelCardData

    unknown = sorted(c for c in set(citations or []) - set(CITATIONS) if not c.lstrip().startswith("@"))
    if unknown:
        raise ValueError(f"Unknown citation key(s) {unknown}; known: {sorted(CITATIONS)} (or a BibTeX entry).")
    sources = base_model if isinstance(base_model, list) else [base_model]
    ids = list(dict.fromkeys(i for i in map(hub_id, sources) if i))
    names = [str(public_value(d)) for d in datasets or []]
    extra = {"base_model_relation": base_model_relation} if base_model_relation and ids else {}
    data = ModelCardData(
        library_name=library_name,
        base_model=(ids if isinstance(base_model, list) else ids[0]) if ids else None,
        datasets=[n for n in names if _REPO_PATH.match(n)] or None,
        model_name=model_name or title,
        tags=list(dict.fromkeys(["hf-align", *(tags or [])])),
        **extra,
    )
    lines = [f"# Model Card for {model_name or title}", ""]
    if ids:
        links = ", ".join(f"[{i}](https://huggingface.co/{i})" for i in ids)
        on = f" on {', '.join(map(_dataset_link, names))}" if names else ""
        lines += [f"Base model{'s' if len(ids) > 1 else ''}: {links}{on}.", ""]
    elif names:
        lines += ["Data: " + ", ".join(map(_dataset_link, names)) + ".", ""]
    for line in filter(None, map(_gguf_source, sources)):
        lines += [line, ""]
    lines += [method, ""]
    if needs:
        lines += [f"**Needs:** {needs}", ""]
    lines += ["## Quick start", "", "```python", how_to_load.strip(), "```", "", "## Training procedure", ""]
    lines += [f"- [{label}]({url})" for label, url in (tracking or {}).items()] + ([""] if tracking else [])
    if hyperparameters:
        lines += ["### Hyperparameters", "", "| name | value |", "|---|---|"]
        rows = {key: public_value(value) for key, value in hyperparameters.items()}
        lines += [f"| {key} | `{value}` |" for key, value in sorted(rows.items())] + [""]
    lines += list(sections or [])
    lines += ["### Framework versions", ""]
    lines += [f"- {label}: {v}" for label, v in framework_versions().items()] + [""]
    lines += ["Made with [hf-align](https://github.com/hf-align/hf-align).", "", "## Citations", ""]
    if citations:
        lines += ["Cite the method as:", "", "```bibtex", *(CITATIONS.get(c, c) for c in citations), "```", ""]
    lines += ["Cite TRL as:", "", "```bibtex", TRL_CITATION, "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def merge_model_card(base: str, aligned: str, plan, repo: str | None = None):
    """The card of an AMA merge: both inputs as Hub ids when known (a local path never), α per tensor group."""
    from collections import Counter

    groups = Counter((plan.groups.get(name, "other"), alpha) for name, alpha in plan.alphas.items())
    lines = ["## α per tensor group", "", "| group | α | tensors |", "|---|---|---|"]
    lines += [f"| {group} | {alpha:g} | {count} |" for (group, alpha), count in sorted(groups.items())] + [""]
    name = hub_id(aligned) or Path(str(aligned)).name
    target = repo or "<this repo id or folder>"
    return build_model_card(
        title=f"AMA merge of {name}",
        method=(
            "Model averaging (AMA): θ = α·θ_base + (1−α)·θ_aligned, α weighing the pre-alignment model, streamed "
            f"tensor by tensor by hf-align ({plan.description}). The full per-tensor plan is in merge_plan.json."
        ),
        how_to_load=(
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{target}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{target}")'
        ),
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
    revision: str | None = None,
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder`` (with ``card`` written as its README.md);
    :func:`hf_align.artifacts.push_artifact` also writes the card of a mask, scores or data-pool folder."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Nothing to push: {str(folder)!r} is not a directory.")
    api = api or HfApi(token=token)
    if card is not None:
        write_model_card(card, folder)
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    at = {"revision": revision} if revision else {}
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token, **at
    )


def neuron_mask_card(mask, repo: str, base_model: str | None = None, plot: str | None = None):
    """The card of a ``NeuronMask`` on its own (``repo``: its Hub id or ``./folder``; ``plot``: the mask plot's file
    name beside the card, linked from it)."""
    info = {k: v for k, v in mask.info.items() if isinstance(v, str | int | float | bool)}
    return build_model_card(
        title=f"Neuron mask ({mask.granularity}, {mask.ratio:.2%} of {mask.num_total} neurons)",
        method=(
            "A neuron mask from hf-align: the parameter entries (element granularity) or output rows (row "
            "granularity) that an ALLO stage trains. Bit-packed safetensors plus a JSON header; no pickle. Train "
            f"with it: `--neuron_mask_path {repo}` (a Hub id may end in `@revision`)."
        ),
        how_to_load=f'from hf_align.masks import NeuronMask\n\nmask = NeuronMask.load("{repo}")\nprint(mask)',
        base_model=base_model,
        hyperparameters={**info, "num_selected": mask.num_selected, "num_total": mask.num_total},
        citations=["allo"],
        sections=mask_summary(mask, plot=plot),
        tags=["neuron-mask", "allo"],
        library_name="hf-align",
        needs="`pip install hf-align` (the mask holds no weights; it selects the neurons of the base model).",
    )


def scores_quick_start(repo: str, with_mask: bool = False) -> str:
    """Python that loads neuron scores (and the warm-up's selected mask, in ``neuron_mask/``) from ``repo``."""
    quick = f'from hf_align.scores import load_scores\n\nscores, meta = load_scores("{repo}")'
    if with_mask:
        quick += f'\n\nfrom hf_align.masks import NeuronMask\n\nmask = NeuronMask.load("{repo}/neuron_mask")'
    return quick


def push_neuron_mask(
    mask,
    repo_id: str,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    api=None,
) -> Any:
    """Upload a ``NeuronMask`` alone (``neuron_mask.safetensors`` + ``neuron_mask.json`` + a card); ``base_model``
    defaults to the one the mask knows (:meth:`NeuronMask.from_weight_diff` records its init's Hub id)."""
    base_model = base_model or mask.info.get("base_model")
    with tempfile.TemporaryDirectory() as tmp:
        mask.save(tmp)
        from hf_align.plots import mask_plot_for_card

        card = neuron_mask_card(mask, repo_id, base_model, plot=mask_plot_for_card(mask, tmp))
        return push_folder(tmp, repo_id, card, private, token, api=api)
