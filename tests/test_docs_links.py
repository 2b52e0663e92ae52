"""Every relative link in the README and docs/ resolves inside the repository, and no user-facing
page sends a reader outside it (to ../shared, which a clone does not have)."""

import re

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
