//! The C-STORE-RSP side of the send path: `parse_response` on the input, then a whole
//! `Sender::send_store` of a small Part 10 file over an in-memory connection whose peer
//! answers with the input's bytes. The first byte chooses our announced maximum PDU length.
//! Properties: no panic; no hang (the in-memory peer never blocks: its end is a closed
//! connection); no single allocation beyond the larger of the P-DATA-TF read bound and the
//! command set bound; a returned response is the C-STORE-RSP to the message sent.
#![no_main]

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use vna_core::{dimse, send};
use vna_core_fuzz::{bounded, parser_bound, CT, EXPLICIT};

/// The peer: reads come from the input, writes are counted and dropped.
struct Peer<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // short reads, as a socket gives them
        let n = buf.len().min(self.input.len()).min(1 + self.written % 997);
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl send::Transport for Peer<'_> {
    fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// A small Part 10 file (vna's spool header and a 2-element data set) and its SHA-256.
fn stored() -> &'static (PathBuf, String) {
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

fuzz_target!(|data: &[u8]| {
    bounded(parser_bound(data.len(), 4), || {
        if let Ok(rsp) = send::parse_response(data) {
            assert!(rsp.offending_elements.len() <= 16);
        }
    });

    let Some((&sel, answer)) = data.split_first() else {
        return;
    };
    let (path, sha) = stored();
    let our_max_pdu = match sel {
        0 => 0,
        n => 16 + u32::from(n) * 8,
    };
    let mut settings = send::SendSettings::new(u32::from(sel) * 3, our_max_pdu);
    settings.network_timeout = Duration::from_secs(5);
    settings.response_timeout = Duration::from_secs(5);
    let bound = (settings.max_pdata_read() as usize).max(send::MAX_COMMAND);
    let mut sender = send::Sender::new(settings);
    let req = send::StoreRequest {
        context_id: 3,
        transfer_syntax: EXPLICIT,
        message_id: 9,
        sop_class_uid: CT,
        sop_instance_uid: "1.2.3.45",
        priority: 0,
        move_originator: None,
    };
    let mut peer = Peer {
        input: answer,
        written: 0,
    };
    let (result, _) = bounded(bound, || sender.send_store(&mut peer, &req, path, sha));
    match result {
        Ok(outcome) => {
            assert_eq!(outcome.response.command_field, dimse::C_STORE_RSP);
            assert_eq!(outcome.response.message_id_responded, 9);
            assert!(!outcome.response.has_data_set);
        }
        Err(send::SendError::Link(_)) => {}
        Err(other) => panic!("the file and request are good, yet: {other}"),
    }
});
