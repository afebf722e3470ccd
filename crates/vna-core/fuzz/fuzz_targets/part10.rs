//! The Part 10 header scanner of the ingest path (crate::part10::scan): the input is a whole
//! file. Properties: no panic; an accepted file has a non-empty transfer syntax, and every
//! element found is a wanted tag, once, in ascending order, whose value is the input's bytes
//! at its offset; no single allocation beyond a constant factor of the input.
#![no_main]

use std::collections::HashMap;
use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use vna_core::part10::{self, DictEntry};
use vna_core_fuzz::{bounded, parser_bound};

fn dictionary(tag: u32) -> DictEntry {
    match tag {
        0x0008_1140 | 0x0040_0275 => DictEntry::Sequence,
        0x0028_0010 | 0x7FE0_0010 => DictEntry::Other,
        _ => DictEntry::Unknown,
    }
}

fuzz_target!(|data: &[u8]| {
    let wanted: HashMap<u32, String> = [
        (0x0008_0016, "UI"),
        (0x0008_0018, "UI"),
        (0x0010_0020, "LO"),
        (0x0028_0010, "US"),
        (0x0020_000D, "UI"),
    ]
    .into_iter()
    .map(|(t, v)| (t, v.to_string()))
    .collect();
    let len = data.len() as u64;
    bounded(parser_bound(data.len(), 2), || {
        let found = part10::scan(Cursor::new(data), len, &wanted, &dictionary, &[])
            .expect("reads from memory do not fail");
        if let Some(header) = found {
            assert!(!header.transfer_syntax.is_empty());
            let mut prev = None;
            for e in &header.elements {
                assert!(wanted.contains_key(&e.tag));
                assert!(prev < Some(e.tag));
                prev = Some(e.tag);
                let start = e.value_offset as usize;
                assert_eq!(&data[start..start + e.length as usize], &e.value[..]);
            }
        }
    });
});
