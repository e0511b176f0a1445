"""Model cards and Hub uploads for what hf-align produces: neuron masks, delta checkpoints, merged models.

Trainers push through TRL/transformers' own ``push_to_hub`` (their cards carry our ``_tag_names`` and ``_paper``);
this module covers the artefacts no trainer owns. Cards are ``huggingface_hub.ModelCard`` objects with YAML
metadata (``library_name``, ``base_model``, ``datasets``, ``tags``) and sections: method, base model, data,
hyperparameters, how to load, citation.
"""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path
from typing import Any

from hf_align.io import PathLike, atomic_file


__all__ = ["CITATIONS", "build_model_card", "push_folder", "push_neuron_mask"]

CITATIONS = {
    "allo": textwrap.dedent("""\
        @article{chen2024allo,
            title   = {{Learning to Align by Forgetting and Improving: ALLO, Low-Redundant Alignment}},
            author  = {Zhipeng Chen and Kun Zhou and Wayne Xin Zhao and Jingyuan Wang and Ji-Rong Wen},
            journal = {arXiv preprint arXiv:2406.12606},
            year    = {2024},
        }"""),
    "npo": textwrap.dedent("""\
        @article{zhang2024npo,
            title   = {{Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning}},
            author  = {Ruiqi Zhang and Licong Lin and Yu Bai and Song Mei},
            journal = {arXiv preprint arXiv:2404.05868},
            year    = {2024},
        }"""),
    "aligner": textwrap.dedent("""\
        @article{ziheng2023aligner,
            title   = {{Aligner: One Global Token is Worth Millions of Parameters When Aligning Large Language Models}},
            author  = {Zhou Ziheng and Yingnian Wu and Song-Chun Zhu and Demetri Terzopoulos},
            journal = {arXiv preprint arXiv:2312.05503},
            year    = {2023},
        }"""),
    "ama": textwrap.dedent("""\
        @article{lin2023ama,
            title   = {{Mitigating the Alignment Tax of RLHF}},
            author  = {Yong Lin and Hangyu Lin and Wei Xiong and Shizhe Diao and others},
            journal = {arXiv preprint arXiv:2309.06256},
            year    = {2023},
        }"""),
}


def build_model_card(
    title: str,
    method: str,
    how_to_load: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    citations: list[str] | None = None,
    tags: list[str] | None = None,
    library_name: str = "transformers",
):
    """A ``huggingface_hub.ModelCard`` with hf-align's metadata and sections (unknown citation keys are an error)."""
    from huggingface_hub import ModelCard, ModelCardData

    unknown = sorted(set(citations or []) - set(CITATIONS))
    if unknown:
        raise ValueError(f"Unknown citation key(s) {unknown}; known: {sorted(CITATIONS)}.")
    data = ModelCardData(
        library_name=library_name,
        base_model=base_model,
        datasets=datasets or None,
        tags=["hf-align", *(tags or [])],
    )
    lines = [f"# {title}", "", method, ""]
    if base_model:
        lines += [f"**Base model:** `{base_model}`", ""]
    if datasets:
        lines += ["**Data:** " + ", ".join(f"`{d}`" for d in datasets), ""]
    if hyperparameters:
        lines += ["## Hyperparameters", "", "| name | value |", "|---|---|"]
        lines += [f"| {key} | `{value}` |" for key, value in sorted(hyperparameters.items())] + [""]
    lines += ["## How to load", "", "```python", how_to_load.strip(), "```", ""]
    lines += ["Made with [hf-align](https://github.com/hf-align/hf-align).", ""]
    if citations:
        lines += ["## Citation", "", "```bibtex", *(CITATIONS[key] for key in citations), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


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
        with atomic_file(folder / "README.md", "w") as handle:
            handle.write(str(card))
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
        tags=["neuron-mask", "allo"],
        library_name="hf-align",
    )
    with tempfile.TemporaryDirectory() as tmp:
        mask.save(tmp)
        return push_folder(tmp, repo_id, card, private=private, token=token, api=api)
