"""Serving: a trained MNN as one AOTInductor package (``.pt2``) that runs without the Python model.

export: ``torch.export`` with a dynamic batch (1..max batch), AOTInductor compiles the graph to a
shared library, and the package carries a record (mnn_fast version, the run's fingerprint, classes,
input shape, threshold). load: the record and the zip are checked before the compiled code is loaded.
"""
from .export import DEFAULT_MAX_BATCH, export_mnn, export_run
from .load import ExportedMNN, load_exported
from .record import read_record, run_fingerprint

__all__ = ["export_mnn", "export_run", "load_exported", "ExportedMNN", "read_record", "run_fingerprint",
           "DEFAULT_MAX_BATCH"]
