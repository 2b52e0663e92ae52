"""preflight.output_dir: the create-and-remove check when another command makes the same folders."""

import os
from pathlib import Path

import pytest

from popo_core import preflight
from popo_core.errors import ConfigError


def test_a_folder_made_meanwhile_by_another_command_is_no_error_and_is_left_alone(tmp_path, monkeypatch):
    target = tmp_path / "sweeps" / "study"
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *args, **kwargs):
        if self == tmp_path / "sweeps" and not self.exists():
            os.mkdir(self)  # the other command wins the race
            raise FileExistsError(17, "File exists", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    preflight.output_dir(target)
    assert (tmp_path / "sweeps").is_dir()  # the other command's folder stays
    assert not target.exists()  # what this check made is gone


def test_an_uncreatable_directory_is_still_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        preflight.output_dir(tmp_path / "file" / "run")
    with pytest.raises(ConfigError, match="cannot create it"):
        preflight.output_dir("/proc/popo-preflight/run")  # a virtual file system: mkdir fails even as root


def test_a_parent_removed_by_a_concurrent_check_is_looked_at_again(tmp_path, monkeypatch):
    """Two commands checking sweeps/x at once: one removes `sweeps` (it made it) while the other is about
    to make `sweeps/x` inside it. The second looks again instead of failing with ENOENT."""
    from pathlib import Path

    from popo_core import preflight

    real, hits = Path.mkdir, []

    def racing_mkdir(self, *a, **k):
        if self.name == "x" and not hits:
            hits.append(self)
            self.parent.rmdir()  # the other check's clean-up
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    preflight.output_dir(tmp_path / "sweeps" / "x")
    assert hits and not (tmp_path / "sweeps").exists()
