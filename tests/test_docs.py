"""The documentation against the code: generated pages up to date, and every shell command shown either run or
marked as not run here with its reason."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_current():
    assert _gen_docs().stale() == [], "docs/config.md or docs/cli.md is out of date: run `make docs`"


def test_config_page_covers_every_field():
    import dataclasses

    from tinylm.recipe import Recipe

    page = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(Recipe.__dataclass_fields__["train"].default_factory()):
        assert f"| `{f.name}` |" in page


def test_a_changed_docstring_makes_the_page_stale(monkeypatch):
    gen = _gen_docs()
    real = gen.field_docs
    monkeypatch.setattr(gen, "field_docs", lambda cls: {k: v + " (changed)" for k, v in real(cls).items()})
    assert gen.CONFIG_PAGE in gen.stale()
