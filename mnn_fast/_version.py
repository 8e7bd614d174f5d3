"""The package version: read by ``mnn_fast.__version__`` and, statically, by the build (pyproject.toml)."""
__version__ = "0.3.0"
