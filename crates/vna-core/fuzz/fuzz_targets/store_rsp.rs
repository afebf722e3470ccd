//! The C-STORE-RSP side of the send path: `parse_response` on the input, then a whole
//! `Sender::send_store` of a small Part 10 file over an in-memory connection whose peer
//! answers with the input's bytes. The first byte chooses our announced maximum PDU length.
//! Properties: no panic; no hang (the in-memory peer never blocks: its end is a closed
//! connection); no single allocation beyond the larger of the P-DATA-TF read bound and the
//! command set bound; a returned response is the C-STORE-RSP to the message sent.
#![no_main]

use std::io::{self, Read, Write};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vna_core::{dimse, send};
use vna_core_fuzz::{bounded, parser_bound, stored, CT, EXPLICIT};

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
