"""hf_align.io: temporaries of killed writers are cleaned (only ours), paths read from a folder stay inside it."""

import subprocess
import sys

import pytest

from hf_align.io import atomic_dir, clean_stale_temps, resolve_inside, write_json


@pytest.fixture(scope="module")
def dead_pid():
    """The id of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path, dead_pid):
    stale = tmp_path / f".config.json.{dead_pid}.abcdefgh.tmp"
    stale.write_text('{"half": ')
    other = tmp_path / f".other.json.{dead_pid}.abcdefgh.tmp"  # another target's: not touched by this write
    other.write_text("x")
    write_json(tmp_path / "config.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", other.name])


def test_interrupted_swap_keeps_the_previous_output(tmp_path, dead_pid):
    """A kill between atomic_dir's two renames leaves the previous output in ``.old``: kept while the target is
    missing, removed once a later write has put a new target in place."""
    old = tmp_path / f".out.{dead_pid}.abcdefgh.old"
    (old / "previous").mkdir(parents=True)
    assert clean_stale_temps(tmp_path / "out") == []
    assert old.exists()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "file").write_text("new")
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "file").write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("entry", ["../x.safetensors", "/etc/passwd", "a/../../x", ""])
def test_resolve_inside_refuses_entries_leaving_the_folder(tmp_path, entry):
    index = tmp_path / "model.safetensors.index.json"
    with pytest.raises(ValueError, match="model.safetensors.index.json") as info:
        resolve_inside(tmp_path, entry, source=index)
    assert repr(entry) in str(info.value)


def test_resolve_inside_accepts_files_and_links_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("sub/a.json")
    assert resolve_inside(tmp_path, "sub/a.json") == tmp_path / "sub" / "a.json"
    assert resolve_inside(tmp_path, "link.json") == tmp_path / "link.json"


def test_scratch_dir_is_removed_on_exit_and_a_killed_runs_on_the_next_call(tmp_path, dead_pid):
    from hf_align.io import scratch_dir

    left = tmp_path / f".merged_adapter.{dead_pid}.abcdefgh.tmp"  # what a killed run left
    (left / "model.safetensors").parent.mkdir()
    (left / "model.safetensors").write_bytes(b"partial")
    with scratch_dir(tmp_path / "merged_adapter") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name]
    assert list(tmp_path.iterdir()) == []
