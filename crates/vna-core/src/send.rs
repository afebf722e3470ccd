//! Sending one C-STORE-RQ over an established association, whichever side requested it:
//! the C-GET sub-operations go out on the acceptor's connection, the C-MOVE ones on an
//! association that [`crate::scu`] requested.
//!
//! The data set comes from a stored Part 10 file: the bytes after its File Meta are sent
//! as they are (no re-encoding), so the stored transfer syntax must be the one accepted on
//! the presentation context. The whole file's SHA-256 must equal the digest the caller
//! expects, and it is checked before the final fragment goes out:
//!
//! - a file of at most [`SendSettings::whole_read_limit`] bytes is read whole and hashed
//!   before anything is sent: a mismatch sends nothing;
//! - a larger file is hashed in a first pass (a mismatch sends nothing), then sent in a
//!   second pass that hashes again and holds the final fragment back until that digest
//!   matches too: a file that changed in between ends in [`LinkError::ChangedWhileSending`]
//!   with the data set incomplete, and the caller aborts the association.
//!
//! Memory is bounded whatever the file or the peer: one whole-read buffer (at most the
//! limit), one PDU buffer (at most [`SEND_PDU_CAP`]), one received PDU (at most our
//! announced maximum, or [`crate::server::MAX_UNLIMITED_PDATA`] when we announced none).
//!
//! Nothing here writes an A-ABORT: an error that leaves the association unusable is a
//! [`SendError::Link`], and the caller (acceptor or requestor) aborts and closes.
//!
//! Use: one [`Sender`] per association, its [`SendSettings`] from the negotiated maxima
//! (the peer's and ours) and the timeouts; between the reads of its own loop the owner of
//! the connection calls [`Sender::send_store`] with `&mut` its stream (any [`Transport`]).
//! [`SendError::Unusable`] and [`SendError::DigestMismatch`] leave the association as it
//! was: try another copy, or let the Python path send this one.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::dimse;
use crate::pdu;

/// The largest P-DATA-TF we send, whatever larger maximum the peer announces (0: unlimited).
pub const SEND_PDU_CAP: u32 = 256 * 1024;
/// Files up to this size are read whole and hashed before anything is sent.
pub const WHOLE_READ_LIMIT: u64 = 32 * 1024 * 1024;
/// The File Meta must end within the first this many bytes of the file.
pub const META_PREFIX: usize = 64 * 1024;
/// The largest command set accepted from the peer.
pub const MAX_COMMAND: usize = 64 * 1024;
/// The largest A-RELEASE-RQ/RP or A-ABORT accepted.
pub const MAX_SMALL_PDU: u32 = 64;
/// The buffer of a hash pass over a large file.
const HASH_CHUNK: usize = 1024 * 1024;

/// C-CANCEL-RQ's Command Field (PS3.7 9.3.2.3).
pub const C_CANCEL_RQ: u16 = 0x0FFF;
/// CommandDataSetType of a command followed by a data set.
pub const DATASET_PRESENT: u16 = 0x0001;

/// A byte stream that carries an association: a TCP connection on either side.
pub trait Transport: Read + Write {
    /// Bound each following read (None: wait indefinitely).
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bound each following write (None: wait indefinitely).
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Transport for std::net::TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, timeout)
    }
}

impl Transport for std::os::unix::net::UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_write_timeout(self, timeout)
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_read_timeout(timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        (**self).set_write_timeout(timeout)
    }
}

/// Why an association can no longer be used; the caller aborts it (unless the peer did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The peer sent an A-ABORT (source, reason).
    PeerAborted { source: u8, reason: u8 },
    /// The connection closed or failed.
    Closed(String),
    /// A read or write waited longer than its timeout, or the response deadline passed.
    Timeout(String),
    /// The peer broke the protocol (the text says how).
    Protocol(String),
    /// The file changed between the hash pass and the send pass of a large file: the data
    /// set is incomplete on the wire (its final fragment was held back).
    ChangedWhileSending(String),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::PeerAborted { source, reason } => {
                write!(f, "aborted by the peer (source {source}, reason {reason})")
            }
            LinkError::Closed(why)
            | LinkError::Timeout(why)
            | LinkError::Protocol(why)
            | LinkError::ChangedWhileSending(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for LinkError {}

/// Why a C-STORE did not get a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// This copy or request cannot be sent (unreadable, not a Part 10 file this sends, another
    /// transfer syntax than the context's, a malformed UID): nothing was sent, the association
    /// is untouched.
    Unusable(String),
    /// The copy's SHA-256 is not the expected one: nothing was sent, the association is
    /// untouched; the caller may try another copy.
    DigestMismatch { expected: String, actual: String },
    /// The association cannot carry on (part of this C-STORE may be on the wire).
    Link(LinkError),
}

impl SendError {
    /// True when nothing of this C-STORE went out and the association can carry on.
    pub fn association_usable(&self) -> bool {
        !matches!(self, SendError::Link(_))
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Unusable(why) => write!(f, "copy not sent: {why}"),
            SendError::DigestMismatch { expected, actual } => write!(
                f,
                "copy not sent: its SHA-256 is {actual}, {expected} was expected"
            ),
            SendError::Link(e) => write!(f, "association failed: {e}"),
        }
    }
}

impl std::error::Error for SendError {}

impl From<LinkError> for SendError {
    fn from(e: LinkError) -> Self {
        SendError::Link(e)
    }
}

/// Where the data set of a Part 10 file is, and what its File Meta says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10Layout {
    /// TransferSyntaxUID (0002,0010).
    pub transfer_syntax: String,
    /// MediaStorageSOPClassUID (0002,0002), if present.
    pub sop_class_uid: Option<String>,
    /// MediaStorageSOPInstanceUID (0002,0003), if present.
    pub sop_instance_uid: Option<String>,
    /// The offset of the data set: the end of the File Meta.
    pub data_set_offset: u64,
    pub file_size: u64,
}

impl Part10Layout {
    /// The data set's length: from its offset to the end of the file.
    pub fn data_set_length(&self) -> u64 {
        self.file_size - self.data_set_offset
    }
}

const SHORT_VRS: [&[u8; 2]; 21] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
    b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
];
const LONG_VRS: [&[u8; 2]; 13] = [
    b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV",
];

fn le16(raw: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([raw[at], raw[at + 1]])
}

fn le32(raw: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]])
}

fn meta_uid(value: &[u8], elem: u16) -> Result<String, String> {
    if !value.is_ascii() {
        return Err(format!("File Meta element (0002,{elem:04X}) is not ASCII"));
    }
    let text = std::str::from_utf8(value)
        .unwrap_or_default()
        .trim_end_matches(['\0', ' ']);
    if !dimse::valid_uid(text) {
        return Err(format!(
            "File Meta element (0002,{elem:04X}) is not a valid UID"
        ));
    }
    Ok(text.to_string())
}

/// Find the data set of a Part 10 file from its first bytes `head` (at least
/// `min(file_size, META_PREFIX)` of them, or the whole file) and its size.
///
/// Declines (an error naming what is odd) on: no preamble and "DICM", a File Meta element
/// with an unknown VR, an undefined length or running past `head`, tags not ascending, a
/// File Meta Group Length that disagrees with the elements, a missing or malformed
/// TransferSyntaxUID, and a data set that is empty or starts below group 0008.
pub fn parse_file_meta(head: &[u8], file_size: u64) -> Result<Part10Layout, String> {
    if head.len() < 132 || &head[128..132] != b"DICM" {
        return Err("not a Part 10 file (no preamble and DICM prefix)".into());
    }
    let mut pos = 132usize;
    let mut prev: Option<u16> = None;
    let mut layout = Part10Layout {
        transfer_syntax: String::new(),
        sop_class_uid: None,
        sop_instance_uid: None,
        data_set_offset: 0,
        file_size,
    };
    let mut group_end: Option<u64> = None;
    let group = loop {
        if head.len() - pos < 8 {
            return Err(if pos as u64 + 8 > file_size {
                "no data set after the File Meta".into()
            } else {
                format!("File Meta longer than the {} bytes read", head.len())
            });
        }
        let group = le16(head, pos);
        if group != 2 {
            break group;
        }
        let elem = le16(head, pos + 2);
        if prev.is_some_and(|p| elem <= p) {
            return Err(format!("File Meta element (0002,{elem:04X}) out of order"));
        }
        prev = Some(elem);
        let vr = &head[pos + 4..pos + 6];
        let (len, vpos) = if SHORT_VRS.iter().any(|v| v[..] == *vr) {
            (le16(head, pos + 6) as usize, pos + 8)
        } else if LONG_VRS.iter().any(|v| v[..] == *vr) {
            if head.len() - pos < 12 {
                return Err("File Meta truncated".into());
            }
            (le32(head, pos + 8) as usize, pos + 12)
        } else {
            return Err(format!(
                "File Meta element (0002,{elem:04X}) has an unknown VR"
            ));
        };
        if len == 0xFFFF_FFFF || len > head.len() - vpos {
            return Err(format!(
                "File Meta element (0002,{elem:04X}) runs past the bytes read"
            ));
        }
        let value = &head[vpos..vpos + len];
        match elem {
            0x0000 if len == 4 => group_end = Some(vpos as u64 + 4 + le32(value, 0) as u64),
            0x0000 => return Err("File Meta Group Length is not 4 bytes".into()),
            0x0002 => layout.sop_class_uid = Some(meta_uid(value, elem)?),
            0x0003 => layout.sop_instance_uid = Some(meta_uid(value, elem)?),
            0x0010 => layout.transfer_syntax = meta_uid(value, elem)?,
            _ => {}
        }
        pos = vpos + len;
    };
    if group_end.is_some_and(|end| end != pos as u64) {
        return Err("File Meta Group Length disagrees with its elements".into());
    }
    if layout.transfer_syntax.is_empty() {
        return Err("File Meta without a TransferSyntaxUID".into());
    }
    if group < 8 {
        return Err(format!("data set starts with group {group:04X}"));
    }
    layout.data_set_offset = pos as u64;
    Ok(layout)
}

/// Read the first bytes of the Part 10 file at `path` and find its data set.
pub fn read_layout(path: &Path) -> Result<Part10Layout, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .len();
    let mut head = Vec::with_capacity(META_PREFIX.min(size as usize));
    (&mut file)
        .take(META_PREFIX as u64)
        .read_to_end(&mut head)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_file_meta(&head, size)
}

/// What goes into a C-STORE-RQ besides the data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest<'a> {
    /// An accepted presentation context on which we may send C-STORE-RQs.
    pub context_id: u8,
    /// The transfer syntax accepted on that context: the stored one must be the same.
    pub transfer_syntax: &'a str,
    pub message_id: u16,
    pub sop_class_uid: &'a str,
    pub sop_instance_uid: &'a str,
    /// 0 medium, 1 high, 2 low.
    pub priority: u16,
    /// Move Originator AE Title and Message ID (C-MOVE sub-operations).
    pub move_originator: Option<(&'a str, u16)>,
}

fn element(out: &mut Vec<u8>, elem: u16, value: &[u8]) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

fn padded(value: &str, pad: u8) -> Vec<u8> {
    let mut raw = value.as_bytes().to_vec();
    if raw.len() % 2 == 1 {
        raw.push(pad);
    }
    raw
}

/// True for an AE title we may send: 1-16 characters, printable ASCII, no backslash,
/// not only spaces.
pub fn valid_ae(ae: &str) -> bool {
    !ae.trim().is_empty()
        && ae.len() <= 16
        && ae.bytes().all(|b| (0x20..0x7F).contains(&b) && b != b'\\')
}

/// The C-STORE-RQ command set (Implicit VR Little Endian, group length first), or why the
/// request is malformed.
pub fn encode_store_rq(req: &StoreRequest<'_>) -> Result<Vec<u8>, String> {
    for (name, uid) in [
        ("Affected SOP Class UID", req.sop_class_uid),
        ("Affected SOP Instance UID", req.sop_instance_uid),
    ] {
        if !dimse::valid_uid(uid) {
            return Err(format!("{name} {uid:?} is not a valid UID"));
        }
    }
    if req.priority > 2 {
        return Err(format!("priority {} is not 0, 1 or 2", req.priority));
    }
    let mut body = Vec::with_capacity(200);
    element(&mut body, 0x0002, &padded(req.sop_class_uid, 0));
    element(&mut body, 0x0100, &dimse::C_STORE_RQ.to_le_bytes());
    element(&mut body, 0x0110, &req.message_id.to_le_bytes());
    element(&mut body, 0x0700, &req.priority.to_le_bytes());
    element(&mut body, 0x0800, &DATASET_PRESENT.to_le_bytes());
    element(&mut body, 0x1000, &padded(req.sop_instance_uid, 0));
    if let Some((ae, id)) = req.move_originator {
        if !valid_ae(ae) {
            return Err(format!(
                "Move Originator AE Title {ae:?} is not a valid AE title"
            ));
        }
        element(&mut body, 0x1030, &padded(ae.trim(), b' '));
        element(&mut body, 0x1031, &id.to_le_bytes());
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    element(&mut out, 0x0000, &(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// A response (or C-CANCEL-RQ) command set as read from the peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub command_field: u16,
    /// MessageIDBeingRespondedTo (0000,0120).
    pub message_id_responded: u16,
    /// Status (0000,0900); 0 when absent (a C-CANCEL-RQ has none).
    pub status: u16,
    /// ErrorComment (0000,0902).
    pub error_comment: Option<String>,
    /// OffendingElement (0000,0901): tags as (group << 16 | element).
    pub offending_elements: Vec<u32>,
    /// AffectedSOPInstanceUID (0000,1000).
    pub affected_sop_instance: Option<String>,
    /// CommandDataSetType (0000,0800) != 0x0101.
    pub has_data_set: bool,
}

impl Response {
    /// Success (0000).
    pub fn is_success(&self) -> bool {
        self.status == 0
    }

    /// A warning status of C-STORE (0001, B000, B006, B007; PS3.4 B.2.3).
    pub fn is_warning(&self) -> bool {
        matches!(self.status, 0x0001 | 0xB000 | 0xB006 | 0xB007)
    }
}

fn text_value(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_matches(['\0', ' '])
        .to_string()
}

/// Decode a response or C-CANCEL-RQ command set; unknown elements are skipped, lengths checked.
pub fn parse_response(raw: &[u8]) -> Result<Response, pdu::PduError> {
    let bad = |what: &str| pdu::PduError(what.to_string());
    let mut rsp = Response {
        has_data_set: true,
        ..Response::default()
    };
    let (mut has_field, mut has_id, mut has_type) = (false, false, false);
    let mut pos = 0usize;
    while pos < raw.len() {
        if raw.len() - pos < 8 {
            return Err(bad("truncated command element"));
        }
        let group = le16(raw, pos);
        let elem = le16(raw, pos + 2);
        let len = le32(raw, pos + 4) as usize;
        pos += 8;
        if group != 0 || len > raw.len() - pos {
            return Err(bad(
                "command element outside group 0000 or longer than its set",
            ));
        }
        let value = &raw[pos..pos + len];
        pos += len;
        let us = || match value {
            [a, b] => Ok(u16::from_le_bytes([*a, *b])),
            _ => Err(bad("US element of a command set is not 2 bytes")),
        };
        match elem {
            0x0100 => {
                rsp.command_field = us()?;
                has_field = true;
            }
            0x0120 => {
                rsp.message_id_responded = us()?;
                has_id = true;
            }
            0x0800 => {
                rsp.has_data_set = us()? != dimse::NO_DATASET;
                has_type = true;
            }
            0x0900 => rsp.status = us()?,
            0x0901 => {
                if len % 4 != 0 {
                    return Err(bad("OffendingElement is not a list of tags"));
                }
                rsp.offending_elements = value
                    .chunks_exact(4)
                    .take(16)
                    .map(|t| (le16(t, 0) as u32) << 16 | le16(t, 2) as u32)
                    .collect();
            }
            0x0902 => rsp.error_comment = Some(text_value(value)).filter(|c| !c.is_empty()),
            0x1000 => rsp.affected_sop_instance = Some(text_value(value)),
            _ => {}
        }
    }
    if !has_field || !has_type {
        return Err(bad(
            "a command set without CommandField or CommandDataSetType",
        ));
    }
    if !has_id {
        return Err(bad(
            "a response without MessageIDBeingRespondedTo (0000,0120)",
        ));
    }
    Ok(rsp)
}

/// What a C-STORE got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOutcome {
    /// The C-STORE-RSP.
    pub response: Response,
    /// The Message ID a C-CANCEL-RQ from the peer named while we waited (C-GET), if one came.
    pub cancel: Option<u16>,
    /// The data set bytes sent.
    pub data_set_bytes: u64,
}

/// Limits and timeouts of a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSettings {
    /// The peer's Maximum Length Received (0: unlimited, [`SEND_PDU_CAP`] is used).
    pub peer_max_pdu: u32,
    /// Our announced Maximum Length Received: the bound of a P-DATA-TF we read
    /// (0: [`crate::server::MAX_UNLIMITED_PDATA`]).
    pub our_max_pdu: u32,
    /// The longest a single read or write may wait.
    pub network_timeout: Duration,
    /// The longest the C-STORE-RSP may take after the final fragment went out.
    pub response_timeout: Duration,
    /// Files up to this size are read whole and hashed once.
    pub whole_read_limit: u64,
}

impl SendSettings {
    /// Settings with 30 s network and 60 s response timeouts and [`WHOLE_READ_LIMIT`].
    pub fn new(peer_max_pdu: u32, our_max_pdu: u32) -> Self {
        SendSettings {
            peer_max_pdu,
            our_max_pdu,
            network_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(60),
            whole_read_limit: WHOLE_READ_LIMIT,
        }
    }

    /// The data bytes one PDV of a P-DATA-TF we send may carry: even (DCMTK aborts on an odd
    /// fragment), at least 2.
    pub fn fragment_size(&self) -> usize {
        let max = match self.peer_max_pdu {
            0 => SEND_PDU_CAP,
            n => n.min(SEND_PDU_CAP),
        };
        ((max as usize).saturating_sub(6) & !1).max(2)
    }

    /// The bound of a P-DATA-TF we read: our announced maximum plus slack.
    pub fn max_pdata_read(&self) -> u32 {
        match self.our_max_pdu {
            0 => crate::server::MAX_UNLIMITED_PDATA,
            // as the listener: the announced maximum plus a PDV item header's worth of slack
            n => n.saturating_add(6),
        }
    }
}

/// Read one PDU into `body`: its type. P-DATA-TF bodies are bounded by `max_pdata`, the
/// types of `others` by their bound, A-RELEASE-RQ/RP and A-ABORT by [`MAX_SMALL_PDU`];
/// anything else is a protocol error. Each read waits at most `network_timeout`, the whole
/// PDU at most until `deadline` (`waiting_for` names what was awaited, for error messages).
pub fn read_pdu<T: Transport + ?Sized>(
    t: &mut T,
    body: &mut Vec<u8>,
    deadline: Instant,
    network_timeout: Duration,
    max_pdata: u32,
    others: &[(u8, u32)],
    waiting_for: &str,
) -> Result<u8, LinkError> {
    let mut head = [0u8; 6];
    read_exact(t, &mut head, deadline, network_timeout, waiting_for, true)?;
    let (kind, len) = pdu::parse_header(&head);
    let listed = others.iter().find(|o| o.0 == kind).map(|o| o.1);
    let cap = match (kind, listed) {
        (pdu::P_DATA_TF, _) => max_pdata,
        (_, Some(cap)) => cap,
        (pdu::A_RELEASE_RQ | pdu::A_RELEASE_RP | pdu::A_ABORT, None) => MAX_SMALL_PDU,
        (pdu::A_ASSOCIATE_RQ..=pdu::A_ABORT, None) => {
            return Err(LinkError::Protocol(format!(
                "unexpected {} while waiting for {waiting_for}",
                pdu::pdu_name(kind)
            )))
        }
        _ => {
            return Err(LinkError::Protocol(format!(
                "not a DICOM PDU (type 0x{kind:02X})"
            )))
        }
    };
    if len > cap {
        return Err(LinkError::Protocol(format!(
            "{} of {len} bytes, more than the {cap} allowed",
            pdu::pdu_name(kind)
        )));
    }
    body.clear();
    // exactly: a doubling growth would hold up to twice the bound
    body.reserve_exact(len as usize);
    body.resize(len as usize, 0);
    read_exact(t, body, deadline, network_timeout, waiting_for, false)?;
    Ok(kind)
}

fn read_exact<T: Transport + ?Sized>(
    t: &mut T,
    buf: &mut [u8],
    deadline: Instant,
    network_timeout: Duration,
    waiting_for: &str,
    first: bool,
) -> Result<(), LinkError> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LinkError::Timeout(format!("no {waiting_for} in time")));
        }
        let wait = left.min(network_timeout).max(Duration::from_millis(1));
        t.set_read_timeout(Some(wait))
            .map_err(|e| LinkError::Closed(format!("connection error: {e}")))?;
        match t.read(&mut buf[pos..]) {
            Ok(0) => {
                let what = if first && pos == 0 {
                    format!("connection closed while waiting for {waiting_for}")
                } else {
                    "connection closed mid-PDU".to_string()
                };
                return Err(LinkError::Closed(what));
            }
            Ok(n) => pos += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                if wait < left {
                    let secs = network_timeout.as_secs_f64();
                    return Err(LinkError::Timeout(format!(
                        "no data for {secs:.0} s while waiting for {waiting_for}"
                    )));
                }
                return Err(LinkError::Timeout(format!("no {waiting_for} in time")));
            }
            Err(e) => return Err(LinkError::Closed(format!("connection error: {e}"))),
        }
    }
    Ok(())
}

/// Write `bytes` whole; a write error or timeout makes the association unusable.
pub fn write_all<T: Transport + ?Sized>(t: &mut T, bytes: &[u8]) -> Result<(), LinkError> {
    t.write_all(bytes).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            LinkError::Timeout("the peer stopped reading (write timed out)".into())
        }
        _ => LinkError::Closed(format!("send failed: {e}")),
    })
}

/// Lower-case hexadecimal of ``bytes`` (the SHA-256 digests Python compares).
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// A data set is a sequence of even-length elements (a deflated one is padded to even
/// length, PS3.5 A.5): an odd one is declined rather than sent for the peer to abort on.
fn check_even(layout: &Part10Layout) -> Result<(), SendError> {
    if layout.data_set_length() % 2 == 1 {
        return Err(SendError::Unusable(format!(
            "its data set has an odd length ({} bytes)",
            layout.data_set_length()
        )));
    }
    Ok(())
}

/// Where the data set's bytes come from while they are sent.
enum Source {
    /// The whole file, already hashed and checked; the cursor is the next byte to send.
    Whole(Vec<u8>, usize),
    /// A large file already checked by a hash pass, read again (and hashed again) from the data
    /// set's offset; `sha` covers everything up to the read position.
    Stream {
        file: File,
        sha: Sha256,
        expected: String,
    },
}

/// Sends C-STORE-RQs on one association; holds its buffers between sends.
pub struct Sender {
    pub settings: SendSettings,
    pdu: Vec<u8>,
    body: Vec<u8>,
    command: Vec<u8>,
}

impl Sender {
    pub fn new(settings: SendSettings) -> Self {
        Sender {
            settings,
            pdu: Vec::new(),
            body: Vec::new(),
            command: Vec::new(),
        }
    }

    /// Send one C-STORE-RQ with the data set of the Part 10 file at `path`, whose whole SHA-256
    /// must be `expected_sha256` (hex), and wait for its C-STORE-RSP.
    ///
    /// A C-CANCEL-RQ the peer sends meanwhile is returned in [`StoreOutcome::cancel`]; the
    /// response is still awaited. Any other command, a data set PDV, an A-RELEASE-RQ or a
    /// response to another message is a protocol error. See [`SendError`] for what each error
    /// leaves behind.
    pub fn send_store<T: Transport + ?Sized>(
        &mut self,
        t: &mut T,
        req: &StoreRequest<'_>,
        path: &Path,
        expected_sha256: &str,
    ) -> Result<StoreOutcome, SendError> {
        let expected = expected_sha256.to_ascii_lowercase();
        if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SendError::Unusable(
                "the expected digest is not a SHA-256 in hex".into(),
            ));
        }
        let command = encode_store_rq(req).map_err(SendError::Unusable)?;
        if req.context_id % 2 == 0 {
            return Err(SendError::Unusable(format!(
                "presentation context ID {} is even",
                req.context_id
            )));
        }
        let (layout, mut source) = self.open(path, &expected)?;
        if layout.transfer_syntax != req.transfer_syntax {
            return Err(SendError::Unusable(format!(
                "stored in {}, the context accepted {}",
                layout.transfer_syntax, req.transfer_syntax
            )));
        }
        t.set_write_timeout(Some(self.settings.network_timeout))
            .map_err(|e| LinkError::Closed(format!("connection error: {e}")))?;
        let room = self.settings.fragment_size();
        let cmd_pdus = pdu::encode_pdata(req.context_id, true, &command, room as u32 + 6);
        write_all(t, &cmd_pdus)?;
        let total = layout.data_set_length();
        self.send_data(t, req.context_id, &mut source, total, room)?;
        let (response, cancel) = self.await_response(t, req)?;
        Ok(StoreOutcome {
            response,
            cancel,
            data_set_bytes: total,
        })
    }

    /// Open the file, find its data set and check its digest (the first pass of a large file).
    fn open(&mut self, path: &Path, expected: &str) -> Result<(Part10Layout, Source), SendError> {
        let unusable = |what: &str, e: io::Error| {
            SendError::Unusable(format!("cannot {what} {}: {e}", path.display()))
        };
        let mut file = File::open(path).map_err(|e| unusable("open", e))?;
        let size = file.metadata().map_err(|e| unusable("stat", e))?.len();
        if size <= self.settings.whole_read_limit {
            let mut whole = Vec::with_capacity(size as usize);
            (&mut file)
                .take(size + 1)
                .read_to_end(&mut whole)
                .map_err(|e| unusable("read", e))?;
            if whole.len() as u64 != size {
                return Err(SendError::Unusable(format!(
                    "{} changed size while read",
                    path.display()
                )));
            }
            let actual = hex(&Sha256::digest(&whole));
            if actual != expected {
                return Err(SendError::DigestMismatch {
                    expected: expected.to_string(),
                    actual,
                });
            }
            let layout = parse_file_meta(&whole, size).map_err(SendError::Unusable)?;
            check_even(&layout)?;
            let at = layout.data_set_offset as usize;
            return Ok((layout, Source::Whole(whole, at)));
        }
        let mut head = Vec::with_capacity(META_PREFIX);
        (&mut file)
            .take(META_PREFIX as u64)
            .read_to_end(&mut head)
            .map_err(|e| unusable("read", e))?;
        let layout = parse_file_meta(&head, size).map_err(SendError::Unusable)?;
        check_even(&layout)?;
        drop(head);
        file.seek(SeekFrom::Start(0))
            .map_err(|e| unusable("read", e))?;
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; HASH_CHUNK];
        let mut seen = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(unusable("read", e)),
            };
            sha.update(&buf[..n]);
            seen += n as u64;
        }
        let actual = hex(&sha.finalize());
        if actual != expected {
            return Err(SendError::DigestMismatch {
                expected: expected.to_string(),
                actual,
            });
        }
        if seen != size {
            return Err(SendError::Unusable(format!(
                "{} changed size while read",
                path.display()
            )));
        }
        // the send pass hashes again: the bytes before the data set first
        file.seek(SeekFrom::Start(0))
            .map_err(|e| unusable("read", e))?;
        let mut sha = Sha256::new();
        let mut prefix = vec![0u8; layout.data_set_offset as usize];
        file.read_exact(&mut prefix)
            .map_err(|e| unusable("read", e))?;
        sha.update(&prefix);
        Ok((
            layout,
            Source::Stream {
                file,
                sha,
                expected: expected.to_string(),
            },
        ))
    }

    /// Send `total` data set bytes from `source` in P-DATA-TF PDUs of one PDV of at most
    /// `room` bytes; the final fragment goes out only once the streamed file's digest matched.
    fn send_data<T: Transport + ?Sized>(
        &mut self,
        t: &mut T,
        context_id: u8,
        source: &mut Source,
        total: u64,
        room: usize,
    ) -> Result<(), LinkError> {
        let mut left = total;
        self.pdu.clear();
        self.pdu.resize(12 + room.min(total as usize), 0);
        while left > 0 {
            let n = room.min(left as usize);
            let last = n as u64 == left;
            let buf = &mut self.pdu[..12 + n];
            buf[0] = pdu::P_DATA_TF;
            buf[1] = 0;
            buf[2..6].copy_from_slice(&(n as u32 + 6).to_be_bytes());
            buf[6..10].copy_from_slice(&(n as u32 + 2).to_be_bytes());
            buf[10] = context_id;
            buf[11] = if last { 2 } else { 0 };
            match source {
                Source::Whole(whole, at) => {
                    buf[12..].copy_from_slice(&whole[*at..*at + n]);
                    *at += n;
                }
                Source::Stream {
                    file,
                    sha,
                    expected,
                } => {
                    file.read_exact(&mut buf[12..]).map_err(|e| {
                        LinkError::ChangedWhileSending(format!(
                            "the file could not be read again while sent: {e}"
                        ))
                    })?;
                    sha.update(&buf[12..]);
                    if last {
                        let mut probe = [0u8; 1];
                        let grew = !matches!(file.read(&mut probe), Ok(0));
                        let actual = hex(&std::mem::take(sha).finalize());
                        if grew || actual != *expected {
                            return Err(LinkError::ChangedWhileSending(
                                "the file changed between its hash pass and its send pass; \
                                 the final fragment was not sent"
                                    .into(),
                            ));
                        }
                    }
                }
            }
            write_all(t, buf)?;
            left -= n as u64;
        }
        if self.pdu.capacity() > 64 * 1024 {
            self.pdu = Vec::new();
        }
        Ok(())
    }

    /// Read PDUs until the C-STORE-RSP to `req` is complete.
    fn await_response<T: Transport + ?Sized>(
        &mut self,
        t: &mut T,
        req: &StoreRequest<'_>,
    ) -> Result<(Response, Option<u16>), LinkError> {
        let deadline = Instant::now() + self.settings.response_timeout;
        let waiting_for = format!("the C-STORE-RSP to message {}", req.message_id);
        let mut cancel = None;
        let mut response = None;
        let mut command_cx: Option<u8> = None;
        self.command.clear();
        while response.is_none() {
            let kind = read_pdu(
                t,
                &mut self.body,
                deadline,
                self.settings.network_timeout,
                self.settings.max_pdata_read(),
                &[],
                &waiting_for,
            )?;
            match kind {
                pdu::P_DATA_TF => {}
                pdu::A_ABORT => {
                    let (source, reason) = match self.body.as_slice() {
                        [_, _, s, r, ..] => (*s, *r),
                        _ => (0, 0),
                    };
                    return Err(LinkError::PeerAborted { source, reason });
                }
                other => {
                    return Err(LinkError::Protocol(format!(
                        "unexpected {} while waiting for {waiting_for}",
                        pdu::pdu_name(other)
                    )))
                }
            }
            let pdvs = pdu::split_pdvs(&self.body)
                .map_err(|e| LinkError::Protocol(format!("malformed P-DATA-TF: {e}")))?;
            for pdv in pdvs {
                if !pdv.is_command() {
                    return Err(LinkError::Protocol(format!(
                        "a data set PDV while waiting for {waiting_for}"
                    )));
                }
                if command_cx.is_some_and(|cx| cx != pdv.context_id) {
                    return Err(LinkError::Protocol(
                        "command fragments on two presentation contexts".into(),
                    ));
                }
                if self.command.len() + pdv.data.len() > MAX_COMMAND {
                    return Err(LinkError::Protocol("command set too long".into()));
                }
                command_cx = Some(pdv.context_id);
                let need = self.command.len() + pdv.data.len();
                if need > self.command.capacity() {
                    // grow by doubling, but never past the bound
                    let want = (self.command.capacity() * 2).clamp(need, MAX_COMMAND);
                    self.command.reserve_exact(want - self.command.len());
                }
                self.command.extend_from_slice(pdv.data);
                if !pdv.is_last() {
                    continue;
                }
                command_cx = None;
                let rsp = parse_response(&self.command)
                    .map_err(|e| LinkError::Protocol(format!("malformed command: {e}")))?;
                self.command.clear();
                match rsp.command_field {
                    C_CANCEL_RQ => cancel = Some(rsp.message_id_responded),
                    dimse::C_STORE_RSP
                        if response.is_none()
                            && pdv.context_id == req.context_id
                            && rsp.message_id_responded == req.message_id =>
                    {
                        if rsp.has_data_set {
                            return Err(LinkError::Protocol(
                                "a C-STORE-RSP announcing a data set".into(),
                            ));
                        }
                        response = Some(rsp);
                    }
                    dimse::C_STORE_RSP => {
                        return Err(LinkError::Protocol(format!(
                            "a C-STORE-RSP to message {} on context {} while waiting for {waiting_for} on context {}",
                            rsp.message_id_responded, pdv.context_id, req.context_id
                        )))
                    }
                    field => {
                        return Err(LinkError::Protocol(format!(
                            "DIMSE command 0x{field:04X} while waiting for {waiting_for}"
                        )))
                    }
                }
            }
        }
        if self.body.capacity() > 64 * 1024 {
            self.body = Vec::new();
        }
        Ok((response.unwrap_or_default(), cancel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT: &str = "1.2.840.10008.1.2.1";

    fn request(move_originator: Option<(&'static str, u16)>) -> StoreRequest<'static> {
        StoreRequest {
            context_id: 3,
            transfer_syntax: EXPLICIT,
            message_id: 9,
            sop_class_uid: CT,
            sop_instance_uid: "1.2.3.45",
            priority: 2,
            move_originator,
        }
    }

    #[test]
    fn store_rq_parses_back() {
        let raw = encode_store_rq(&request(Some(("MOVER", 77)))).unwrap();
        let len = le32(&raw, 8) as usize;
        assert_eq!(len, raw.len() - 12);
        let cmd = dimse::parse_command(&raw).unwrap();
        assert_eq!(cmd.command_field, dimse::C_STORE_RQ);
        assert_eq!(cmd.message_id, 9);
        assert_eq!(cmd.priority, 2);
        assert_eq!(cmd.affected_sop_class, CT);
        assert_eq!(cmd.affected_sop_instance, "1.2.3.45");
        assert!(cmd.has_data_set());
        assert_eq!(cmd.move_originator_ae.as_deref(), Some("MOVER"));
        assert_eq!(cmd.move_originator_id, Some(77));
        assert!(cmd.missing_for_store().is_empty());
        let plain = dimse::parse_command(&encode_store_rq(&request(None)).unwrap()).unwrap();
        assert_eq!(plain.move_originator_ae, None);
        assert!(!plain.present.contains(&0x1031));
    }

    #[test]
    fn malformed_requests_are_refused() {
        let mut req = request(None);
        req.sop_instance_uid = "1.02.3";
        assert!(encode_store_rq(&req).is_err());
        let req = request(Some(("A\\B", 1)));
        assert!(encode_store_rq(&req).is_err());
        let req = request(Some(("SEVENTEEN_CHARS_X", 1)));
        assert!(encode_store_rq(&req).is_err());
    }

    #[test]
    fn responses_parse() {
        let raw = dimse::encode_store_rsp(9, CT, "1.2.3.45", 0xA700, Some("out of resources"));
        let rsp = parse_response(&raw).unwrap();
        assert_eq!(rsp.command_field, dimse::C_STORE_RSP);
        assert_eq!(rsp.message_id_responded, 9);
        assert_eq!(rsp.status, 0xA700);
        assert_eq!(rsp.error_comment.as_deref(), Some("out of resources"));
        assert_eq!(rsp.affected_sop_instance.as_deref(), Some("1.2.3.45"));
        assert!(!rsp.has_data_set && !rsp.is_success() && !rsp.is_warning());
        // a request is not a response
        assert!(parse_response(&encode_store_rq(&request(None)).unwrap()).is_err());
    }

    /// A Part 10 file: vna's spool header and `data` as its data set.
    fn part10(data: &[u8]) -> Vec<u8> {
        let mut out = dimse::spool_header(CT, "1.2.3.45", EXPLICIT, "1.2.3", "T1");
        out.extend_from_slice(data);
        out
    }

    /// A data set of one (0008,0016) element and an OB element of `n` bytes.
    fn data_set(n: usize) -> Vec<u8> {
        let mut d = vec![0x08, 0, 0x16, 0, b'U', b'I'];
        d.extend_from_slice(&(CT.len() as u16 + 1).to_le_bytes());
        d.extend_from_slice(CT.as_bytes());
        d.push(0);
        d.extend_from_slice(&[0xE0, 0x7F, 0x10, 0, b'O', b'B', 0, 0]);
        d.extend_from_slice(&(n as u32).to_le_bytes());
        d.extend((0..n).map(|i| (i * 7 % 251) as u8));
        d
    }

    #[test]
    fn file_meta_is_located() {
        let data = data_set(10);
        let file = part10(&data);
        let layout = parse_file_meta(&file, file.len() as u64).unwrap();
        assert_eq!(layout.transfer_syntax, EXPLICIT);
        assert_eq!(layout.sop_class_uid.as_deref(), Some(CT));
        assert_eq!(layout.sop_instance_uid.as_deref(), Some("1.2.3.45"));
        assert_eq!(&file[layout.data_set_offset as usize..], &data[..]);
    }

    #[test]
    fn odd_file_meta_is_declined() {
        let file = part10(&data_set(10));
        let n = file.len() as u64;
        let mut no_dicm = file.clone();
        no_dicm[128] = b'X';
        assert!(parse_file_meta(&no_dicm, n).is_err());
        // no data set
        let meta_only = part10(&[]);
        assert!(parse_file_meta(&meta_only, meta_only.len() as u64).is_err());
        // group length one byte off
        let mut lying = file.clone();
        lying[140] += 1;
        assert!(parse_file_meta(&lying, n).is_err());
        // an unknown VR in the File Meta
        let mut vr = file.clone();
        vr[144 + 4] = b'Q';
        assert!(parse_file_meta(&vr, n).is_err());
        // truncated
        assert!(parse_file_meta(&file[..150], n).is_err());
    }

    /// Read the PDUs `n` bytes of P-DATA-TF carry from `peer`: (command bytes, data bytes, the
    /// largest PDU body seen); checks the last-fragment bits.
    fn receive(peer: &mut UnixStream) -> (Vec<u8>, Vec<u8>, u32) {
        let (mut command, mut data, mut largest) = (Vec::new(), Vec::new(), 0);
        let mut done_cmd = false;
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        loop {
            let mut head = [0u8; 6];
            peer.read_exact(&mut head).unwrap();
            let (kind, len) = pdu::parse_header(&head);
            assert_eq!(kind, pdu::P_DATA_TF);
            largest = largest.max(len);
            let mut body = vec![0u8; len as usize];
            peer.read_exact(&mut body).unwrap();
            for pdv in pdu::split_pdvs(&body).unwrap() {
                if pdv.is_command() {
                    assert!(!done_cmd);
                    command.extend_from_slice(pdv.data);
                    done_cmd = pdv.is_last();
                } else {
                    assert!(done_cmd, "data before the command's last fragment");
                    data.extend_from_slice(pdv.data);
                    assert!(pdv.is_last() || pdv.data.len() % 2 == 0, "odd fragment");
                    if pdv.is_last() {
                        return (command, data, largest);
                    }
                }
            }
        }
    }

    fn write_temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("vna-send-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn sha(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    fn fragments_respect_the_peer_maximum(whole_read_limit: u64, name: &str) {
        let data = data_set(5000);
        let file = part10(&data);
        let path = write_temp(name, &file);
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        let peer_thread = std::thread::spawn(move || {
            let got = receive(&mut peer);
            // a C-CANCEL-RQ in one PDU, then the response split over two PDUs
            let mut cancel = Vec::new();
            element(&mut cancel, 0x0100, &C_CANCEL_RQ.to_le_bytes());
            element(&mut cancel, 0x0120, &5u16.to_le_bytes());
            element(&mut cancel, 0x0800, &dimse::NO_DATASET.to_le_bytes());
            peer.write_all(&pdu::encode_pdata(1, true, &cancel, 0))
                .unwrap();
            let rsp = dimse::encode_store_rsp(9, CT, "1.2.3.45", 0xB000, None);
            peer.write_all(&pdu::encode_pdata(3, true, &rsp, 40))
                .unwrap();
            got
        });
        let mut settings = SendSettings::new(1001, 16384);
        settings.whole_read_limit = whole_read_limit;
        let mut sender = Sender::new(settings);
        let out = sender
            .send_store(&mut ours, &request(None), &path, &sha(&file))
            .unwrap();
        let (command, sent, largest) = peer_thread.join().unwrap();
        assert_eq!(sent, data);
        assert!(largest <= 1001);
        assert_eq!(command, encode_store_rq(&request(None)).unwrap());
        assert_eq!(out.cancel, Some(5));
        assert_eq!(out.response.status, 0xB000);
        assert!(out.response.is_warning());
        assert_eq!(out.data_set_bytes, data.len() as u64);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn whole_read_fragments_respect_the_peer_maximum() {
        fragments_respect_the_peer_maximum(WHOLE_READ_LIMIT, "whole");
    }

    #[test]
    fn streamed_fragments_respect_the_peer_maximum() {
        fragments_respect_the_peer_maximum(1024, "stream");
    }

    fn nothing_sent_on_mismatch(whole_read_limit: u64, name: &str) {
        let file = part10(&data_set(5000));
        let path = write_temp(name, &file);
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        let mut settings = SendSettings::new(0, 0);
        settings.whole_read_limit = whole_read_limit;
        let mut sender = Sender::new(settings);
        let wrong = sha(b"another copy");
        let err = sender
            .send_store(&mut ours, &request(None), &path, &wrong)
            .unwrap_err();
        assert!(
            matches!(&err, SendError::DigestMismatch { actual, .. } if *actual == sha(&file)),
            "{err}"
        );
        assert!(err.association_usable());
        drop(ours);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes went out", rest.len());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn whole_read_mismatch_sends_nothing() {
        nothing_sent_on_mismatch(WHOLE_READ_LIMIT, "mismatch-whole");
    }

    #[test]
    fn streamed_mismatch_sends_nothing() {
        nothing_sent_on_mismatch(1024, "mismatch-stream");
    }

    #[test]
    fn a_file_changed_between_the_passes_holds_the_final_fragment_back() {
        let file = part10(&data_set(5000));
        let path = write_temp("changed", &file);
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        let mut settings = SendSettings::new(1000, 0);
        settings.whole_read_limit = 1024;
        let mut sender = Sender::new(settings);
        let (layout, mut source) = sender.open(&path, &sha(&file)).unwrap();
        // the hash pass is done: now the copy changes (same size, last byte flipped)
        let mut changed = file.clone();
        *changed.last_mut().unwrap() ^= 0xFF;
        std::fs::write(&path, &changed).unwrap();
        let err = sender
            .send_data(&mut ours, 3, &mut source, layout.data_set_length(), 994)
            .unwrap_err();
        assert!(matches!(err, LinkError::ChangedWhileSending(_)), "{err}");
        drop(ours);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        let mut pos = 0;
        let mut data = 0;
        while pos < rest.len() {
            let (_, len) = pdu::parse_header(rest[pos..pos + 6].try_into().unwrap());
            let body = &rest[pos + 6..pos + 6 + len as usize];
            for pdv in pdu::split_pdvs(body).unwrap() {
                assert!(!pdv.is_last(), "the final fragment went out");
                data += pdv.data.len();
            }
            pos += 6 + len as usize;
        }
        assert!(data > 0 && (data as u64) < layout.data_set_length());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn other_transfer_syntax_sends_nothing() {
        let file = part10(&data_set(10));
        let path = write_temp("ts", &file);
        let (mut ours, _peer) = UnixStream::pair().unwrap();
        let mut req = request(None);
        req.transfer_syntax = "1.2.840.10008.1.2";
        let err = Sender::new(SendSettings::new(0, 0))
            .send_store(&mut ours, &req, &path, &sha(&file))
            .unwrap_err();
        assert!(matches!(err, SendError::Unusable(_)), "{err}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_silent_peer_times_out_and_an_abort_is_reported() {
        let file = part10(&data_set(100));
        let path = write_temp("silent", &file);
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        let mut settings = SendSettings::new(0, 0);
        settings.response_timeout = Duration::from_millis(300);
        let mut sender = Sender::new(settings);
        let err = sender
            .send_store(&mut ours, &request(None), &path, &sha(&file))
            .unwrap_err();
        assert!(
            matches!(err, SendError::Link(LinkError::Timeout(_))),
            "{err}"
        );
        let _ = receive(&mut peer);
        peer.write_all(&pdu::encode_abort(2, 6)).unwrap();
        let err = sender
            .send_store(&mut ours, &request(None), &path, &sha(&file))
            .unwrap_err();
        assert_eq!(
            err,
            SendError::Link(LinkError::PeerAborted {
                source: 2,
                reason: 6
            })
        );
        let _ = std::fs::remove_file(path);
    }

    proptest::proptest! {
        #[test]
        fn file_meta_parser_never_panics(pos in 0usize..400, byte in proptest::num::u8::ANY, cut in 0usize..400) {
            let mut file = part10(&data_set(16));
            let at = pos % file.len();
            file[at] = byte;
            let n = cut.min(file.len());
            let _ = parse_file_meta(&file[..n], file.len() as u64);
        }

        #[test]
        fn response_parser_never_panics(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_response(&raw);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn any_answer_ends_in_a_response_or_an_error(answer in proptest::collection::vec(proptest::num::u8::ANY, 0..300), valid_prefix in proptest::bool::ANY) {
            let file = part10(&data_set(100));
            let path = write_temp("answer", &file);
            let (mut ours, mut peer) = UnixStream::pair().unwrap();
            let peer_thread = std::thread::spawn(move || {
                let _ = receive(&mut peer);
                if valid_prefix {
                    // a well-formed P-DATA-TF header, then garbage as its body
                    let mut head = vec![pdu::P_DATA_TF, 0];
                    head.extend_from_slice(&(answer.len() as u32).to_be_bytes());
                    let _ = peer.write_all(&head);
                }
                let _ = peer.write_all(&answer);
            });
            let mut settings = SendSettings::new(0, 4096);
            settings.response_timeout = Duration::from_millis(500);
            let result = Sender::new(settings).send_store(&mut ours, &request(None), &path, &sha(&file));
            peer_thread.join().unwrap();
            if let Ok(out) = result {
                proptest::prop_assert_eq!(out.response.message_id_responded, 9);
            }
            let _ = std::fs::remove_file(path);
        }
    }
}
