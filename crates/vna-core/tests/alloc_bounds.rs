//! Allocation bounds of the parsers and readers, measured by a counting global allocator
//! (the largest single allocation made on the measuring thread). Regression tests of what the
//! fuzz targets in `crates/vna-core/fuzz` found.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vna_core::{pdu, send};

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            LARGEST.with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call goes to the system allocator unchanged; `note` touches only
// const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest single allocation `f` makes on this thread.
fn largest<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    (out, LARGEST.with(|l| l.get()))
}

#[test]
fn pdvs_are_split_without_allocating() {
    // a P-DATA-TF of 16 KiB of empty PDVs: a vector of them was 96 KiB
    let body: Vec<u8> = [0, 0, 0, 2, 1, 0].repeat(16384 / 6);
    let (n, most) = largest(|| pdu::split_pdvs(&body).unwrap().count());
    assert_eq!(n, 16384 / 6);
    assert_eq!(most, 0);
}

#[test]
fn a_read_pdu_never_holds_more_than_its_bound() {
    // two P-DATA-TFs, the second larger: growing the body buffer must not overshoot the bound
    let bound = 1000u32;
    let (mut ours, mut peer) = UnixStream::pair().unwrap();
    for len in [600u32, bound] {
        let mut raw = vec![pdu::P_DATA_TF, 0];
        raw.extend_from_slice(&len.to_be_bytes());
        raw.extend_from_slice(&(len - 4).to_be_bytes());
        raw.extend_from_slice(&[1, 3]);
        raw.resize(6 + len as usize, 7);
        peer.write_all(&raw).unwrap();
    }
    let mut body = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (kinds, most) = largest(|| {
        [0, 1].map(|_| {
            send::read_pdu(
                &mut ours,
                &mut body,
                deadline,
                Duration::from_secs(10),
                bound,
                &[],
                "a PDU",
            )
            .unwrap()
        })
    });
    assert_eq!(kinds, [pdu::P_DATA_TF; 2]);
    assert_eq!(body.len(), bound as usize);
    assert!(
        most <= bound as usize,
        "a buffer of {most} bytes for PDUs of at most {bound}"
    );
}
