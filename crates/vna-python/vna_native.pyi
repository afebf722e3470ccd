"""vna's native core (Rust): the DICOM listener, the pixel coders and the filesystem blob writer.

Imported only by ``vna.dicom.native``.
"""

from typing import Any, Callable, Optional, final

__all__ = ["BlobDir", "BlobWriter", "Listener", "Part10Scanner", "Request", "StoreRecord", "gray3_decode", "gray3_encode",
           "gray_decode", "gray_encode", "max_associate_rq", "write_replicas", "__version__"]
__version__: str

@final
class StoreRecord:
    """A C-STORE data set spooled to ``path`` (preamble, File Meta, data set as received)."""

    @property
    def path(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def calling_ae(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def message_id(self) -> int: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def transfer_syntax_uid(self) -> str: ...
    @property
    def move_originator(self) -> Optional[str]: ...
    @property
    def started_ns(self) -> int: ...
    @property
    def ended_ns(self) -> int: ...

@final
class Request:
    """A C-FIND, C-GET, C-MOVE or N-ACTION request and its data set (``data``: identifier or action
    information, encoded in ``transfer_syntax_uid``). ``kind``: "c-find", "c-get", "c-move" or "n-action";
    ``sop_class_uid``: the presentation context's abstract syntax."""

    @property
    def kind(self) -> str: ...
    @property
    def calling_ae(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def message_id(self) -> int: ...
    @property
    def priority(self) -> int: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def transfer_syntax_uid(self) -> str: ...
    @property
    def requested_sop_class_uid(self) -> str: ...
    @property
    def requested_sop_instance_uid(self) -> str: ...
    @property
    def move_destination(self) -> Optional[str]: ...
    @property
    def action_type_id(self) -> Optional[int]: ...
    @property
    def data(self) -> bytes: ...

@final
class Listener:
    """The native DICOM listener; bound and accepting once constructed (raises OSError if it cannot bind).

    ``contexts``: (abstract syntax, our transfer syntaxes in order of preference,
    (requestor may be SCU, requestor may be SCP) or None for default roles, is a storage class).
    ``unknown_storage`` (``dicom.accept_unknown_storage_classes``): None, or (transfer syntaxes, roles,
    refused abstract syntaxes) -- a proposed abstract syntax not in ``contexts`` that is a valid UID and
    not refused is negotiated as a storage class with these syntaxes and roles.
    ``max_half_open`` / ``max_per_address`` (0: unlimited): connections not yet associated / from one
    address beyond which a new connection is closed at once.
    ``on_associate(calling_ae, called_ae, address, port)`` returns None to accept or
    (result, source, reason) to reject; ``on_store(record)`` returns (status, error comment);
    ``on_request(request)`` answers a :class:`Request`: for "c-find" an iterable of (status, identifier or
    None) -- Pending (0xFF00) with an identifier per match, optionally a final status last; for "n-action"
    (status, action reply or None); for "c-get"/"c-move" either (status, counts or None, identifier or None)
    -- a final response at once, counts (remaining or None, completed, failed, warning) -- or a job object
    with ``count()``, ``destination()`` (None, or (host, port, called AE, calling AE, [(abstract syntax,
    [transfer syntaxes])], TLS) for a C-MOVE; TLS is None for plain TCP, or (CA bundle path or None for the
    system's CAs, (certificate path, key path) or None) -- the peer's certificate must chain to the CA and
    name the host, TLS 1.2 or later), ``next_batch(n)`` (the next at most n instances to send, [] when
    done: [(SOP class, SOP instance, stored transfer syntax, [(path, sha256 hex, size)] candidate copies)];
    asked again once the previous batch is sent; an instance's *position* is its rank in the order they
    are handed out, from 0), ``bad_copy(position, index, why, fault)`` (fault "corrupt", "missing" or
    "unreadable"), ``fallback(position)`` (a verified (path, sha256, size) or None),
    ``convert(position, transfer_syntax)`` (a verified copy re-encoded in that syntax as a Part 10 file
    (path, sha256, size), or None) -- both valid until another position is named or the next batch is
    asked for --, ``sent([(ok, size, status)])`` (results in order, passed on before the next batch is
    asked for and before ``close()``), ``failed_identifier(uids)`` (an identifier listing them) and
    ``close()``.
    ``on_log(level, message)`` takes a ``logging`` level; ``on_thread_done()`` runs when an
    association's thread ends. Callbacks run in the association threads.
    """

    def __new__(
        cls,
        *,
        host: str,
        port: int,
        reuse_port: bool,
        max_pdu: int,
        max_associations: int,
        max_half_open: int,
        max_per_address: int,
        acse_timeout: float,
        network_timeout: float,
        dimse_timeout: float,
        spool_dir: str,
        implementation_class_uid: str,
        implementation_version: str,
        spool_implementation_uid: str,
        spool_implementation_version: str,
        contexts: list[tuple[str, list[str], Optional[tuple[bool, bool]], bool]],
        on_associate: Callable[[str, str, str, int], Optional[tuple[int, int, int]]],
        on_store: Callable[[StoreRecord], tuple[int, Optional[str]]],
        on_request: Callable[[Request], Any],
        on_log: Callable[[int, str], None],
        on_thread_done: Callable[[], None],
        unknown_storage: Optional[tuple[list[str], Optional[tuple[bool, bool]], list[str]]] = None,
    ) -> Listener: ...
    @property
    def port(self) -> int: ...
    @property
    def listening(self) -> bool: ...
    def connection_counts(self) -> tuple[int, int]: ...
    def stop(self, grace: float) -> None: ...

def max_associate_rq() -> int: ...

def gray_encode(
    pixels: bytes, *, rows: int, cols: int, frames: int, bits: int, signed: bool, threads: int = 1
) -> bytes:
    """Code little-endian greyscale samples (``bits`` 8 or 16) for ``dicom-px2``; frames in parallel
    on up to ``threads`` threads, GIL released. Raises ValueError if the size does not match."""

def gray_decode(
    stream: bytes, *, rows: int, cols: int, frames: int, bits: int, signed: bool, threads: int = 1
) -> bytes:
    """Restore what :func:`gray_encode` coded; raises ValueError if the stream is damaged."""

def gray3_encode(
    pixels: bytes, *, rows: int, cols: int, frames: int, bits: int, signed: bool, threads: int = 1
) -> bytes:
    """Code little-endian greyscale samples (``bits`` 8 or 16) as a ``px3`` stream for ``dicom-px3``;
    frames in parallel on up to ``threads`` threads, GIL released. Raises ValueError if the size
    does not match."""

def gray3_decode(
    stream: bytes, *, rows: int, cols: int, frames: int, bits: int, signed: bool, threads: int = 1
) -> bytes:
    """Restore what :func:`gray3_encode` coded; raises ValueError if the stream is damaged."""

@final
class BlobDir:
    """A filesystem blob store's directory: blobs under ``root``, temporary names in ``root/.tmp`` (which
    the caller creates). Writes are create-new: temporary file (``O_EXCL``, ``file_mode``), fsync, hard
    link under the key (FileExistsError if it exists), fsync of the key's directory (made if missing);
    ``fsync=False`` skips every fsync. Every call releases the GIL; errors are OSError(errno, strerror),
    ValueError for an unsafe key."""

    def __new__(cls, root: str, *, fsync: bool, file_mode: int) -> BlobDir: ...
    def writer(self) -> BlobWriter:
        """A new temporary file to fill with :meth:`BlobWriter.write` and publish with :meth:`BlobWriter.commit`."""
    def put_file(self, key: str, source: str) -> int:
        """Copy the local file ``source`` under ``key`` in the kernel; the size written."""
    def adopt(self, key: str, source: str) -> Optional[int]:
        """Take ``source`` over as ``key``'s blob (file mode, fsync, hard link); its size, or None when it is
        on another filesystem or cannot be linked here."""

@final
class BlobWriter:
    """A blob being written under a temporary name (see :meth:`BlobDir.writer`)."""

    def write(self, data: bytes) -> None:
        """Append ``data`` (hashed while written)."""
    def commit(self, key: str) -> tuple[int, str]:
        """Fsync, publish under ``key`` (FileExistsError if it exists), remove the temporary name:
        (size, SHA-256 hex of the bytes)."""
    def close(self) -> None:
        """Remove the temporary file unless committed; idempotent."""

def write_replicas(dirs: list[BlobDir], key: str, source: str, adopt: bool) -> list[tuple[int | OSError, int, int]]:
    """Write ``source`` under ``key`` to every store of ``dirs`` in parallel (with ``adopt`` the first store
    takes the file over if it can, see :meth:`BlobDir.adopt`); per store (the size written or the OSError --
    FileExistsError: the key exists -- that stopped it, started ns, ended ns since the epoch)."""

@final
class Part10Scanner:
    """The Part 10 header scanner (a port of ``vna.services.part10.scan_part10``) for the top-level tags
    ``wanted`` (tag to dictionary VR); ``tags`` maps every tag of pydicom's main dictionary to whether its
    VR is SQ, ``repeaters`` lists pydicom's repeater masks in order as (mask1, mask2, VR is SQ)."""

    def __new__(cls, wanted: dict[int, str], tags: dict[int, bool],
                repeaters: list[tuple[int, int, bool]]) -> Part10Scanner: ...
    def scan(self, path: str, private_ts: list[str]) -> Optional[
            tuple[str, bytes, int, bool, list[tuple[int, Optional[str], int, bytes, int]]]]:
        """Scan the file at ``path`` (GIL released): (transfer syntax UID, its raw value, its offset,
        implicit VR, [(tag, VR or None, length, value, value offset)] of the wanted elements found), or None
        wherever the Python scanner declines. ``private_ts``: pydicom's PrivateTransferSyntaxes. Raises
        OSError."""
