// The round-trip cases both codecs pass, included by roundtrip.rs once per codec (`encode`/`decode` in scope).

fn geom(rows: usize, cols: usize, frames: usize, bits: u32, signed: bool) -> Geometry {
    Geometry {
        rows,
        cols,
        frames,
        bits,
        signed,
    }
}

fn roundtrip(px: &[u8], g: &Geometry, threads: usize) -> Vec<u8> {
    let s = encode(px, g, threads).expect("encode");
    assert_eq!(decode(&s, g, threads).expect("decode"), px);
    assert_eq!(decode(&s, g, 1).expect("decode 1 thread"), px);
    s
}

fn smooth(rows: usize, cols: usize, frames: usize, bits: u32, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::new();
    for f in 0..frames {
        for r in 0..rows {
            for c in 0..cols {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = ((r * 7 + c * 3 + f * 11) as u64 * 13 + (x % 9)) as u32;
                if bits == 8 {
                    out.push(v as u8);
                } else {
                    out.extend_from_slice(&(v as u16).to_le_bytes());
                }
            }
        }
    }
    out
}

#[test]
fn shapes_and_extremes() {
    for bits in [8u32, 16] {
        let maxv: u16 = if bits == 8 { 255 } else { 65535 };
        for (r, c) in [(1, 1), (1, 300), (300, 1), (2, 2), (65, 129)] {
            for signed in [false, true] {
                let g = geom(r, c, 2, bits, signed);
                let n = r * c * 2;
                let pats: Vec<Vec<u16>> = vec![
                    vec![0; n],
                    vec![maxv; n],
                    (0..n).map(|i| if i % 2 == 0 { 0 } else { maxv }).collect(),
                    (0..n)
                        .map(|i| (i * 2_654_435_761usize % 65_536) as u16 & maxv)
                        .collect(),
                ];
                for p in pats {
                    let px: Vec<u8> = if bits == 8 {
                        p.iter().map(|&v| v as u8).collect()
                    } else {
                        p.iter().flat_map(|v| v.to_le_bytes()).collect()
                    };
                    roundtrip(&px, &g, 3);
                }
            }
        }
    }
}

#[test]
fn constant_image_codes_small_and_smooth_beats_raw() {
    let g = geom(512, 512, 1, 16, false);
    let s = roundtrip(&vec![0u8; 512 * 512 * 2], &g, 1);
    assert!(s.len() < 512 * 512 * 2 / 150, "{}", s.len());
    let px = smooth(256, 256, 3, 16, 7);
    let s = roundtrip(&px, &geom(256, 256, 3, 16, false), 2);
    assert!(s.len() * 3 < px.len());
}

#[test]
fn wrong_input_is_refused() {
    let g = geom(4, 4, 1, 16, false);
    assert!(matches!(encode(&[0; 31], &g, 1), Err(Error::Input(_))));
    assert!(matches!(
        encode(&[0; 16], &geom(4, 4, 1, 12, false), 1),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        encode(&[], &geom(0, 4, 1, 8, false), 1),
        Err(Error::Input(_))
    ));
    let huge = geom(65535, 65535, u32::MAX as usize, 16, false);
    assert!(decode(&[0; 64], &huge, 1).is_err());
}

#[test]
fn truncated_and_extended_streams_are_refused() {
    let g = geom(40, 33, 3, 16, true);
    let px = smooth(40, 33, 3, 16, 3);
    let s = roundtrip(&px, &g, 2);
    for cut in 0..s.len() {
        assert!(decode(&s[..cut], &g, 2).is_err(), "cut {cut}");
    }
    let mut longer = s.clone();
    longer.push(0);
    assert!(decode(&longer, &g, 1).is_err());
    assert!(decode(&s, &geom(40, 33, 2, 16, true), 1).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_pixels_roundtrip(rows in 1usize..24, cols in 1usize..24, frames in 1usize..4,
                            wide in any::<bool>(), signed in any::<bool>(), threads in 1usize..4,
                            seed in any::<u64>(), random in any::<bool>()) {
        let bits = if wide { 16 } else { 8 };
        let g = geom(rows, cols, frames, bits, signed);
        let n = rows * cols * frames * (bits as usize / 8);
        let px = if random {
            let mut x = seed | 1;
            (0..n).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect()
        } else {
            smooth(rows, cols, frames, bits, seed)
        };
        roundtrip(&px, &g, threads);
    }

    #[test]
    fn damaged_streams_never_panic(flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..6),
                                   seed in any::<u64>()) {
        let g = geom(17, 23, 2, 16, false);
        let px = smooth(17, 23, 2, 16, seed);
        let mut s = encode(&px, &g, 1).unwrap();
        for (pos, x) in flips {
            let i = pos % s.len();
            s[i] ^= x;
        }
        // either refused or some pixels: never a panic (wrong pixels are the caller's CRC's to catch)
        if let Ok(out) = decode(&s, &g, 2) {
            prop_assert_eq!(out.len(), px.len());
        }
    }

    #[test]
    fn arbitrary_streams_never_panic(stream in proptest::collection::vec(any::<u8>(), 0..200),
                                     rows in 1usize..9, cols in 1usize..9, frames in 1usize..3,
                                     wide in any::<bool>()) {
        let g = geom(rows, cols, frames, if wide { 16 } else { 8 }, false);
        let _ = decode(&stream, &g, 1);
    }
}
