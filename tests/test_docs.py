"""The documentation lists what the one settings definition defines (so the two cannot drift)."""

from pathlib import Path

from lib_deltasampling.engine.settings import FIELDS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_engine_page_lists_every_setting_with_its_keys_and_default():
    page = (DOCS / "ENGINE.md").read_text(encoding="utf-8")
    for f in FIELDS:
        row = next((line for line in page.splitlines() if line.startswith(f"| `{f.name}` |")), None)
        assert row is not None, f"docs/ENGINE.md has no row for {f.name}"
        assert f"| {f.label} |" in row and f"`{f.infotext}`" in row, f.name
        assert (f.format(f.default) if f.default != "" else '""') in row, f.name
