//! The requestor (crate::scu) against an acceptor on loopback that answers with the input's
//! bytes: `Association::request`, then, if it succeeds, one C-STORE of a small file with
//! each accepted context that fits, and the release. The acceptor reads the A-ASSOCIATE-RQ,
//! writes the input, half-closes and drains.
//!
//! Properties: no panic; no hang (every step ends in an outcome or an error once the acceptor
//! closed); an established association only holds contexts that were proposed; no single
//! allocation beyond MAX_ASSOCIATE_RQ before the association is established, nor beyond the
//! larger of our maximum PDU (plus its slack) and the command set bound after.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vna_core::scu::{Association, ContextProposal, Instance, ScuConfig};
use vna_core::server::MAX_ASSOCIATE_RQ;
use vna_core::{pdu, send};
use vna_core_fuzz::{set_limit, stored, CT, EXPLICIT, IMPLICIT, MR, VERIFICATION};

const MAX_PDU: u32 = 4096;

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| {
        // SAFETY: ignoring SIGPIPE (libFuzzer's main does not), before any thread writes.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        TcpListener::bind("127.0.0.1:0").expect("a loopback listener")
    })
}

/// The acceptor: read the A-ASSOCIATE-RQ, answer `answer`, half-close, drain until closed.
fn accept_one(l: &TcpListener, answer: &[u8]) {
    let Ok((mut s, _)) = l.accept() else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let mut head = [0u8; 6];
    if s.read_exact(&mut head).is_err() {
        return;
    }
    let (_, len) = pdu::parse_header(&head);
    let mut left = len as usize;
    let mut buf = [0u8; 4096];
    while left > 0 {
        match s.read(&mut buf[..left.min(4096)]) {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n,
        }
    }
    let _ = s.write_all(answer);
    let _ = s.shutdown(Shutdown::Write);
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                assert!(
                    !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                    "the requestor hung: it neither closed nor went on"
                );
                return;
            }
        }
    }
}

fuzz_target!(|answer: &[u8]| {
    let l = listener();
    let port = l.local_addr().unwrap().port();
    let cfg = ScuConfig {
        calling_ae: "VNA".into(),
        called_ae: "PEER".into(),
        max_pdu: MAX_PDU,
        implementation_class_uid: "1.2.826.0.1.3680043.9.7433.1".into(),
        implementation_version: "VNA_FUZZ".into(),
        connect_timeout: Duration::from_secs(5),
        acse_timeout: Duration::from_secs(5),
        network_timeout: Duration::from_secs(5),
        dimse_timeout: Duration::from_secs(5),
        whole_read_limit: 1 << 20,
    };
    let proposals = [
        ContextProposal {
            abstract_syntax: CT.into(),
            transfer_syntaxes: vec![EXPLICIT.into(), IMPLICIT.into()],
        },
        ContextProposal {
            abstract_syntax: VERIFICATION.into(),
            transfer_syntaxes: vec![IMPLICIT.into()],
        },
        ContextProposal {
            abstract_syntax: MR.into(),
            transfer_syntaxes: vec![EXPLICIT.into()],
        },
    ];
    let (path, sha) = stored();
    std::thread::scope(|s| {
        s.spawn(|| accept_one(l, answer));
        set_limit(MAX_ASSOCIATE_RQ as usize);
        let result = Association::request("127.0.0.1", port, cfg, &proposals, &[]);
        if let Ok(mut assoc) = result {
            set_limit((MAX_PDU as usize + 6).max(send::MAX_COMMAND));
            for cx in assoc.accepted() {
                let proposed = proposals
                    .iter()
                    .find(|p| p.abstract_syntax == cx.abstract_syntax);
                assert!(proposed.is_some_and(|p| p.transfer_syntaxes.contains(&cx.transfer_syntax)));
                assert_eq!(cx.id % 2, 1);
            }
            let instance = Instance {
                sop_class_uid: CT,
                sop_instance_uid: "1.2.3.45",
                transfer_syntax: EXPLICIT,
                path: Path::new(path),
                sha256: sha,
            };
            match assoc.send_store(&instance, None) {
                Ok(outcome) => assert_eq!(outcome.response.message_id_responded, 1),
                Err(send::SendError::Link(_)) => {}
                Err(send::SendError::Unusable(_)) => {
                    assert!(assoc.context_for(CT, EXPLICIT).is_none())
                }
                Err(e) => panic!("the stored file is good, yet: {e}"),
            }
            let _ = assoc.release();
        }
        set_limit(usize::MAX);
    });
});
