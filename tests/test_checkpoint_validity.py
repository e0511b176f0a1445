"""Complete means valid: one definition of a complete checkpoint (``trainer_state.json`` present, a JSON object, an
integer ``global_step`` equal to the N of ``checkpoint-N``), used by the CLI/pipeline helpers and by every
hf-align trainer's own ``train(resume_from_checkpoint=True)``."""

import json
import shutil

import pytest

from hf_align.checkpoints import (
    checkpoint_problem,
    is_complete_checkpoint,
    last_complete_checkpoint,
    resolve_resume_checkpoint,
)
from hf_align.errors import UserError


# every way trainer_state.json can be there and still not describe checkpoint-4; None: no file at all
BROKEN = {
    "missing": None,
    "empty": b"",
    "truncated": b'{"global_step": 4, "log_hist',
    "binary": b"\x80\x04\x95\x00",
    "not an object": b"[4]",
    "no global_step": b"{}",
    "string step": b'{"global_step": "many"}',
    "float step": b'{"global_step": 4.0}',
    "bool step": b'{"global_step": true}',
    "null step": b'{"global_step": null}',
    "other step": b'{"global_step": 3}',
}


def _checkpoint(folder, content):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if content is not None:
        (folder / "trainer_state.json").write_bytes(content)
    return folder


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_every_broken_state_is_incomplete_and_says_why(tmp_path, case):
    folder = _checkpoint(tmp_path / "checkpoint-4", BROKEN[case])
    problem = checkpoint_problem(folder)
    assert problem is not None and "trainer_state.json" in problem
    assert not is_complete_checkpoint(folder)


@pytest.mark.parametrize("name,step,complete", [("checkpoint-4", 4, True), ("checkpoint-04", 4, True),
                                                ("my-copy", 7, True), ("checkpoint-4", 5, False)])  # fmt: skip
def test_a_valid_state_is_complete_when_its_step_matches_the_folder(tmp_path, name, step, complete):
    folder = _checkpoint(tmp_path / name, json.dumps({"global_step": step}).encode())
    assert is_complete_checkpoint(folder) is complete


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_last_complete_checkpoint_skips_each_broken_one_with_a_warning(tmp_path, case):
    _checkpoint(tmp_path / "checkpoint-2", b'{"global_step": 2}')
    _checkpoint(tmp_path / "checkpoint-4", BROKEN[case])
    with pytest.warns(UserWarning, match="checkpoint-4"):
        assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    with pytest.warns(UserWarning):
        assert resolve_resume_checkpoint(True, tmp_path) == str(tmp_path / "checkpoint-2")


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_an_explicit_broken_checkpoint_is_refused_naming_it(tmp_path, case):
    folder = _checkpoint(tmp_path / "checkpoint-4", BROKEN[case])
    with pytest.raises(UserError, match=r"checkpoint-4.*incomplete.*trainer_state.json"):
        resolve_resume_checkpoint(str(folder), tmp_path)


# --------------------------------------------------------------------------------------------- trainers' train()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A masked NPO run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("ckpt")
    _npo(root / "out", 4).train()
    assert {p.name for p in (root / "out").glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return root / "out"


def _npo(output_dir, max_steps):
    from hf_align import testbed
    from hf_align.masks import NeuronMask
    from hf_align.trainers import NPOConfig, NPOTrainer

    args = NPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=max_steps, save_steps=2,
        save_strategy="steps", report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0,
        disable_tqdm=True, logging_steps=1, learning_rate=1e-3,
    )  # fmt: skip
    model = testbed.load_random_tiny("llama", hidden_size=32, num_layers=2)
    data = testbed.forget_dataset(8, seed=0)
    mask = NeuronMask.random(model, 0.25, "row", seed=3)  # deltas-off reference: no second model to load
    return NPOTrainer(
        model, args=args, train_dataset=data, processing_class=testbed.load_tokenizer(), neuron_mask=mask
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "no global_step", "string step", "other step"])
def test_trainer_resume_true_takes_the_last_complete_checkpoint(trained, tmp_path, case):
    """Before: transformers' get_last_checkpoint picked checkpoint-4 and the resume failed deep inside it."""
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    state = out / "checkpoint-4" / "trainer_state.json"
    state.unlink()
    if BROKEN[case] is not None:
        state.write_bytes(BROKEN[case])
    trainer = _npo(out, 4)
    steps = []
    trainer.add_callback(type("Count", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, s, control, **kw: steps.append(s.global_step)})())  # fmt: skip
    with pytest.warns(UserWarning, match="checkpoint-4"):
        trainer.train(resume_from_checkpoint=True)
    assert steps == [3, 4]  # resumed after step 2


@pytest.mark.slow
def test_trainer_refuses_an_explicit_incomplete_checkpoint(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="checkpoint-4"):
        _npo(out, 6).train(resume_from_checkpoint=str(out / "checkpoint-4"))
