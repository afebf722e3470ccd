//! Any bytes as a px3 stream of a small geometry taken from the first bytes: never a panic,
//! and what decodes has exactly the geometry's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vna_codec::{decode, decode_px3, Geometry};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let g = Geometry {
        rows: usize::from(data[0] % 40) + 1,
        cols: usize::from(data[1] % 40) + 1,
        frames: usize::from(data[2] % 3) + 1,
        bits: if data[3] & 1 == 0 { 8 } else { 16 },
        signed: data[3] & 2 != 0,
    };
    let size = g.rows * g.cols * g.frames * (g.bits as usize / 8);
    for out in [decode_px3(&data[4..], &g, 1), decode(&data[4..], &g, 1)].into_iter().flatten() {
        assert_eq!(out.len(), size);
    }
});
