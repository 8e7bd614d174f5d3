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


def test_the_readme_times_convolutional_cells_from_the_in_turns_table(tmp_path):
    # Timed in separate tests, the loop and the module see different loads and the CNN cells' gap is
    # within the drift, so the README takes the in-turns medians; without that table, the separate rows.
    committed = ROOT / "docs" / "benchmarks"
    turns = render_docs.load_tables(committed)["end_to_end_interleaved"]
    resnet = next(r for r in turns["rows"] if r["model"] == "resnet20")
    block = render_docs.render_readme_speed(committed)
    assert "called in turns" in block
    assert f"{render_docs.ms(resnet['engine_sequential'])} ms (`sequential`) against the loop's " \
           f"{render_docs.ms(resnet['naive'])} ms" in block
    for path in committed.glob("*.json"):
        if path.stem != "end_to_end_interleaved":
            (tmp_path / path.name).write_text(path.read_text())
    separate = render_docs.render_readme_speed(tmp_path)
    assert "called in turns" not in separate and "convolutional specialists, same run" in separate
