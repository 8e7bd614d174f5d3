"""docs/benchmarks.md and the README's speed table are what bench/render_docs.py makes of the
committed benchmark JSON (docs/benchmarks/*.json): a number edited by hand, or results committed
without re-rendering, fails here."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "bench" / "render_docs.py")
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)


def test_the_benchmarks_page_is_rendered_from_the_committed_results():
    assert (ROOT / "docs" / "benchmarks.md").read_text() == render_docs.render(ROOT / "docs" / "benchmarks")


def test_the_readme_speed_table_is_rendered_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    block = render_docs.render_readme_speed(ROOT / "docs" / "benchmarks")
    assert render_docs.splice_readme(readme, block) == readme
    assert block.strip() and block.strip() in readme  # the markers are there and hold a table


def test_every_table_names_its_command_machine_and_commit():
    for name, table in render_docs.load_tables(ROOT / "docs" / "benchmarks").items():
        meta = table["meta"]
        for key in ("command", "commit", "cpu", "threads", "torch"):
            assert meta.get(key) not in (None, ""), f"{name}: meta lacks {key}"
