"""What a user reads on a fresh clone: the paper is cited by title, authors and venue, never by a file
that only the developers' shared folder holds."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "krypton_fx").rglob("*.py"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_document_points_at_the_shared_folders_paper_file(path):
    text = path.read_text()
    assert "krypton-paper.txt" not in text and "shared folder" not in text, (
        f"{path.relative_to(ROOT)} points at a file a user does not have: cite the paper by title instead")


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "docs" / "design.md"], ids=lambda p: p.name)
def test_the_paper_is_cited_by_title_authors_and_venue(path):
    text = " ".join(path.read_text().split())
    for part in ("Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations",
                 "Nakandala", "Kumar", "Papakonstantinou", "SIGMOD 2019"):
        assert part in text, f"{path.name} does not cite the paper's {part!r}"
