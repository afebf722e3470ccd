//! The DIMSE command set parser of the listener (requests): no panic, an error on bad input,
//! no single allocation beyond a constant factor of the command; a parsed command's text
//! fields come from its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vna_core::dimse;
use vna_core_fuzz::{bounded, parser_bound};

fuzz_target!(|raw: &[u8]| {
    bounded(parser_bound(raw.len(), 4), || {
        if let Ok(cmd) = dimse::parse_command(raw) {
            assert!(cmd.affected_sop_class.len() <= raw.len());
            assert!(cmd.affected_sop_instance.len() <= raw.len());
            assert!(cmd.present.len() <= 64);
            let _ = cmd.missing_for_store();
        }
    });
});
