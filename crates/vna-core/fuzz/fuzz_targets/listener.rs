//! The listener's association state machine, through a real loopback socket: one
//! `server::Server` per process (Verification and CT/MR storage, max PDU 4096), one
//! connection per input. The client sends the input's first PDU (as its header frames it),
//! waits for the server's first answer, then sends the rest and half-closes.
//!
//! Properties: no panic on any association thread (libFuzzer's panic hook aborts the
//! process); no hang (the server answers or closes within the client's timeout); no single
//! allocation beyond MAX_ASSOCIATE_RQ before the association is established, nor beyond the
//! larger of our maximum PDU (plus its slack) and the command set bound after.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vna_core::pdu;
use vna_core::server::{
    self, Config, Decision, Handler, Level, Peer, StoreAnswer, StoreRecord, MAX_ASSOCIATE_RQ,
};
use vna_core_fuzz::{set_limit, supported, unknown_storage};

const MAX_PDU: u32 = 4096;
/// How long the client waits for the server: far above anything it should take.
const CLIENT_WAIT: Duration = Duration::from_secs(20);

struct Accepting;

impl Handler for Accepting {
    fn associate(&self, _peer: &Peer, rq: &pdu::AssociateRq) -> Decision {
        if rq.calling_ae() == "REJECTME" {
            Decision::Reject(1, 1, 3)
        } else {
            Decision::Accept
        }
    }
    fn store(&self, record: &StoreRecord) -> StoreAnswer {
        assert!(record.path.exists(), "the spool file is handed over");
        StoreAnswer {
            status: if record.size.is_multiple_of(2) {
                0
            } else {
                0xA900
            },
            comment: Some("fuzz\\answer\u{7f}".into()),
        }
    }
    fn log(&self, level: Level, message: &str) {
        assert!(
            !message.contains("internal error"),
            "an association thread failed: {message}"
        );
        if std::env::var_os("VNA_FUZZ_LOG").is_some() {
            eprintln!("{level:?}: {message}");
        }
    }
}

fn server_addr() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        // libFuzzer's main does not ignore SIGPIPE as a Rust main does: a write to a connection
        // the server closed must be an error, not the end of the process
        // SAFETY: setting a signal's disposition to SIG_IGN, before any thread writes.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let spool =
            std::env::temp_dir().join(format!("vna-core-fuzz-spool-{}", std::process::id()));
        std::fs::create_dir_all(&spool).expect("a spool directory");
        let cfg = Config {
            host: "127.0.0.1".into(),
            port: 0,
            reuse_port: false,
            max_pdu: MAX_PDU,
            max_associations: 64,
            max_half_open: 0,
            max_per_address: 0,
            acse_timeout: Duration::from_secs(5),
            network_timeout: Duration::from_secs(5),
            dimse_timeout: Duration::from_secs(5),
            spool_dir: spool,
            implementation_class_uid: "1.2.826.0.1.3680043.9.7433.1".into(),
            implementation_version: "VNA_FUZZ".into(),
            spool_implementation_uid: "1.2.826.0.1.3680043.9.7433.1".into(),
            spool_implementation_version: "VNA_FUZZ".into(),
            contexts: supported(),
            unknown_storage: Some(unknown_storage()),
        };
        let srv = server::Server::start(cfg, Accepting).expect("the listener starts");
        let addr = srv.local_addr();
        std::mem::forget(srv); // serves until the process ends
        addr
    })
}

/// Read what the server sends until it closes; the first byte read (if any).
fn read_until_closed(stream: &mut TcpStream, first_only: bool) -> Option<u8> {
    let deadline = Instant::now() + CLIENT_WAIT;
    let mut buf = [0u8; 4096];
    let mut first = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the listener hung: no answer and no close");
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return first,
            Ok(_) => {
                first = first.or(Some(buf[0]));
                if first_only {
                    return first;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the listener hung: no answer and no close")
            }
            Err(_) => return first, // reset by the server's abort
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let addr = server_addr();
    if data.len() < 6 {
        return;
    }
    let (_, len) = pdu::parse_header(data[..6].try_into().unwrap());
    let first_len = (6 + len as usize).min(data.len());
    let (first, rest) = data.split_at(first_len);

    set_limit(MAX_ASSOCIATE_RQ as usize);
    let mut stream = TcpStream::connect(addr).expect("connect to the listener");
    stream.set_nodelay(true).unwrap();
    let sent = stream.write_all(first);
    let answer = if rest.is_empty() {
        let _ = stream.shutdown(Shutdown::Write);
        None
    } else {
        if sent.is_ok() {
            read_until_closed(&mut stream, true)
        } else {
            None
        }
    };
    if answer == Some(pdu::A_ASSOCIATE_AC) {
        // associated: from here on the listener's buffers are bounded by our maximum PDU
        set_limit((MAX_PDU as usize + 6).max(server::MAX_COMMAND));
    }
    if rest.is_empty() || answer.is_none() {
        let _ = stream.shutdown(Shutdown::Write);
        read_until_closed(&mut stream, false);
    } else {
        // write on another thread: the listener may answer while the rest goes out
        let mut writer = stream.try_clone().expect("a second handle");
        std::thread::scope(|s| {
            s.spawn(move || {
                let _ = writer.write_all(rest);
                let _ = writer.shutdown(Shutdown::Write);
            });
            read_until_closed(&mut stream, false);
        });
    }
    set_limit(usize::MAX);
});
