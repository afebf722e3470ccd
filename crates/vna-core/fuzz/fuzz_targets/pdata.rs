//! P-DATA-TF splitting and encoding. The first byte chooses a maximum PDU length; the rest is
//! a P-DATA-TF body. Properties: no panic; the PDVs split out exactly fill the body; no single
//! allocation beyond the body (the splitter must not copy); `encode_pdata` fragments any data
//! into PDUs within the maximum that split back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vna_core::pdu;
use vna_core_fuzz::{bounded, parser_bound};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    bounded(parser_bound(body.len(), 1), || {
        if let Ok(pdvs) = pdu::split_pdvs(body) {
            let mut total = 0usize;
            for pdv in pdvs {
                total += 6 + pdv.data.len();
            }
            assert_eq!(total, body.len());
        }
    });

    // the encoder: data of any length, a maximum of 0 (one PDU) or 7..=1030 bytes
    let max_pdu = if sel == 0 { 0 } else { 6 + u32::from(sel) * 4 };
    let command = sel & 1 == 1;
    let out = pdu::encode_pdata(5, command, body, max_pdu);
    let mut pos = 0usize;
    let mut joined = Vec::with_capacity(body.len());
    let mut last_seen = false;
    while pos < out.len() {
        assert!(!last_seen, "a fragment after the last one");
        let head: &[u8; 6] = out[pos..pos + 6].try_into().unwrap();
        let (kind, len) = pdu::parse_header(head);
        assert_eq!(kind, pdu::P_DATA_TF);
        if max_pdu != 0 {
            assert!(
                len <= max_pdu,
                "P-DATA-TF of {len} bytes over the maximum {max_pdu}"
            );
        }
        let pdu_body = &out[pos + 6..pos + 6 + len as usize];
        for pdv in pdu::split_pdvs(pdu_body).expect("our own P-DATA-TF splits") {
            assert_eq!(pdv.context_id, 5);
            assert_eq!(pdv.is_command(), command);
            last_seen = pdv.is_last();
            joined.extend_from_slice(pdv.data);
        }
        pos += 6 + len as usize;
    }
    assert!(last_seen);
    assert_eq!(joined, body);
});
