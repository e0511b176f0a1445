"""Share any folder hf-align wrote: :func:`artifact_card` knows what a neuron mask, neuron scores (with the warm-up's
selected mask) and a feedback data pool are, and :func:`push_artifact` uploads the folder with that card.

Above the readers it loads (masks, scores, data pool) and :mod:`hf_align.hub`, which those readers' neighbours
import: the card builder itself stays free of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_align.hub import build_model_card, mask_summary, neuron_mask_card, push_folder, scores_quick_start
from hf_align.io import PathLike


__all__ = ["artifact_card", "push_artifact"]


def artifact_card(folder: PathLike, repo: str, base_model: str | None = None):
    """The card of a folder hf-align wrote that no trainer card covers: neuron scores (with the warm-up's
    ``neuron_mask/`` when present), a neuron mask, or a feedback data pool (at the top or in ``neuron_mask/`` /
    ``data_pool/``, the subfolders hf-align's runs write them to). ``None`` for anything else."""
    from hf_align.data_pool import POOL_META, DataPool
    from hf_align.masks import MASK_META_FILE, NeuronMask
    from hf_align.scores import META_FILE, load_scores

    folder = Path(folder)
    if (folder / META_FILE).is_file():
        scores, meta = load_scores(folder)
        mask_dir = folder / "neuron_mask"
        quick = scores_quick_start(repo, with_mask=(mask_dir / MASK_META_FILE).is_file())
        return build_model_card(
            title=f"Neuron scores ({len(scores)} tensors)",
            method=(
                "Neuron scores from hf-align (ALLO stage 1): how much each neuron moved while aligning. Select a mask "
                f"from them with `hf-align select-mask --neuron_scores_path {repo} --neuron_mask_ratio 0.1`, or "
                f"train with `--neuron_scores_path {repo}`."
            ),
            how_to_load=quick,
            base_model=base_model,
            hyperparameters={k: v for k, v in meta.items() if isinstance(v, str | int | float | bool)},
            citations=["allo"],
            sections=mask_summary(NeuronMask.load(mask_dir)) if (mask_dir / MASK_META_FILE).is_file() else None,
            tags=["neuron-scores", "allo"],
            library_name="hf-align",
            needs="`pip install hf-align` (scores hold no weights).",
        )
    for sub in ("", "neuron_mask"):  # a mask alone, or a run folder whose artifact is its neuron_mask/
        if (folder / sub / MASK_META_FILE).is_file():
            return neuron_mask_card(NeuronMask.load(folder / sub), f"{repo}/{sub}".rstrip("/"), base_model)
    for sub in ("", "data_pool"):
        if not (folder / sub / POOL_META).is_file():
            continue
        pool, repo = DataPool.load(folder / sub), f"{repo}/{sub}".rstrip("/")
        return build_model_card(
            title=f"Feedback data pool ({len(pool)} rows)",
            method=(
                "The data pool of hf-align's feedback-conditioned training (Quark / ALT): sampled completions with "
                "their rewards, quantile bins or feedback, as Parquet plus a JSON header."
            ),
            how_to_load=f'from hf_align.data_pool import DataPool\n\npool = DataPool.load("{repo}")\nprint(len(pool))',
            base_model=base_model,
            hyperparameters={k: v for k, v in pool.state_dict().items() if isinstance(v, str | int | float | bool)},
            citations=["quark", "alt"],
            tags=["data-pool", "quark", "alt"],
            library_name="hf-align",
            needs="`pip install hf-align`.",
        )
    return None


def push_artifact(
    folder: PathLike,
    repo_id: str,
    card=None,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    api=None,
) -> Any:
    """Upload ``folder`` to ``repo_id`` (:func:`hf_align.hub.push_folder`), with :func:`artifact_card` as its card
    unless ``card`` is given or the folder has one (``base_model``: the Hub id it belongs to)."""
    if card is None and not (Path(folder) / "README.md").exists():
        card = artifact_card(folder, repo_id, base_model=base_model)
    return push_folder(folder, repo_id, card, private=private, token=token, api=api, revision=revision)
