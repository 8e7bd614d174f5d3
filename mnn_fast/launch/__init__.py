"""Launchers: specialists train independently, so their training fans out. ``local``: worker
processes on this machine (``mnn-fast train --workers N``), the embedded default."""
from .local import CRASH_ONCE_ENV, run_jobs

__all__ = ["run_jobs", "CRASH_ONCE_ENV"]
