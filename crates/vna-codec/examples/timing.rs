//! Timing harness: `cargo run --release --example timing -- FILE...` where each FILE is raw
//! little-endian 16-bit samples named `NAME_ROWSxCOLS_SIGNED.raw`. Prints size and MB/s of
//! px2 and px3 (single thread, best of 5).

use vna_codec::{decode, decode_px3, encode, encode_px3, Geometry};

type Enc = fn(&[u8], &Geometry, usize) -> Result<Vec<u8>, vna_codec::Error>;

/// CPU time of this thread, so load on a shared machine does not count.
fn cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn best<T>(f: impl Fn() -> T) -> (f64, T) {
    let mut b = f64::MAX;
    let mut out = f();
    for _ in 0..reps() {
        let t = cpu_s();
        out = f();
        b = b.min(cpu_s() - t);
    }
    (b, out)
}

fn main() {
    if let Ok(mode) = std::env::var("PROFILE") {
        // PROFILE=enc|dec: loop one codec direction on the first file (for perf record)
        let path = std::env::args().nth(1).expect("file");
        let px = std::fs::read(&path).expect("read");
        let g = Geometry {
            rows: 512,
            cols: 512,
            frames: 1,
            bits: 16,
            signed: false,
        };
        let s = encode_px3(&px, &g, 1).unwrap();
        for _ in 0..200 {
            if mode == "enc" {
                std::hint::black_box(encode_px3(&px, &g, 1).unwrap());
            } else {
                std::hint::black_box(decode_px3(&s, &g, 1).unwrap());
            }
        }
        return;
    }
    let mut codecs: Vec<(&str, Enc, Enc)> =
        vec![("px2", encode, decode), ("px3", encode_px3, decode_px3)];
    if std::env::var("PX3_ONLY").is_ok() {
        codecs.remove(0);
    }
    let mut tot = vec![(0usize, 0usize, 0f64, 0f64); codecs.len()];
    for path in std::env::args().skip(1) {
        let px = std::fs::read(&path).expect("read");
        let stem = path.rsplit('/').next().unwrap().trim_end_matches(".raw");
        let parts: Vec<&str> = stem.rsplitn(3, '_').collect();
        let (rc, signed) = (parts[1], parts[0] == "1");
        let (r, c) = rc.split_once('x').unwrap();
        let g = Geometry {
            rows: r.parse().unwrap(),
            cols: c.parse().unwrap(),
            frames: 1,
            bits: 16,
            signed,
        };
        let mut line = format!("{:28}", parts[2]);
        for (k, (name, enc, dec)) in codecs.iter().enumerate() {
            let (te, s) = best(|| enc(&px, &g, 1).unwrap());
            let (td, o) = best(|| dec(&s, &g, 1).unwrap());
            assert_eq!(o, px, "{name} roundtrip");
            let mb = px.len() as f64 / 1e6;
            line += &format!(
                " {name}: {:.3}x enc {:6.1} dec {:6.1} |",
                px.len() as f64 / s.len() as f64,
                mb / te,
                mb / td
            );
            tot[k].0 += px.len();
            tot[k].1 += s.len();
            tot[k].2 += te;
            tot[k].3 += td;
        }
        println!("{line}");
    }
    for (k, (name, _, _)) in codecs.iter().enumerate() {
        let (o, s, te, td) = tot[k];
        println!(
            "total {name}: {:.3}x enc {:.1} MB/s dec {:.1} MB/s",
            o as f64 / s as f64,
            o as f64 / 1e6 / te,
            o as f64 / 1e6 / td
        );
    }
}

/// Repetitions (best taken): `REPS`, default 30 (a loaded machine needs many to find one quiet run).
fn reps() -> usize {
    std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}
