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


def test_bad_input_page_states_the_limits_the_code_enforces():
    from lib_deltasampling.engine.settings import field
    from lib_deltasampling.runner.cli import MAX_BATCH, MAX_CFG, MAX_SIZE, MAX_STEPS
    from lib_deltasampling.runtime.safetensors_header import MAX_HEADER_BYTES, MAX_JSON_DEPTH
    from lib_deltasampling.runtime.text.prompt import MAX_BRACKET_DEPTH, MAX_PROMPT_CHARS, MAX_PROMPT_CHUNKS

    page = " ".join((DOCS / "BAD-INPUT.md").read_text(encoding="utf-8").split())
    for text in (f"1-{MAX_STEPS}, 1-{MAX_BATCH}", f"64-{MAX_SIZE}", f"0-{MAX_CFG:g}", f"{MAX_HEADER_BYTES:,}",
                 f"<= {MAX_JSON_DEPTH} levels", f"{MAX_PROMPT_CHARS:,} characters, {MAX_PROMPT_CHUNKS} chunks",
                 f"| {MAX_BRACKET_DEPTH} levels"):
        assert text in page, text
    for name in ("scale", "source_cfg"):
        spec = field(name)
        assert f"{spec.minimum:g} to {spec.maximum:g}" in page, name
    assert f"whole number {field('reuse').minimum} to {field('reuse').maximum}" in page
