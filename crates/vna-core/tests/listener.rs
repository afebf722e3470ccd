//! The listener end to end on loopback, with a handler that records what it is given.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vna_core::dimse;
use vna_core::negotiate::SupportedContext;
use vna_core::pdu::{self, AssociateRq};
use vna_core::server::{
    Config, Decision, FindAnswer, FindAnswers, Handler, IntoAnswers, Level, Peer, Request, Server,
    StoreAnswer, StoreRecord,
};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT: &str = "1.2.840.10008.1.2.1";
const IMPLICIT: &str = "1.2.840.10008.1.2";
const VERIFICATION: &str = "1.2.840.10008.1.1";
const STUDY_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

/// Each record the handler got, with the spool file's bytes at that moment.
type Stored = Arc<Mutex<Vec<(StoreRecord, Vec<u8>)>>>;

#[derive(Clone, Default)]
struct Recorder {
    stored: Stored,
}

impl Handler for Recorder {
    fn associate(&self, _peer: &Peer, rq: &AssociateRq) -> Decision {
        if rq.calling_ae() == "BAD" {
            Decision::Reject(1, 1, 3)
        } else {
            Decision::Accept
        }
    }

    fn store(&self, record: &StoreRecord) -> StoreAnswer {
        let bytes = std::fs::read(&record.path).unwrap_or_default();
        self.stored.lock().unwrap().push((record.clone(), bytes));
        StoreAnswer {
            status: 0,
            comment: None,
        }
    }

    fn find(&self, request: &Request<'_>) -> Box<dyn FindAnswers> {
        // one match per byte of the identifier, echoing it
        let matches: Vec<FindAnswer> = request
            .data
            .iter()
            .map(|b| FindAnswer::Pending(vec![*b, 0]))
            .collect();
        Box::new(matches.into_iter().into_answers())
    }

    fn log(&self, _level: Level, _message: &str) {}
}

fn spool_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vna-core-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(name: &str) -> (Server<Recorder>, Recorder, PathBuf) {
    let dir = spool_dir(name);
    let mut contexts = HashMap::new();
    contexts.insert(
        VERIFICATION.to_string(),
        SupportedContext {
            transfer_syntaxes: vec![IMPLICIT.into()],
            roles: None,
            storage: false,
        },
    );
    contexts.insert(
        STUDY_FIND.to_string(),
        SupportedContext {
            transfer_syntaxes: vec![IMPLICIT.into()],
            roles: None,
            storage: false,
        },
    );
    contexts.insert(
        CT.to_string(),
        SupportedContext {
            transfer_syntaxes: vec![EXPLICIT.into(), IMPLICIT.into()],
            roles: Some((true, true)),
            storage: true,
        },
    );
    let cfg = Config {
        host: "127.0.0.1".into(),
        port: 0,
        reuse_port: false,
        max_pdu: 16384,
        max_associations: 4,
        max_half_open: 8,
        max_per_address: 8,
        acse_timeout: Duration::from_secs(5),
        network_timeout: Duration::from_secs(5),
        dimse_timeout: Duration::from_secs(5),
        spool_dir: dir.clone(),
        implementation_class_uid: "1.2.3".into(),
        implementation_version: "TEST".into(),
        spool_implementation_uid: "1.2.3.4".into(),
        spool_implementation_version: "SPOOL_1".into(),
        contexts,
        unknown_storage: None,
    };
    let rec = Recorder::default();
    (Server::start(cfg, rec.clone()).unwrap(), rec, dir)
}

fn item(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, 0];
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn associate_rq(calling: &str, contexts: &[(u8, &str, &str)]) -> Vec<u8> {
    let mut body = vec![0, 1, 0, 0];
    body.extend_from_slice(format!("{:<16}", "VNA").as_bytes());
    body.extend_from_slice(format!("{calling:<16}").as_bytes());
    body.extend_from_slice(&[0u8; 32]);
    body.extend(item(0x10, pdu::APPLICATION_CONTEXT.as_bytes()));
    for (id, abs, ts) in contexts {
        let mut v = vec![*id, 0, 0, 0];
        v.extend(item(0x30, abs.as_bytes()));
        v.extend(item(0x40, ts.as_bytes()));
        body.extend(item(0x20, &v));
    }
    body.extend(item(0x50, &item(0x51, &16384u32.to_be_bytes())));
    let mut out = vec![1, 0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend(body);
    out
}

fn read_pdu(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 6];
    if s.read_exact(&mut head).is_err() {
        return (0, Vec::new());
    }
    let (kind, len) = pdu::parse_header(&head);
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).unwrap();
    (kind, body)
}

fn element(out: &mut Vec<u8>, elem: u16, value: &[u8]) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

fn command(field: u16, sop_class: &str, sop_uid: Option<&str>, data_set: bool) -> Vec<u8> {
    let pad = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    };
    let mut body = Vec::new();
    element(&mut body, 0x0002, &pad(sop_class));
    element(&mut body, 0x0100, &field.to_le_bytes());
    element(&mut body, 0x0110, &5u16.to_le_bytes());
    if field == dimse::C_STORE_RQ {
        element(&mut body, 0x0700, &2u16.to_le_bytes());
    }
    element(
        &mut body,
        0x0800,
        &(if data_set { 0u16 } else { 0x0101 }).to_le_bytes(),
    );
    if let Some(uid) = sop_uid {
        element(&mut body, 0x1000, &pad(uid));
    }
    let mut out = Vec::new();
    element(&mut out, 0x0000, &(body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}

fn rsp_status(body: &[u8]) -> u16 {
    let pdvs: Vec<_> = pdu::split_pdvs(body).unwrap().collect();
    let raw = pdvs[0].data;
    // find (0000,0900)
    let mut pos = 0;
    while pos + 8 <= raw.len() {
        let elem = u16::from_le_bytes([raw[pos + 2], raw[pos + 3]]);
        let len = u32::from_le_bytes(raw[pos + 4..pos + 8].try_into().unwrap()) as usize;
        if elem == 0x0900 {
            return u16::from_le_bytes([raw[pos + 8], raw[pos + 9]]);
        }
        pos += 8 + len;
    }
    panic!("no status");
}

fn wait_for(pred: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn echo_store_release_and_abort() {
    let (mut server, rec, dir) = start("main");
    let port = server.local_addr().port();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&associate_rq(
        "SCU",
        &[
            (1, VERIFICATION, IMPLICIT),
            (3, CT, EXPLICIT),
            (5, "1.2.9", IMPLICIT),
        ],
    ))
    .unwrap();
    let (kind, _) = read_pdu(&mut s);
    assert_eq!(kind, pdu::A_ASSOCIATE_AC);

    s.write_all(&pdu::encode_pdata(
        1,
        true,
        &command(dimse::C_ECHO_RQ, VERIFICATION, None, false),
        0,
    ))
    .unwrap();
    let (kind, body) = read_pdu(&mut s);
    assert_eq!((kind, rsp_status(&body)), (pdu::P_DATA_TF, 0));

    // a data set in three fragments over two PDUs
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let cmd = command(dimse::C_STORE_RQ, CT, Some("1.2.3.4.5"), true);
    s.write_all(&pdu::encode_pdata(3, true, &cmd, 0)).unwrap();
    let mut fragment = pdu::encode_pdata(3, false, &data[..4000], 0);
    fragment[11] = 0; // the message control header: not the last fragment
    s.write_all(&fragment).unwrap();
    s.write_all(&pdu::encode_pdata(3, false, &data[4000..], 0))
        .unwrap();
    let (kind, body) = read_pdu(&mut s);
    assert_eq!((kind, rsp_status(&body)), (pdu::P_DATA_TF, 0));
    {
        let stored = rec.stored.lock().unwrap();
        let (record, bytes) = &stored[0];
        let header = dimse::spool_header(CT, "1.2.3.4.5", EXPLICIT, "1.2.3.4", "SPOOL_1");
        assert_eq!(&bytes[..header.len()], &header[..]);
        assert_eq!(&bytes[header.len()..], &data[..]);
        assert_eq!(record.size as usize, bytes.len());
        let digest: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(record.sha256, digest);
        assert_eq!(record.calling_ae, "SCU");
        assert_eq!(record.transfer_syntax_uid, EXPLICIT);
    }
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "spool removed after the store"
    );

    s.write_all(&[pdu::A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])
        .unwrap();
    let (kind, _) = read_pdu(&mut s);
    assert_eq!(kind, pdu::A_RELEASE_RP);

    // aborted mid-data-set: the spool file goes, nothing reaches the handler
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&associate_rq("SCU", &[(1, CT, EXPLICIT)]))
        .unwrap();
    assert_eq!(read_pdu(&mut s).0, pdu::A_ASSOCIATE_AC);
    let cmd = command(dimse::C_STORE_RQ, CT, Some("1.2.3.4.6"), true);
    s.write_all(&pdu::encode_pdata(1, true, &cmd, 0)).unwrap();
    let mut partial = pdu::encode_pdata(1, false, &data[..100], 0);
    partial[11] = 0; // not the last fragment
    s.write_all(&partial).unwrap();
    wait_for(|| std::fs::read_dir(&dir).unwrap().count() == 1);
    s.write_all(&pdu::encode_abort(0, 0)).unwrap();
    wait_for(|| std::fs::read_dir(&dir).unwrap().count() == 0);
    assert_eq!(rec.stored.lock().unwrap().len(), 1);

    // rejected by the handler; then an A-ASSOCIATE-RQ that lies about its length
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&associate_rq("BAD", &[(1, VERIFICATION, IMPLICIT)]))
        .unwrap();
    let (kind, body) = read_pdu(&mut s);
    assert_eq!((kind, body), (pdu::A_ASSOCIATE_RJ, vec![0, 1, 1, 3]));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[1, 0, 0xFF, 0xFF, 0xFF, 0xFF]).unwrap();
    let (kind, _) = read_pdu(&mut s);
    assert!(kind == 0 || kind == pdu::A_ABORT);

    server.stop(Duration::from_secs(1));
    assert!(!server.listening());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refusals_are_answered_and_the_association_goes_on() {
    // no spool directory: 0xA700 after the data set was read, and the association goes on
    let (mut server, rec, dir) = start("refusals");
    let port = server.local_addr().port();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&associate_rq("SCU", &[(1, CT, EXPLICIT)]))
        .unwrap();
    assert_eq!(read_pdu(&mut s).0, pdu::A_ASSOCIATE_AC);
    let data = vec![1u8; 3000];
    let mut store = |uid: &str| {
        let cmd = command(dimse::C_STORE_RQ, CT, Some(uid), true);
        s.write_all(&pdu::encode_pdata(1, true, &cmd, 0)).unwrap();
        s.write_all(&pdu::encode_pdata(1, false, &data, 0)).unwrap();
        let (kind, body) = read_pdu(&mut s);
        assert_eq!(kind, pdu::P_DATA_TF);
        rsp_status(&body)
    };
    // a malformed SOP Instance UID is the handler's to judge (it accepts everything here)
    assert_eq!(store("1.02.3"), 0);
    // no spool directory: out of resources
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(store("1.2.3.7"), 0xA700);
    std::fs::create_dir_all(&dir).unwrap();
    assert_eq!(store("1.2.3.8"), 0);
    assert_eq!(rec.stored.lock().unwrap().len(), 2);
    server.stop(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The statuses of the responses read until a final one.
fn find_statuses(s: &mut TcpStream) -> Vec<u16> {
    let mut out = Vec::new();
    loop {
        let (kind, body) = read_pdu(s);
        assert_eq!(kind, pdu::P_DATA_TF);
        let pdvs: Vec<_> = pdu::split_pdvs(&body).unwrap().collect();
        if !pdvs[0].is_command() {
            continue;
        }
        let status = rsp_status(&body);
        out.push(status);
        if status != 0xFF00 {
            return out;
        }
    }
}

#[test]
fn c_find_answers_each_match_and_a_c_cancel_ends_it() {
    let (mut server, _rec, _dir) = start("find");
    let port = server.local_addr().port();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&associate_rq("FINDER", &[(1, STUDY_FIND, IMPLICIT)]))
        .unwrap();
    assert_eq!(read_pdu(&mut s).0, pdu::A_ASSOCIATE_AC);
    let rq = command(dimse::C_FIND_RQ, STUDY_FIND, None, true);
    let mut out = pdu::encode_pdata(1, true, &rq, 16384);
    out.extend(pdu::encode_pdata(1, false, &[1, 2, 3, 4], 16384));
    s.write_all(&out).unwrap();
    assert_eq!(
        find_statuses(&mut s),
        vec![0xFF00, 0xFF00, 0xFF00, 0xFF00, 0]
    );

    // the request, its identifier and a C-CANCEL-RQ of it together: cancelled before any match
    let mut cancel = Vec::new();
    element(&mut cancel, 0x0100, &dimse::C_CANCEL_RQ.to_le_bytes());
    element(&mut cancel, 0x0120, &5u16.to_le_bytes());
    element(&mut cancel, 0x0800, &0x0101u16.to_le_bytes());
    let mut out = pdu::encode_pdata(1, true, &rq, 16384);
    out.extend(pdu::encode_pdata(1, false, &[1, 2, 3, 4], 16384));
    out.extend(pdu::encode_pdata(1, true, &cancel, 16384));
    s.write_all(&out).unwrap();
    assert_eq!(find_statuses(&mut s), vec![0xFE00]);

    // a C-GET on the C-FIND context is not served: abort
    let rq = command(dimse::C_GET_RQ, STUDY_FIND, None, true);
    s.write_all(&pdu::encode_pdata(1, true, &rq, 16384))
        .unwrap();
    assert_eq!(read_pdu(&mut s).0, pdu::A_ABORT);
    server.stop(Duration::from_secs(1));
}
