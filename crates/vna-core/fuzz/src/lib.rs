//! What the fuzz targets share: a global allocator that bounds every single allocation
//! (a larger one aborts the process, which libFuzzer records as a crash with its input),
//! and the acceptor's contexts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use vna_core::dimse;
use vna_core::negotiate::{SupportedContext, UnknownStorage};

/// The system allocator, with a bound on the size of any one allocation while one is set.
pub struct Bounded;

static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

#[global_allocator]
static ALLOC: Bounded = Bounded;

fn check(size: usize) {
    LARGEST.fetch_max(size, Ordering::Relaxed);
    let limit = LIMIT.load(Ordering::Relaxed);
    if size > limit {
        // no allocation from here on: a fixed message, the two numbers, abort
        let mut line = [0u8; 128];
        let mut n = 0;
        for part in [
            &b"vna-core-fuzz: an allocation of "[..],
            digits(size, &mut [0u8; 20]),
            &b" bytes, more than the bound of "[..],
            digits(limit, &mut [0u8; 20]),
            &b"\n"[..],
        ] {
            line[n..n + part.len()].copy_from_slice(part);
            n += part.len();
        }
        let _ = std::io::stderr().write_all(&line[..n]);
        std::process::abort();
    }
}

fn digits(mut v: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

// SAFETY: every call is forwarded to the system allocator unchanged; `check` only reads and
// updates atomics (or aborts).
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// Set the bound of any one allocation, on every thread (`usize::MAX`: none).
pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// Run `f` with no single allocation above `bytes`; returns what it returned and the largest
/// allocation made (on any thread) meanwhile.
pub fn bounded<R>(bytes: usize, f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    set_limit(bytes);
    let out = f();
    set_limit(usize::MAX);
    (out, LARGEST.load(Ordering::Relaxed))
}

/// A parser may allocate at most this many bytes at once for an input of `len` bytes: a fixed
/// allowance (error texts, small structures) plus a constant factor of the input. A parser
/// that trusts a length field rather than the bytes present exceeds it at once.
pub fn parser_bound(len: usize, factor: usize) -> usize {
    1024 + factor * len
}

pub const VERIFICATION: &str = "1.2.840.10008.1.1";
pub const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
pub const IMPLICIT: &str = "1.2.840.10008.1.2";
pub const EXPLICIT: &str = "1.2.840.10008.1.2.1";

/// The acceptor's contexts: Verification, CT storage (no roles) and MR storage (roles).
pub fn supported() -> HashMap<String, SupportedContext> {
    let ts = vec![EXPLICIT.to_string(), IMPLICIT.to_string()];
    let mut m = HashMap::new();
    m.insert(
        VERIFICATION.to_string(),
        SupportedContext {
            transfer_syntaxes: vec![IMPLICIT.to_string()],
            roles: None,
            storage: false,
        },
    );
    m.insert(
        CT.to_string(),
        SupportedContext {
            transfer_syntaxes: ts.clone(),
            roles: None,
            storage: true,
        },
    );
    m.insert(
        MR.to_string(),
        SupportedContext {
            transfer_syntaxes: ts,
            roles: Some((true, true)),
            storage: true,
        },
    );
    m
}

/// `dicom.accept_unknown_storage_classes` as the listener is configured with it: any other valid
/// UID as storage (Explicit or Implicit VR Little Endian, both roles), but a refused one.
pub fn unknown_storage() -> UnknownStorage {
    UnknownStorage {
        context: SupportedContext {
            transfer_syntaxes: vec![EXPLICIT.to_string(), IMPLICIT.to_string()],
            roles: Some((true, true)),
            storage: true,
        },
        refused: HashSet::from([REFUSED.to_string()]),
    }
}

/// A SOP class of another service (Storage Commitment Push Model) that never becomes storage.
pub const REFUSED: &str = "1.2.840.10008.1.20.1";

/// A small Part 10 file (vna's spool header, CT in Explicit VR Little Endian, a 2-element data
/// set) in a temporary directory of this process, and its SHA-256 in hex.
pub fn stored() -> &'static (PathBuf, String) {
    static FILE: OnceLock<(PathBuf, String)> = OnceLock::new();
    FILE.get_or_init(|| {
        let mut file = dimse::spool_header(CT, "1.2.3.45", EXPLICIT, "1.2.3", "FUZZ");
        file.extend_from_slice(&[0x08, 0, 0x16, 0, b'U', b'I', 26, 0]);
        file.extend_from_slice(CT.as_bytes());
        file.push(0);
        file.extend_from_slice(&[0xE0, 0x7F, 0x10, 0, b'O', b'B', 0, 0, 64, 0, 0, 0]);
        file.extend((0..64u8).map(|i| i.wrapping_mul(7)));
        let dir = std::env::temp_dir().join(format!("vna-core-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("stored.dcm");
        std::fs::write(&path, &file).expect("the stored file");
        let sha: String = Sha256::digest(&file)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (path, sha)
    })
}
