//! The Part 10 File Meta scan of the send path (crate::send::parse_file_meta): the input is a
//! whole file, and also the head of a longer one. Properties: no panic; an accepted layout
//! puts the data set after the preamble, within the bytes read and the file, with a valid
//! transfer syntax UID; no single allocation beyond a constant factor of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vna_core::{dimse, send};
use vna_core_fuzz::{bounded, parser_bound};

fuzz_target!(|head: &[u8]| {
    let len = head.len() as u64;
    for file_size in [len, len + 1, len + 1_000_000] {
        bounded(parser_bound(head.len(), 2), || {
            if let Ok(layout) = send::parse_file_meta(head, file_size) {
                assert!(layout.data_set_offset >= 132);
                assert!(layout.data_set_offset + 8 <= len);
                assert_eq!(layout.file_size, file_size);
                assert!(layout.data_set_length() >= 8);
                assert!(dimse::valid_uid(&layout.transfer_syntax));
                for uid in [&layout.sop_class_uid, &layout.sop_instance_uid]
                    .into_iter()
                    .flatten()
                {
                    assert!(dimse::valid_uid(uid));
                }
            }
        });
    }
});
