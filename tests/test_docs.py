"""Every code block in the README and docs/ runs as written, on data the blocks make themselves.

``python`` blocks execute in order, in one namespace per page, from an empty working directory
(sybil). ``bash`` blocks are checked, not run (they train for minutes): every ``mnn-fast`` line must
parse with the real command-line parser, every ``make`` line must name a Makefile target, and no
other command may appear. A fence of any other language would be a block nobody checks, so it is
refused. The site itself builds with warnings as errors in ``make docs``, which ``make test`` runs.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.myst import CodeBlockParser, PythonCodeBlockParser

from mnn_fast.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# docs/figures/*.md are generated result tables; docs/generated and docs/_build are Sphinx output.
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md")
                                      if not {"figures", "generated", "_build"} & set(p.relative_to(ROOT / "docs").parts))
CHECKED = {"python", "bash"}
# text: program output; the braced ones are MyST directives (maths, the toctree, generated API pages).
UNCHECKED = {"text", "{math}", "{toctree}", "{eval-rst}", "{include}"}
FENCE = re.compile(r"^(`{3,})(\S*)")


def _fence_languages(text: str) -> list[str]:
    """The info string of every opening fence, in order ("" for a block with none)."""
    languages, open_fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if not m:
            continue
        if open_fence is None:
            open_fence = m.group(1)
            languages.append(m.group(2))
        elif m.group(1) == open_fence and not m.group(2):
            open_fence = None
    return languages


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def _check_command(line: str, targets: set[str]) -> None:
    words = shlex.split(line, comments=True)
    if not words:
        return
    if words[0] == "mnn-fast":
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                build_parser().parse_args(words[1:])
        except SystemExit as exc:
            raise AssertionError(f"`{line}` does not parse: {err.getvalue().strip()}") from exc
    elif words[0] == "make":
        unknown = [w for w in words[1:] if "=" not in w and w not in targets]
        assert not unknown, f"`{line}`: no Makefile target {unknown}"
    else:
        assert words[:2] == ["pip", "install"], f"`{line}`: a command the docs check cannot vouch for"


def _check_shell_block(example) -> None:
    targets = _make_targets()
    for line in example.parsed.splitlines():
        _check_command(line, targets)


SYBIL = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser("bash", _check_shell_block)])


def test_fences_are_read_as_blocks():
    # A block with no language is refused like any unchecked one; a closing fence opens nothing.
    assert _fence_languages("```python\nx = 1\n```\n\n```\nplain\n```\n````{eval-rst}\n```\n````\n") == [
        "python", "", "{eval-rst}"]


def test_the_pages_exist():
    # The README and the site's main pages: a rename must not silently shrink what is checked.
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/installation.md", "docs/inference.md", "docs/training.md",
            "docs/how-it-works.md", "docs/benchmarks.md", "docs/gpu.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_code_block_runs(page, tmp_path, monkeypatch):
    languages = _fence_languages(page.read_text())
    unknown = sorted(set(languages) - CHECKED - UNCHECKED)
    assert not unknown, f"{page.name}: code blocks in {unknown} are neither run nor checked"
    monkeypatch.chdir(tmp_path)  # what a block writes lands here
    examples = list(SYBIL.parse(page))
    # Every python/bash fence became an example: none was skipped by a parse mismatch.
    assert len(examples) == sum(lang in CHECKED for lang in languages)
    for example in examples:
        example.evaluate()


@pytest.mark.parametrize("line", ["mnn-fast train runs/x --no-such-option", "mnn-fast nosuchcommand",
                                  "make no-such-target", "rm -rf runs"])
def test_the_shell_check_refuses_what_does_not_exist(line):
    with pytest.raises(AssertionError):
        _check_command(line, _make_targets())
