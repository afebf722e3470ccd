//! Any pixels of a geometry taken from the first bytes: px3 restores them exactly, on 1 or 2 threads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vna_codec::{decode_px3, encode_px3, Geometry};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let bits = if data[3] & 1 == 0 { 8 } else { 16 };
    let cols = usize::from(data[0] % 64) + 1;
    let frames = usize::from(data[2] % 3) + 1;
    let per_row = cols * (bits as usize / 8) * frames;
    let rows = (data.len() - 4) / per_row;
    if rows == 0 {
        return;
    }
    let g = Geometry { rows, cols, frames, bits, signed: data[3] & 2 != 0 };
    let px = &data[4..4 + rows * per_row];
    let s = encode_px3(px, &g, 1 + usize::from(data[1] & 1)).expect("encode");
    assert_eq!(decode_px3(&s, &g, 2).expect("decode"), px);
});
