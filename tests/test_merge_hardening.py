"""Files a merge reads from a model folder (issue #18): index entries, side-file symlinks, safetensors headers, and
the temporary files of killed runs. Every refusal is a ValueError naming the file, before anything is written."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_align.merging import merge_models, streaming


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base (one file) and aligned model (sharded, with a tokenizer)."""
    from hf_align.testbed import load_random_tiny, load_tokenizer

    root = tmp_path_factory.mktemp("models")
    kwargs = dict(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32)
    load_random_tiny("llama", seed=0, **kwargs).save_pretrained(root / "base")
    load_random_tiny("llama", seed=1, **kwargs).save_pretrained(root / "aligned", max_shard_size="20KB")
    load_tokenizer().save_pretrained(root / "aligned")
    assert (root / "aligned" / "model.safetensors.index.json").exists()
    return root / "base", root / "aligned"


@pytest.fixture
def out_root(tmp_path):
    """An empty folder that receives the merge output: nothing may appear in it when a merge is refused."""
    root = tmp_path / "outputs"
    root.mkdir()
    return root


def _refused(base, aligned, out_root, *names):
    with pytest.raises(ValueError) as info:
        merge_models(base, aligned, out_root / "merged", alpha=0.5, progress=False)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    assert list(out_root.iterdir()) == []  # nothing written, not even a temporary folder
    return message


def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target, symlinks=True)
    return target


def _edit_index(folder, edit):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


# ------------------------------------------------------------------------------------------------ index entries


def test_index_entry_leaving_the_folder_is_refused(models, tmp_path, out_root):
    base, aligned = models
    other = _copy(base, tmp_path, "other")  # another model's weights, one folder up
    folder = _copy(aligned, tmp_path, "aligned")
    name = next(iter(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]))
    index = _edit_index(folder, lambda m: m.update({name: "../other/model.safetensors"}))
    _refused(base, folder, out_root, str(index), "../other/model.safetensors")
    _edit_index(folder, lambda m: m.update({name: str(other / "model.safetensors")}))  # absolute
    _refused(base, folder, out_root, str(index), str(other / "model.safetensors"))


def test_index_entry_symlinked_outside_the_folder_is_refused(models, tmp_path, out_root):
    base, aligned = models
    folder = _copy(aligned, tmp_path, "aligned")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shutil.copy(shard, tmp_path / "elsewhere.safetensors")
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    _refused(base, folder, out_root, str(folder / "model.safetensors.index.json"), shard.name)


# ------------------------------------------------------------------------------------------------ side files


def test_side_file_symlinked_outside_the_folder_is_refused(models, tmp_path, out_root):
    base, aligned = models
    secret = tmp_path / "secret.txt"
    secret.write_text("token=hf_secret")
    folder = _copy(aligned, tmp_path, "aligned")
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to(secret)
    _refused(base, folder, out_root, str(folder / "tokenizer_config.json"))


def test_hub_cache_snapshot_with_symlinks_into_blobs_merges(models, tmp_path, out_root):
    """The Hub cache stores a snapshot's files as symlinks into ``../../blobs``: that layout is accepted."""
    base, aligned = models
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(aligned.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    merge_models(base, snapshot, out_root / "merged", alpha=0.0, progress=False)
    merged = out_root / "merged"
    assert not any(p.is_symlink() for p in merged.iterdir())  # copies, not links into the cache
    assert (merged / "tokenizer_config.json").read_text() == (aligned / "tokenizer_config.json").read_text()
    expected = {}
    for file in aligned.glob("*.safetensors"):
        expected.update(load_file(file))
    result = load_file(merged / "model.safetensors")
    assert all(torch.equal(result[n], expected[n]) for n in expected)


# ------------------------------------------------------------------------------------------------ headers


def _raw(path, header, data=b"", length=None):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)


def _entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "absurd header length": dict(header={"w": _entry()}, data=bytes(16), length=2**62),
    "header length past the end": dict(header={"w": _entry()}, data=bytes(16), length=10_000),
    "missing dtype": dict(header={"w": {"shape": [2, 2], "data_offsets": [0, 16]}}, data=bytes(16)),
    "unknown dtype": dict(header={"w": _entry(dtype="F7")}, data=bytes(16)),
    "shape vs byte range": dict(header={"w": _entry(shape=(4, 4))}, data=bytes(16)),
    "offsets past the file": dict(header={"w": _entry(shape=(4, 4), offsets=(0, 64))}, data=bytes(16)),
    "overlapping tensors": dict(header={"a": _entry(), "b": _entry(offsets=(8, 24))}, data=bytes(24)),
    "negative shape": dict(header={"w": _entry(shape=(-2, -2))}, data=bytes(16)),
    "header not an object": dict(header=[1, 2], data=b""),
    "entry not an object": dict(header={"w": 3}, data=b""),
    "offsets not integers": dict(header={"w": _entry(offsets=("0", "16"))}, data=bytes(16)),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_safetensors_header_is_refused_naming_the_file(models, tmp_path, out_root, case):
    base, aligned = models
    folder = tmp_path / "aligned"
    folder.mkdir()
    shutil.copy(aligned / "config.json", folder / "config.json")
    _raw(folder / "model.safetensors", **BAD_HEADERS[case])
    with pytest.raises(ValueError, match="model.safetensors"):
        streaming.Checkpoint(folder)  # refused when the header is read, before any tensor is
    _refused(base, folder, out_root, str(folder / "model.safetensors"))


def test_a_valid_header_still_reads(tmp_path):
    tensors = {"a": torch.arange(4.0).reshape(2, 2), "b": torch.ones(3, dtype=torch.bfloat16), "e": torch.zeros(0)}
    save_file(tensors, tmp_path / "model.safetensors")
    with streaming.Checkpoint(tmp_path) as ckpt:
        assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())


def test_tensor_stored_in_two_shards_is_refused(models, tmp_path, out_root):
    base, aligned = models
    folder = _copy(aligned, tmp_path, "aligned")
    first, second = sorted(folder.glob("model-*.safetensors"))[:2]
    extra = next(iter(load_file(first).items()))
    save_file({**load_file(second), extra[0]: extra[1]}, second, metadata={"format": "pt"})
    _refused(base, folder, out_root, extra[0], second.name)


# ------------------------------------------------------------------------------------------------ killed runs

KILLED_MERGE = """
import os, signal, sys
from hf_align.merging import merge_models, streaming

original, calls = streaming.ShardWriter.write, [0]

def write(self, name, tensor):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, name, tensor)

streaming.ShardWriter.write = write
merge_models(sys.argv[1], sys.argv[2], sys.argv[3], alpha=0.5, max_shard_size="20KB", progress=False)
"""


def test_temporary_files_of_a_killed_merge_are_removed_by_the_next_run(models, out_root):
    base, aligned = models
    out = out_root / "merged"
    killed = subprocess.run([sys.executable, "-c", KILLED_MERGE, str(base), str(aligned), str(out)], env=os.environ)
    assert killed.returncode == -9
    stale = [p for p in out_root.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and list(stale[0].glob("*.safetensors"))  # the partial merge folder and its shard
    mine = out_root / f".merged.{os.getpid()}.abcdefgh.tmp"  # a live writer's (this process) temp: kept
    theirs = out_root / ".merged.notours.tmp"  # not a name our writer makes: kept
    mine.mkdir()
    theirs.write_text("user data")

    merge_models(base, aligned, out, alpha=0.5, progress=False)
    assert sorted(p.name for p in out_root.iterdir()) == sorted(["merged", mine.name, theirs.name])


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("which", ["base", "aligned"])
@pytest.mark.parametrize("relation", ["is", "contains"])
def test_python_merge_refuses_an_output_that_would_replace_an_input(models, tmp_path, which, relation):
    """merge_models(..., overwrite=True) into an input (or a folder holding it) swapped the merge in and deleted the
    user's model; only the commands refused it. Now the function refuses, naming both, and the input is intact."""
    base, aligned = _copy(models[0], tmp_path, "base"), _copy(models[1], tmp_path, "aligned")
    if relation == "contains":  # the output is a folder holding the input
        holder = tmp_path / "holder"
        holder.mkdir()
        moved = holder / which
        shutil.move(str(base if which == "base" else aligned), moved)
        base, aligned = (moved, aligned) if which == "base" else (base, moved)
        output = holder
    else:
        output = base if which == "base" else aligned
    target = base if which == "base" else aligned
    before = _snapshot(target)
    with pytest.raises(ValueError) as info:
        merge_models(base, aligned, output, alpha=0.5, progress=False, overwrite=True)
    message = str(info.value)
    assert "\n" not in message and str(output) in message and str(target) in message
    assert _snapshot(target) == before


def test_python_merge_may_write_inside_an_input_folder(models, tmp_path):
    """AMAMergeCallback writes `<run>/merged` beside the checkpoints it merges: a subfolder of an input is fine."""
    aligned = _copy(models[1], tmp_path, "aligned")
    before = _snapshot(aligned)
    merge_models(models[0], aligned, aligned / "merged", alpha=0.5, progress=False)
    assert (aligned / "merged" / "config.json").is_file()
    assert {k: v for k, v in _snapshot(aligned).items() if k.parts[0] != "merged"} == before
