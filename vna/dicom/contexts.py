"""Presentation contexts of the association server: which storage SOP classes it accepts, and how."""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt, register_uid
from pynetdicom.presentation import PresentationContext
from pynetdicom import sop_class
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import SOPClass, uid_to_service_class

__all__ = ["RETIRED_STORAGE_CLASSES", "UnknownStorage", "other_service_classes", "register_retired_storage",
           "storage_classes", "storage_context", "storage_syntaxes"]

log = logging.getLogger(__name__)

# Retired storage SOP classes (PS3.6 Table A-1) that pynetdicom does not list; legacy archives hold them.
RETIRED_STORAGE_CLASSES: tuple[UID, ...] = tuple(UID(u) for u in (
    "1.2.840.10008.5.1.1.27",           # Stored Print Storage
    "1.2.840.10008.5.1.1.29",           # Hardcopy Grayscale Image Storage
    "1.2.840.10008.5.1.1.30",           # Hardcopy Color Image Storage
    "1.2.840.10008.5.1.4.1.1.3",        # Ultrasound Multi-frame Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.5",        # Nuclear Medicine Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.6",        # Ultrasound Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.8",        # Standalone Overlay Storage
    "1.2.840.10008.5.1.4.1.1.9",        # Standalone Curve Storage
    "1.2.840.10008.5.1.4.1.1.9.1",      # Waveform Storage - Trial
    "1.2.840.10008.5.1.4.1.1.10",       # Standalone Modality LUT Storage
    "1.2.840.10008.5.1.4.1.1.11",       # Standalone VOI LUT Storage
    "1.2.840.10008.5.1.4.1.1.12.3",     # X-Ray Angiographic Bi-Plane Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1",     # VL Image Storage - Trial
    "1.2.840.10008.5.1.4.1.1.77.2",     # VL Multi-frame Image Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.1",     # Text SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.2",     # Audio SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.3",     # Detail SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.4",     # Comprehensive SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.129",      # Standalone PET Curve Storage
    "1.2.840.10008.5.1.4.34.1",         # RT Beams Delivery Instruction Storage - Trial
))

MAX_UNKNOWN_CLASSES = 1024  # distinct unknown SOP classes registered per process (each one is kept for good)
_unknown_lock = threading.Lock()
_unknown_registered: set[str] = set()


def register_retired_storage() -> None:
    """Register RETIRED_STORAGE_CLASSES with pynetdicom's Storage service (``register_uid``); idempotent."""
    for uid in RETIRED_STORAGE_CLASSES:
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, uid.keyword, StorageServiceClass)


def storage_classes() -> list[UID]:
    """Every storage SOP class accepted by name: pynetdicom's list and RETIRED_STORAGE_CLASSES."""
    return [UID(str(cx.abstract_syntax)) for cx in AllStoragePresentationContexts] + list(RETIRED_STORAGE_CLASSES)


def storage_syntaxes() -> list[UID]:
    """Transfer syntaxes of a storage context: every one pynetdicom knows, explicit VR little endian first.

    pynetdicom accepts the first of *our* syntaxes that the peer proposed.
    """
    return [ExplicitVRLittleEndian] + [UID(ts) for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian]


def storage_context(uid: str, syntaxes: list[UID]) -> PresentationContext:
    """A supported storage context, both roles allowed (C-STORE in, and C-GET sub-operations out)."""
    cx = PresentationContext()
    cx.abstract_syntax = UID(uid)
    cx.transfer_syntax = list(syntaxes)
    cx.scu_role = True
    cx.scp_role = True
    return cx


def other_service_classes() -> list[str]:
    """The SOP classes pynetdicom knows for a service other than Storage (query, worklist, print ...):
    never accepted as unknown storage classes. Sorted."""
    known = {str(v) for v in vars(sop_class).values() if isinstance(v, SOPClass)}
    return sorted(u for u in known if uid_to_service_class(u) not in (ServiceClass, StorageServiceClass))


def _register_unknown(uid: UID) -> bool:
    """Make pynetdicom serve C-STOREs of ``uid`` with its Storage service; False once the cap is reached."""
    with _unknown_lock:
        if uid in _unknown_registered:
            return True
        if len(_unknown_registered) >= MAX_UNKNOWN_CLASSES:
            return False
        register_uid(uid, "VnaUnknownStorage_" + uid.replace(".", "_"), StorageServiceClass)
        _unknown_registered.add(uid)
        return True


class UnknownStorage:
    """``dicom.accept_unknown_storage_classes``: SOP classes that no pynetdicom service knows
    (private or newer than pynetdicom) are accepted as storage, per association.

    Bound to EVT_REQUESTED: before negotiation, each such proposed abstract
    syntax becomes a supported storage context of that association only. SOP
    classes pynetdicom knows for another service (query, worklist, print ...)
    are never turned into storage. At most MAX_UNKNOWN_CLASSES distinct ones per
    process; beyond that they are refused as by default.
    """

    def __init__(self, syntaxes: list[UID]) -> None:
        self.syntaxes = syntaxes

    def on_requested(self, event: evt.Event) -> None:
        assoc: Any = event.assoc
        supported: list[PresentationContext] = assoc.acceptor.supported_contexts
        known = {str(cx.abstract_syntax) for cx in supported}
        extra: list[PresentationContext] = []
        for rq in assoc.requestor.requested_contexts:
            uid = UID(str(rq.abstract_syntax))
            if uid in known or not uid.is_valid or uid_to_service_class(uid) not in (ServiceClass, StorageServiceClass):
                continue
            known.add(uid)
            if not _register_unknown(uid):
                log.warning("unknown SOP class %s from %s refused: %d unknown classes already accepted",
                            uid, assoc.requestor.ae_title, MAX_UNKNOWN_CLASSES)
                continue
            extra.append(storage_context(uid, self.syntaxes))
        if extra:
            log.info("association from %s: %d unknown SOP class(es) accepted as storage",
                     assoc.requestor.ae_title, len(extra))
            assoc.acceptor.supported_contexts = supported + extra
