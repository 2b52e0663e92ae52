"""Every relative link in the README and docs/ resolves inside the repository, and no user-facing
page sends a reader outside it (to ../shared, which a clone does not have)."""

import re
from pathlib import Path

from conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "RESULTS.md"]


def test_relative_links_resolve():
    broken = []
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_no_citation_leaves_the_repository():
    cited = [f"{p.relative_to(REPO)}" for p in [*pages(), *(REPO / "popo_core").rglob("*.py"), *(REPO / "popo_cli").rglob("*.py")]
             if "../shared" in p.read_text()]
    assert not cited, cited
    assert (REPO / "docs" / "METHOD.md").exists() and (REPO / "docs" / "PITFALLS.md").exists()


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](missing.md) [web](https://example.org)")
    found = [t for t in LINK.findall(page.read_text()) if "://" not in t and not (page.parent / t).exists()]
    assert found == ["missing.md"]


SECTION = re.compile(r"METHOD\.md,? (?:\(?sections? |s)(\d)(?:(?:-| and )(\d))?")
NAMED = re.compile(r"METHOD\.md,? \(?\"?((?:Setting|Baseline|Ablation|Rollout correction|The sign-separated|Names|Paper scale|Code map)\w*)")


def _cited_files():
    roots = ["popo_core", "popo_cli", "experiments", "benchmarks", "tests", "docs"]
    files = [REPO / "README.md", REPO / "Makefile"]
    for root in roots:
        files += [p for p in (REPO / root).rglob("*") if p.suffix in (".py", ".md", ".yaml") and p.is_file()]
    return [f for f in files if f != Path(__file__)]


def test_every_method_citation_names_a_section_that_exists():
    """`METHOD.md section 2`, `METHOD.md s3`, `METHOD.md, "Rollout correction"`: each names a heading
    of docs/METHOD.md."""
    headings = [ln.lstrip("# ") for ln in (REPO / "docs" / "METHOD.md").read_text().splitlines() if ln.startswith("## ")]
    numbered = {h.split(".", 1)[0] for h in headings if h[:1].isdigit()}
    missing, seen = [], 0
    for path in _cited_files():
        text = path.read_text(errors="ignore")
        for first, last in SECTION.findall(text):
            seen += 1
            for n in range(int(first), int(last or first) + 1):
                if str(n) not in numbered:
                    missing.append(f"{path.relative_to(REPO)}: section {n}")
        for name in NAMED.findall(text):
            seen += 1
            if not any(h.startswith(name) or name in h for h in headings):
                missing.append(f"{path.relative_to(REPO)}: {name!r}")
    assert seen > 30, "the patterns no longer find the citations"
    assert not missing, missing


def test_every_pitfalls_citation_points_at_the_repository_copy():
    """Code and docs cite PITFALLS.md by name; the file they mean is docs/PITFALLS.md, and it holds
    the two measured sections the code relies on."""
    text = (REPO / "docs" / "PITFALLS.md").read_text()
    for heading in ("vLLM on CPU", "FSDP2 on CPU", "Tokenizer swap", "math-verify timeouts"):
        assert f"### {heading}" in text, heading
    assert any("PITFALLS.md" in p.read_text(errors="ignore") for p in _cited_files() if p.suffix == ".py")


def test_the_citation_check_sees_a_missing_section():
    assert SECTION.findall("see METHOD.md section 7 and METHOD.md s2") == [("7", ""), ("2", "")]
    assert NAMED.findall('METHOD.md, "Rollout correction"') == ["Rollout correction"]
