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

fn item(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.extend_from_slice(&[kind, 0]);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// An A-ASSOCIATE-(RQ|AC) body: fixed fields, application context, `contexts` context items
/// of type `cx_kind` (each with one sub-item), `users` User Information items packed with
/// Role Selection sub-items (as many as fit in one item).
fn assoc_body(cx_kind: u8, contexts: usize, users: usize) -> Vec<u8> {
    let mut body = vec![0, 1, 0, 0];
    body.extend_from_slice(&[b' '; 32]);
    body.extend_from_slice(&[0; 32]);
    item(&mut body, 0x10, pdu::APPLICATION_CONTEXT.as_bytes());
    for i in 0..contexts {
        let mut v = vec![(2 * i + 1) as u8, 0, 0, 0];
        item(&mut v, if cx_kind == 0x20 { 0x30 } else { 0x40 }, b"1");
        if cx_kind == 0x20 {
            item(&mut v, 0x40, b"1");
        }
        item(&mut body, cx_kind, &v);
    }
    for _ in 0..users {
        let mut user = Vec::new();
        item(&mut user, 0x51, &16384u32.to_be_bytes());
        while user.len() + 9 <= 65535 {
            item(&mut user, 0x54, &[0, 1, b'1', 1, 1]);
        }
        item(&mut body, 0x50, &user);
    }
    body
}

const BOUND: usize = vna_core::server::MAX_ASSOCIATE_RQ as usize;

#[test]
fn an_associate_rq_of_many_contexts_stays_within_its_bound() {
    // 128 contexts parse; a body of the largest size packed with contexts (the vector of
    // them was 1.8 MiB) or with User Information items of roles (2 MiB) is refused
    let fits = assoc_body(0x20, 128, 1);
    let (rq, most) = largest(|| pdu::parse_associate_rq(&fits));
    assert_eq!(rq.unwrap().contexts.len(), 128);
    assert!(most <= BOUND);
    let per_context = 4 + 4 + 5 + 5;
    let packed = assoc_body(0x20, (BOUND - 70_000) / per_context, 1);
    assert!(packed.len() <= BOUND);
    let (rq, most) = largest(|| pdu::parse_associate_rq(&packed));
    assert!(
        most <= BOUND,
        "{most} bytes at once for a {} byte A-ASSOCIATE-RQ",
        packed.len()
    );
    assert!(rq.is_err());
    let roles = assoc_body(0x20, 1, 7);
    assert!(roles.len() <= BOUND);
    let (rq, most) = largest(|| pdu::parse_associate_rq(&roles));
    assert!(
        most <= BOUND,
        "{most} bytes at once for a {} byte A-ASSOCIATE-RQ",
        roles.len()
    );
    assert!(rq.is_err());
}

#[test]
fn an_associate_ac_of_many_results_stays_within_its_bound() {
    let packed = assoc_body(0x21, (BOUND - 70_000) / 13, 1);
    assert!(packed.len() <= BOUND);
    let (ac, most) = largest(|| pdu::parse_associate_ac(&packed));
    assert!(
        most <= BOUND,
        "{most} bytes at once for a {} byte A-ASSOCIATE-AC",
        packed.len()
    );
    assert!(ac.is_err());
    let fits = assoc_body(0x21, 128, 1);
    assert_eq!(pdu::parse_associate_ac(&fits).unwrap().contexts.len(), 128);
}

#[test]
fn a_long_response_command_grows_within_its_bound() {
    // a C-STORE-RSP of 60,000 bytes in two PDVs (40,000 then 20,000): the command buffer's
    // doubling made 80,000 bytes, past the 64 KiB command bound
    use sha2::{Digest, Sha256};
    use vna_core::dimse;
    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    let dir = std::env::temp_dir().join(format!("vna-alloc-bounds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("one.dcm");
    let mut file = dimse::spool_header(CT, "1.2.3.45", EXPLICIT, "1.2.3", "T1");
    file.extend_from_slice(&[0x08, 0, 0x18, 0, b'U', b'I', 8, 0]);
    file.extend_from_slice(b"1.2.3.45");
    std::fs::write(&path, &file).unwrap();
    let sha: String = Sha256::digest(&file)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let comment = "x".repeat(60_000 - 140);
    let rsp = dimse::encode_store_rsp(9, CT, "1.2.3.45", 0xA700, Some(&comment));
    assert!(rsp.len() > 59_000 && rsp.len() <= 60_000);
    let (mut ours, mut peer) = UnixStream::pair().unwrap();
    for (part, control) in [(&rsp[..40_000], 1u8), (&rsp[40_000..], 3u8)] {
        let mut raw = vec![pdu::P_DATA_TF, 0];
        raw.extend_from_slice(&(part.len() as u32 + 6).to_be_bytes());
        raw.extend_from_slice(&(part.len() as u32 + 2).to_be_bytes());
        raw.extend_from_slice(&[3, control]);
        raw.extend_from_slice(part);
        peer.write_all(&raw).unwrap();
    }
    let mut sender = send::Sender::new(send::SendSettings::new(16384, 0));
    let req = send::StoreRequest {
        context_id: 3,
        transfer_syntax: EXPLICIT,
        message_id: 9,
        sop_class_uid: CT,
        sop_instance_uid: "1.2.3.45",
        priority: 0,
        move_originator: None,
    };
    let (outcome, most) = largest(|| sender.send_store(&mut ours, &req, &path, &sha));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(outcome.unwrap().response.status, 0xA700);
    assert!(
        most <= send::MAX_COMMAND,
        "{most} bytes at once for a command bounded by {}",
        send::MAX_COMMAND
    );
}
