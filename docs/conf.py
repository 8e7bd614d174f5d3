"""Sphinx configuration of the mnn_fast documentation (``make docs``: HTML, warnings are errors).

Offline by construction: no intersphinx inventories, and furo ships its own assets. The pages are
Markdown (myst-parser); the API reference is generated from the docstrings (autosummary) and the
command-line reference from the project's own argparse parser (sphinx-argparse).
"""
from mnn_fast import __version__

project = "mnn_fast"
author = "The mnn_fast authors"
copyright = "2026, The mnn_fast authors"
release = version = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinxarg.ext",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# docs/figures/*.md are generated tables that the experiment pages link to, not pages of their own.
exclude_patterns = ["_build", "figures/*.md", "Thumbs.db", ".DS_Store"]

autosummary_generate = True
# Each object is documented once, in the module that defines it: a package's re-exports (its __all__)
# would document it twice, and mnn_fast.engine.compile is both a module and the function it exports.
autodoc_default_options = {"members": True, "ignore-module-all": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"

# MathJax is loaded by the reader's browser from its CDN; the build itself fetches nothing.
html_theme = "furo"
html_title = f"mnn_fast {__version__}"
