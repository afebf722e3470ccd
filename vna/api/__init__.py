"""The gRPC API: ``server`` (thin servicers + the server), ``status`` (error -> gRPC code table),
``auth`` (bearer tokens and roles), ``client`` (a Python client helper), ``cli`` (``vna grpc ...``).

The protobuf/gRPC stubs in ``vna/api/_gen`` are generated from
``proto/vna/v1/archive.proto`` at install time, or on first use (``server``
and ``client`` call :func:`vna.api.codegen.ensure` before importing them) when
they are missing or older than the proto. Importing this package or
``vna.api.cli`` needs neither the stubs nor grpc.
"""

from __future__ import annotations

__all__: list[str] = []
