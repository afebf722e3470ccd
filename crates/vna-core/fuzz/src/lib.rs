//! What the fuzz targets share: a global allocator that bounds every single allocation
//! (a larger one aborts the process, which libFuzzer records as a crash with its input),
//! and the acceptor's contexts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use vna_core::negotiate::SupportedContext;

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
