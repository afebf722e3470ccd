//! The Part 10 header scanner of the ingest fast path: a port of `vna/services/part10.py`
//! (`scan_part10`), which stays the reference.
//!
//! [`scan_part10`] walks the preamble, the file meta and the data set (Implicit or Explicit
//! VR Little Endian) of a file, reading element headers and only the wanted top-level values,
//! and *declines* (returns `Ok(None)`) exactly where the Python scanner does: the walk, the
//! reads (a prefix of [`PREFIX_SIZE`] bytes, then per header, with a read-ahead window inside
//! sequences) and the decline rules are the same, so for any file both decline or both return
//! the same transfer syntax and elements.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// Bytes read up front (the whole file if smaller); anything beyond is read per header.
pub const PREFIX_SIZE: u64 = 64 * 1024;
const WINDOW: u64 = 64 * 1024;
const DEFER_SIZE: u64 = 1024;

const UNDEFINED: u64 = 0xFFFF_FFFF;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIM: u32 = 0xFFFE_E00D;
const SEQ_DELIM: u32 = 0xFFFE_E0DD;
const SEQ_DELIM_BYTES: &[u8; 4] = b"\xfe\xff\xdd\xe0";
const TS_TAG: u32 = 0x0002_0010;

const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";

/// Explicit VRs with a 4-byte length (pydicom's `EXPLICIT_VR_LENGTH_32`).
fn long_vr(vr: &[u8]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// Explicit VRs with a 2-byte length (pydicom's `EXPLICIT_VR_LENGTH_16`).
fn short_vr(vr: &[u8]) -> bool {
    matches!(
        vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FD"
            | b"FL"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

/// What the data dictionary says of a tag (pydicom's `dictionary_VR`, repeaters included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DictEntry {
    /// Not in the dictionary (`dictionary_VR` raises `KeyError`).
    Unknown,
    /// In the dictionary with VR SQ.
    Sequence,
    /// In the dictionary with another VR.
    Other,
}

/// A wanted top-level element as found (pydicom's `RawDataElement` fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub tag: u32,
    /// The explicit VR; `None` in Implicit VR.
    pub vr: Option<String>,
    pub length: u32,
    /// The value bytes (empty when `length` is 0).
    pub value: Vec<u8>,
    /// File offset of the value.
    pub value_offset: u64,
}

/// What the scan found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part10Header {
    /// The transfer syntax UID as pydicom converts it (trailing NULs/spaces and whitespace stripped).
    pub transfer_syntax: String,
    /// The raw TransferSyntaxUID value and its file offset.
    pub transfer_syntax_raw: Vec<u8>,
    pub transfer_syntax_offset: u64,
    pub implicit_vr: bool,
    /// The wanted elements found, in file order.
    pub elements: Vec<Element>,
}

/// The file is outside what the scanner handles (or a read failed: `Err`).
enum Stop {
    Decline,
    Io(io::Error),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

type Step<T> = Result<T, Stop>;

/// Reads as much as `n` bytes from the current position (fewer only at end of file).
fn read_up_to<R: Read>(fp: &mut R, n: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(n.min(1 << 20) as usize);
    fp.take(n).read_to_end(&mut out)?;
    Ok(out)
}

/// Exact byte ranges from a prefix buffer, the file for anything else (Python's `_Source`).
struct Source<R> {
    fp: R,
    size: u64,
    buf: Vec<u8>,
    base: u64,
}

impl<R: Read + Seek> Source<R> {
    fn new(mut fp: R, size: u64) -> Step<Self> {
        let want = size.min(PREFIX_SIZE);
        let buf = read_up_to(&mut fp, want)?;
        if buf.len() as u64 != want {
            return Err(Stop::Decline);
        }
        Ok(Source {
            fp,
            size,
            buf,
            base: 0,
        })
    }

    fn get(&mut self, off: u64, n: u64, window: bool) -> Step<Vec<u8>> {
        let end = off + n;
        if end > self.size {
            return Err(Stop::Decline);
        }
        if self.in_memory(off, end) {
            let (a, b) = ((off - self.base) as usize, (end - self.base) as usize);
            return Ok(self.buf[a..b].to_vec());
        }
        self.fp.seek(SeekFrom::Start(off))?;
        let data = if window {
            self.buf = read_up_to(&mut self.fp, n.max(WINDOW.min(self.size - off)))?;
            self.base = off;
            self.buf[..(n as usize).min(self.buf.len())].to_vec()
        } else {
            read_up_to(&mut self.fp, n)?
        };
        if data.len() as u64 != n {
            return Err(Stop::Decline);
        }
        Ok(data)
    }

    fn in_memory(&self, off: u64, end: u64) -> bool {
        self.base <= off && end <= self.base + self.buf.len() as u64
    }
}

fn head(b: &[u8]) -> (u16, u16, u64) {
    (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
        u64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]])),
    )
}

fn u32_at(b: &[u8]) -> u64 {
    u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

struct Walker<'a, R, D> {
    src: Source<R>,
    implicit: bool,
    wanted: &'a HashMap<u32, String>,
    dictionary: &'a D,
    found: Vec<Element>,
}

impl<R: Read + Seek, D: Fn(u32) -> DictEntry> Walker<'_, R, D> {
    /// Walks elements from `pos`; returns the offset after the data set.
    fn dataset(
        &mut self,
        mut pos: u64,
        end: Option<u64>,
        top: bool,
        item_undefined: bool,
    ) -> Step<u64> {
        let size = self.src.size;
        let mut prev: i64 = -1;
        loop {
            if top && pos == size {
                return Ok(pos);
            }
            if let Some(end) = end {
                if pos >= end {
                    return if pos != end {
                        Err(Stop::Decline)
                    } else {
                        Ok(pos)
                    };
                }
            }
            let h = self.src.get(pos, 8, !top)?;
            let (group, elem, mut length) = head(&h);
            let tag = u32::from(group) << 16 | u32::from(elem);
            if group == 0xFFFE {
                if item_undefined && tag == ITEM_DELIM && length == 0 {
                    return Ok(pos + 8);
                }
                return Err(Stop::Decline);
            }
            let mut vr: Option<[u8; 2]> = None;
            let vpos;
            if self.implicit {
                vpos = pos + 8;
            } else {
                let v = [h[4], h[5]];
                vr = Some(v);
                if short_vr(&v) {
                    length = u64::from(h[6]) | u64::from(h[7]) << 8;
                    vpos = pos + 8;
                } else if long_vr(&v) {
                    length = u32_at(&self.src.get(pos + 8, 4, !top)?);
                    vpos = pos + 12;
                } else {
                    return Err(Stop::Decline);
                }
            }
            if top {
                if i64::from(tag) <= prev {
                    return Err(Stop::Decline);
                }
                prev = i64::from(tag);
            }
            if length == UNDEFINED {
                if top && self.wanted.contains_key(&tag) {
                    return Err(Stop::Decline);
                }
                pos = self.undefined(tag, vr, vpos, top)?;
                continue;
            }
            let nxt = vpos + length;
            if nxt > size {
                return Err(Stop::Decline);
            }
            if top && self.wanted.contains_key(&tag) {
                self.keep(tag, vr, length, vpos)?;
            }
            pos = nxt;
        }
    }

    fn keep(&mut self, tag: u32, vr: Option<[u8; 2]>, length: u64, vpos: u64) -> Step<()> {
        // (a known explicit VR is two ASCII capitals)
        let vr_s = vr.map(|v| String::from_utf8_lossy(&v).into_owned());
        if length > DEFER_SIZE
            || vr_s
                .as_ref()
                .is_some_and(|v| Some(v) != self.wanted.get(&tag))
        {
            return Err(Stop::Decline); // pydicom would defer (or reinterpret) it
        }
        let value = if length > 0 {
            self.src.get(vpos, length, false)?
        } else {
            Vec::new()
        };
        self.found.push(Element {
            tag,
            vr: vr_s,
            length: length as u32,
            value,
            value_offset: vpos,
        });
        Ok(())
    }

    /// Skips an undefined-length value starting at `vpos`; returns the offset after it.
    fn undefined(&mut self, tag: u32, vr: Option<[u8; 2]>, vpos: u64, top: bool) -> Step<u64> {
        match vr {
            None => {
                let is_sq = match (self.dictionary)(tag) {
                    DictEntry::Sequence => true,
                    DictEntry::Other => false,
                    DictEntry::Unknown => {
                        let (g, e, _) = head(&self.src.get(vpos, 8, true)?);
                        (g, e) == (0xFFFE, 0xE000)
                    }
                };
                if !is_sq {
                    return Err(Stop::Decline);
                }
                self.sequence(vpos)
            }
            Some(v) if &v == b"SQ" => self.sequence(vpos),
            Some(v) if &v == b"OB" || &v == b"OW" => self.fragments(vpos, top),
            Some(_) => Err(Stop::Decline),
        }
    }

    /// Skips the items of an undefined-length sequence; returns the offset after its delimiter.
    fn sequence(&mut self, mut pos: u64) -> Step<u64> {
        loop {
            let (group, elem, length) = head(&self.src.get(pos, 8, true)?);
            let tag = u32::from(group) << 16 | u32::from(elem);
            if tag == SEQ_DELIM && length == 0 {
                return Ok(pos + 8);
            }
            if tag != ITEM {
                return Err(Stop::Decline);
            }
            if length == UNDEFINED {
                pos = self.dataset(pos + 8, None, false, true)?;
            } else {
                let end = pos + 8 + length;
                if end > self.src.size {
                    return Err(Stop::Decline);
                }
                pos = self.dataset(pos + 8, Some(end), false, false)?;
            }
        }
    }

    /// Skips encapsulated fragments; returns the offset after the sequence delimiter.
    fn fragments(&mut self, vpos: u64, top: bool) -> Step<u64> {
        let mut pos = vpos;
        loop {
            let (group, elem, length) = head(&self.src.get(pos, 8, false)?);
            let tag = u32::from(group) << 16 | u32::from(elem);
            if tag == SEQ_DELIM && length == 0 {
                break;
            }
            if tag != ITEM || length == UNDEFINED {
                return Err(Stop::Decline);
            }
            pos += 8 + length;
        }
        // pydicom ends the value at the first delimiter byte pattern: check it is this one
        let src = &mut self.src;
        if src.in_memory(vpos, pos + 4) {
            let (a, b) = ((vpos - src.base) as usize, (pos + 4 - src.base) as usize);
            if find(&src.buf[a..b], SEQ_DELIM_BYTES).map(|i| (a + i) as u64) != Some(pos - src.base)
            {
                return Err(Stop::Decline);
            }
        } else if !top {
            let bytes = src.get(vpos, pos + 4 - vpos, false)?;
            if find(&bytes, SEQ_DELIM_BYTES).map(|i| i as u64) != Some(pos - vpos) {
                return Err(Stop::Decline);
            }
        }
        Ok(pos + 8)
    }
}

/// Python's `str.isspace` for the characters of a Latin-1 decoded string.
fn py_space(c: u8) -> bool {
    matches!(
        c,
        b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | 0x1C..=0x1F | b' ' | 0x85 | 0xA0
    )
}

/// pydicom's conversion of a UI value to a single UID string; `None` for a multi-valued one.
fn convert_ui(raw: &[u8]) -> Option<String> {
    let mut s = raw;
    while let [rest @ .., last] = s {
        if *last == 0 || *last == b' ' {
            s = rest;
        } else {
            break;
        }
    }
    if s.contains(&b'\\') {
        return None; // a MultiValue, not a str
    }
    while let [first, rest @ ..] = s {
        if py_space(*first) {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if py_space(*last) {
            s = rest;
        } else {
            break;
        }
    }
    Some(s.iter().map(|&b| char::from(b)).collect()) // Latin-1
}

/// Scans the Part 10 file open in `fp` (`size` bytes) for the top-level elements `wanted`
/// (each tag with its dictionary VR). `dictionary` answers pydicom's `dictionary_VR` for
/// implicit VR undefined-length elements; `private_ts` is pydicom's `PrivateTransferSyntaxes`.
/// `Ok(None)`: declined, wherever the Python scanner declines. `Err`: a read failed.
pub fn scan<R: Read + Seek, D: Fn(u32) -> DictEntry>(
    fp: R,
    size: u64,
    wanted: &HashMap<u32, String>,
    dictionary: &D,
    private_ts: &[String],
) -> io::Result<Option<Part10Header>> {
    match scan_inner(fp, size, wanted, dictionary, private_ts) {
        Ok(h) => Ok(Some(h)),
        Err(Stop::Decline) => Ok(None),
        Err(Stop::Io(e)) => Err(e),
    }
}

/// [`scan`] of the file at `path` (its size as the open file reports it).
pub fn scan_part10<D: Fn(u32) -> DictEntry>(
    path: &Path,
    wanted: &HashMap<u32, String>,
    dictionary: &D,
    private_ts: &[String],
) -> io::Result<Option<Part10Header>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    scan(file, size, wanted, dictionary, private_ts)
}

fn scan_inner<R: Read + Seek, D: Fn(u32) -> DictEntry>(
    fp: R,
    size: u64,
    wanted: &HashMap<u32, String>,
    dictionary: &D,
    private_ts: &[String],
) -> Step<Part10Header> {
    let mut src = Source::new(fp, size)?;
    if size < 132 || src.get(128, 4, false)? != b"DICM" {
        return Err(Stop::Decline);
    }
    // file meta: explicit VR little endian, every (0002,eeee) element
    let (mut pos, mut prev, mut ts_raw): (u64, i64, Option<(Vec<u8>, u64)>) = (132, -1, None);
    let (h, group) = loop {
        let h = src.get(pos, 8, false)?;
        let (group, elem, _) = head(&h);
        if group != 2 {
            break (h, group);
        }
        let tag = u32::from(group) << 16 | u32::from(elem);
        let vr = &h[4..6];
        if i64::from(tag) <= prev {
            return Err(Stop::Decline);
        }
        prev = i64::from(tag);
        let (length, vpos) = if short_vr(vr) {
            (u64::from(h[6]) | u64::from(h[7]) << 8, pos + 8)
        } else if long_vr(vr) {
            (u32_at(&src.get(pos + 8, 4, false)?), pos + 12)
        } else {
            return Err(Stop::Decline);
        };
        if length == UNDEFINED || vpos + length > size {
            return Err(Stop::Decline);
        }
        if tag == TS_TAG {
            if vr != b"UI" || length == 0 {
                return Err(Stop::Decline);
            }
            ts_raw = Some((src.get(vpos, length, false)?, vpos));
        }
        pos = vpos + length;
    };
    let Some((ts_bytes, ts_offset)) = ts_raw else {
        return Err(Stop::Decline);
    };
    if group < 8 {
        return Err(Stop::Decline); // (command group elements)
    }
    let ts = convert_ui(&ts_bytes).ok_or(Stop::Decline)?;
    if ts.is_empty()
        || ts == EXPLICIT_VR_BE
        || ts == DEFLATED_EXPLICIT_VR_LE
        || private_ts.contains(&ts)
    {
        return Err(Stop::Decline);
    }
    let implicit = ts == IMPLICIT_VR_LE;
    // pydicom's check of the first element's encoding (it would switch, with a warning)
    let looks_implicit = !((0x41..=0x5A).contains(&h[4]) && (0x41..=0x5A).contains(&h[5]));
    if looks_implicit != implicit {
        return Err(Stop::Decline);
    }
    let mut walker = Walker {
        src,
        implicit,
        wanted,
        dictionary,
        found: Vec::new(),
    };
    walker.dataset(pos, None, true, false)?;
    Ok(Part10Header {
        transfer_syntax: ts,
        transfer_syntax_raw: ts_bytes,
        transfer_syntax_offset: ts_offset,
        implicit_vr: implicit,
        elements: walker.found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn explicit(tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
        out.extend_from_slice(&(tag as u16).to_le_bytes());
        out.extend_from_slice(vr);
        if long_vr(vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    fn file(ts: &[u8], body: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend(explicit(TS_TAG, b"UI", ts));
        out.extend_from_slice(body);
        out
    }

    fn run(bytes: &[u8]) -> Option<Part10Header> {
        let wanted: HashMap<u32, String> = [(0x0010_0020, "LO".to_string())].into();
        let size = bytes.len() as u64;
        scan(
            Cursor::new(bytes),
            size,
            &wanted,
            &|_| DictEntry::Unknown,
            &[],
        )
        .expect("in memory")
    }

    #[test]
    fn finds_a_wanted_element_and_declines_truncation() {
        let bytes = file(
            b"1.2.840.10008.1.2.1\0",
            &explicit(0x0010_0020, b"LO", b"PID1"),
        );
        let h = run(&bytes).expect("scanned");
        assert_eq!(h.transfer_syntax, "1.2.840.10008.1.2.1");
        assert!(!h.implicit_vr);
        assert_eq!(h.elements.len(), 1);
        assert_eq!(h.elements[0].value, b"PID1");
        assert_eq!(h.elements[0].vr.as_deref(), Some("LO"));
        assert!(run(&bytes[..bytes.len() - 1]).is_none());
    }

    #[test]
    fn declines_big_endian_and_a_wrong_vr() {
        let body = explicit(0x0010_0020, b"LO", b"PID1");
        assert!(run(&file(b"1.2.840.10008.1.2.2\0", &body)).is_none());
        let body = explicit(0x0010_0020, b"SH", b"PID1");
        assert!(run(&file(b"1.2.840.10008.1.2.1\0", &body)).is_none());
    }
}
