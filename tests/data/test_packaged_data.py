"""The data that ships with popo: unchanged files, their provenance and terms, the names that
address them from any working directory, and the wheel that carries them."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from popo_core import resources
from popo_core.evaluation.suite import BENCHMARKS
from popo_core.config import ConfigError, compose, config_dir, presets
from popo_core.data.datasets import load_problems
from popo_core.errors import DataError

PROVENANCE = resources.BENCH_DIR / "PROVENANCE.md"
NOTICE = resources.BENCH_DIR / "NOTICE"
SHIPPED = [*resources.PACKAGED.values(), "PROVENANCE.md", "NOTICE"]


def _provenance_table() -> dict[str, tuple[str, int, str]]:
    """packaged name -> (file, rows, sha256) from PROVENANCE.md's first table."""
    rows = re.findall(r"^\| `(\w+)` \| (\S+) \| (\d+) \| `([0-9a-f]{64})` \|$", PROVENANCE.read_text(), re.M)
    return {name: (file, int(n), digest) for name, file, n, digest in rows}


def test_every_file_matches_its_provenance_checksum_and_format():
    table = _provenance_table()
    assert set(table) == set(resources.PACKAGED)
    for name, file in resources.PACKAGED.items():
        path = resources.packaged_path(name)
        assert path is not None and path.name == file == table[name][0]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == table[name][2], f"{file} changed: update PROVENANCE.md"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == table[name][1]
        assert all(set(r) == {"id", "problem", "answer", "source"} and all(isinstance(v, str) for v in r.values())
                   for r in rows)
        assert all(r["answer"].strip() for r in rows) and len({r["id"] for r in rows}) == len(rows)


def test_the_benchmark_names_are_the_packaged_ones():
    assert set(BENCHMARKS) | {"math_l3to5"} == set(resources.PACKAGED)


def test_training_set_is_disjoint_from_math500():
    train = {p.problem for p in load_problems("math_l3to5")}
    held_out = {p.problem for p in load_problems("math500")}
    assert len(train) == 8520 and not train & held_out  # 8,521 rows, one problem text twice (PROVENANCE.md)


def test_notice_states_the_licence_decision():
    text = " ".join(NOTICE.read_text().split())
    for part in ("The benchmark files come from MIT-licensed repositories.",
                 "The training file is a selection from MATH (Hendrycks et al., MIT) whose selecting repository "
                 "has no licence file.",
                 "Problem texts keep their original copyright (AIME/AMC problems are the MAA's)"):
        assert part in text


# ------------------------------------------------------------------------------- packaged names
@pytest.mark.parametrize("preset", [p for p in presets() if p.startswith("qwen-math")])
def test_math_presets_find_their_data_from_any_working_directory(tmp_path, monkeypatch, preset):
    monkeypatch.chdir(tmp_path)
    cfg = compose(preset)  # validation checks that the data exists (what `popo train` does first)
    assert (cfg.data.path, cfg.data.eval_path) == ("math_l3to5", "math500")
    assert len(load_problems(cfg.data.path)) == 8521 and len(load_problems(cfg.data.eval_path)) == 500


def test_no_config_points_outside_the_repository():
    """Data comes from the package: no preset or group may name a path beside the checkout."""
    offenders = [str(f.relative_to(config_dir())) for f in config_dir().rglob("*.yaml") if "../" in f.read_text()]
    assert not offenders


def test_a_packaged_name_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math500").write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    assert len(load_problems("math500")) == 500
    assert len(load_problems("./math500")) == 1  # the local file, spelled as a path


def test_missing_package_data_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "BENCH_DIR", tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"^data.path=math_l3to5: the packaged copy .*absent.* is missing") as err:
        compose("qwen-math-7b")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="math500: the packaged copy .* is missing"):
        load_problems("math500")


def test_a_mistyped_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data.eval_path=math_500: file not found \(nor a packaged data set: .*math500"):
        compose("qwen-math-7b", ["data.eval_path=math_500"])
    with pytest.raises(DataError, match="math_500: file not found"):
        load_problems("math_500")


# ---------------------------------------------------------------------------------------- wheel
def _source_tree(dest: Path) -> Path:
    """What a clone holds (tracked and untracked-but-not-ignored files), copied to `dest`, so the
    build sees none of this checkout's build leftovers."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info"))
        return dest
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def test_the_wheel_contains_every_packaged_file(tmp_path):
    src = _source_tree(tmp_path / "src")
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("popo-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for file in SHIPPED:
            member = f"popo_core/resources/bench/{file}"
            assert member in names, member
            assert z.read(member) == (resources.BENCH_DIR / file).read_bytes()
        assert "popo_core/resources/__init__.py" in names
        assert {"experiments/data/math.yaml", "experiments/preset/qwen-math-7b.yaml"} <= names
