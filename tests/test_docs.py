"""The documentation stays true to the code: the config reference, the make targets, the layout, links."""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field

from tessera.config import RunConfig
from tessera.config.base import Section
from tessera.config.reference import _section_of, _table, render

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_config_reference_matches_the_models():
    assert (DOCS / "config-reference.md").read_text() == render(), \
        "docs/config-reference.md is out of date with tessera/config: run `make config-docs`"


def _keys(model: type[Section], path: str, seen: dict[type, str], out: set[str]) -> None:
    if model in seen:  # documented once, under its first path
        return
    seen[model] = path
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        out.add(key)
        child = _section_of(field.annotation)
        if child is not None:
            _keys(child, key + (".NAME" if "dict" in str(field.annotation) else ""), seen, out)


def test_config_reference_lists_every_key_once():
    keys: set[str] = set()
    _keys(RunConfig, "", {}, keys)
    text = render()
    rows = re.findall(r"^\| `([^`]+)` \|", text, re.M)
    assert set(rows) - {"TESSERA_DATA_ROOT", "TESSERA_RUNS_ROOT", "TESSERA_MODELS_ROOT", "TESSERA_SOURCE",
                        "RAY_ADDRESS"} == keys
    assert len(rows) == len(set(rows))
    assert "## stage2\n\nThe same keys as [stage1](#stage1)." in text
    assert "`stage1.optim.lr_per_256`" in text and "`model_sources.NAME.sha256`" in text


def test_descriptions_come_from_field_descriptions_then_comments_then_the_parent_class():
    class Base(Section):
        # Seconds to wait,
        # then give up.
        timeout: float = 1.0  # per try
        plain: int = 0

    class Child(Base):
        """A child section."""

        timeout: float = 2.0
        named: str = Field("x", description="From the Field.")  # not this comment

    rows = {row.split(" | ")[0].strip("| `"): row for row in _table(Child, "child")[2:]}
    assert rows["child.timeout"] == "| `child.timeout` | float | `2.0` | Seconds to wait, then give up. per try |"
    assert rows["child.plain"].endswith("| `0` |  |")
    assert rows["child.named"].endswith("| From the Field. |")


def test_every_make_target_is_in_the_readme():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):(?!=)", makefile, re.M))
    assert {"demo", "test", "setup"} <= targets
    readme = README.read_text()
    missing = sorted(t for t in targets if f"`make {t}`" not in readme)
    assert not missing, f"README.md's make targets table lacks: {missing}"
    listed = set(re.findall(r"^\| `make ([\w-]+)`", readme, re.M))
    assert listed <= targets, f"README.md lists targets the Makefile lacks: {sorted(listed - targets)}"


def test_readme_is_an_entry_point_of_at_most_250_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    opening = "\n".join(lines[:20])
    assert "make demo" in opening and "make test" in opening


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_points_at_a_file_and_heading():
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(REPO)} -> {target} (no such heading)")
    assert not broken, broken


def test_the_layout_table_names_every_folder_and_nothing_else():
    readme = README.read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    for path in named:
        assert (REPO / path).exists(), f"the layout table names {path}, which does not exist"
    expected = {f"tessera/{p.name}/" for p in (REPO / "tessera").iterdir() if p.is_dir() and any(p.glob("*.py"))}
    expected |= {f"tessera/{name}" for name in ("cli.py", "submit.py", "status.py", "fetch_models.py")}
    expected |= {"infra/", "configs/", "bench/", "tests/", "docs/"}
    assert expected <= set(named), sorted(expected - set(named))
