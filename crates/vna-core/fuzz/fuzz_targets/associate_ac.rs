//! The A-ASSOCIATE-AC parser (the requestor's side, crate::scu): no panic, an error on bad
//! input, no single allocation beyond a constant factor of the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vna_core::pdu;
use vna_core_fuzz::{bounded, parser_bound};

fuzz_target!(|body: &[u8]| {
    bounded(parser_bound(body.len(), 16), || {
        if let Ok(ac) = pdu::parse_associate_ac(body) {
            // every answered context came from an item of the body
            assert!(ac.contexts.len() * 8 <= body.len());
        }
    });
});
