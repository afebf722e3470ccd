"""The web front-end: DICOMweb (PS3.18) under ``/dicomweb`` and the OHIF viewer under ``/viewer/``.

Thin like ``vna/dicom`` and ``vna/api``: protocol <-> the Archive's services
(ingest, query, retrieve), errors mapped to HTTP in one table
(:mod:`vna.web.status`).
"""

from vna.web.server import WebServer

__all__ = ["WebServer"]
