//! `vna-codec`: lossless coding of greyscale pixel data (8 or 16 bits per
//! sample, little endian), the pixel stream of `dicom-px2` frames.
//!
//! Each frame of an image is coded independently (so frames code in parallel):
//! a blend of four predictors (gradient, W+NE-N, N, W) weighted by the inverse
//! square of their recent errors, a LOCO-I bias correction per context, and the
//! residual (modulo 2^bits, zigzag mapped) as a token (its bit length) coded
//! with adaptive binary probabilities chosen by the local error activity, the
//! top mantissa bit modelled per token and the remaining bits stored raw.
//!
//! Two stream formats, both decodable forever: px2 ([`encode`]/[`decode`], the
//! adaptive coder above) and px3 ([`encode_px3`]/[`decode_px3`]: a predictor
//! chosen per strip of rows and static per-context rANS, several times faster
//! at a slightly lower ratio; see `px3.rs`).
//!
//! px2 stream: per frame `arith_len u32 | raw_len u32 | arith bytes | raw bits`.
//! [`decode`] never panics and refuses any stream that is not exactly what
//! [`encode`] writes for the given geometry (truncated, extended, or a token
//! out of range); wrong bytes that still parse are caught by the caller's CRC.

mod gray;
mod px3;
mod rc;

use std::fmt;

use gray::{code_frame, Dec, Enc};
use rc::{BitReader, BitWriter, Decoder, Encoder};

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The arguments do not describe the pixels given (size, bits).
    Input(String),
    /// The stream is damaged or not a stream of this geometry.
    Corrupt(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Input(m) => write!(f, "invalid input: {m}"),
            Error::Corrupt(m) => write!(f, "corrupt pixel stream: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// The geometry of the pixels: `frames` frames of `rows` x `cols` samples of `bits` (8 or 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub rows: usize,
    pub cols: usize,
    pub frames: usize,
    pub bits: u32,
    /// Two's complement samples: the sign bit is flipped before coding (order-preserving).
    pub signed: bool,
}

impl Geometry {
    fn check(&self) -> Result<usize, Error> {
        if self.bits != 8 && self.bits != 16 {
            return Err(Error::Input(format!(
                "bits must be 8 or 16, not {}",
                self.bits
            )));
        }
        if self.rows == 0 || self.cols == 0 || self.frames == 0 {
            return Err(Error::Input("empty geometry".into()));
        }
        self.rows
            .checked_mul(self.cols)
            .and_then(|n| n.checked_mul(self.frames))
            .and_then(|n| n.checked_mul(self.bytes_per_sample()))
            .ok_or_else(|| Error::Input("geometry overflows".into()))
    }

    fn bytes_per_sample(&self) -> usize {
        (self.bits / 8) as usize
    }

    fn frame_bytes(&self) -> usize {
        self.rows * self.cols * self.bytes_per_sample()
    }

    fn sign_flip(&self) -> u16 {
        match (self.signed, self.bits) {
            (false, _) => 0,
            (true, 8) => 0x80,
            (true, _) => 0x8000,
        }
    }
}

fn samples_of(frame: &[u8], g: &Geometry) -> Vec<u16> {
    let flip = g.sign_flip();
    if g.bits == 8 {
        frame.iter().map(|&b| u16::from(b) ^ flip).collect()
    } else {
        frame
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) ^ flip)
            .collect()
    }
}

fn encode_frame(frame: &[u8], g: &Geometry) -> Vec<u8> {
    let mut img = samples_of(frame, g);
    let mut io = Enc {
        rc: Encoder::new(),
        raw: BitWriter::default(),
    };
    code_frame(&mut img, g.rows, g.cols, g.bits, &mut io);
    let arith = io.rc.finish();
    let raw = io.raw.finish();
    let mut out = Vec::with_capacity(8 + arith.len() + raw.len());
    out.extend_from_slice(&(arith.len() as u32).to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&arith);
    out.extend_from_slice(&raw);
    out
}

fn decode_frame(arith: &[u8], raw: &[u8], g: &Geometry, out: &mut [u8]) -> Result<(), Error> {
    let mut img = vec![0u16; g.rows * g.cols];
    let mut io = Dec {
        rc: Decoder::new(arith),
        raw: BitReader::new(raw),
    };
    let tokens_ok = code_frame(&mut img, g.rows, g.cols, g.bits, &mut io);
    if !tokens_ok {
        return Err(Error::Corrupt("residual token out of range".into()));
    }
    if io.rc.overrun || io.rc.consumed() != arith.len() {
        return Err(Error::Corrupt(
            "arithmetic-coded part has the wrong length".into(),
        ));
    }
    if !io.raw.at_clean_end() {
        return Err(Error::Corrupt("raw-bit part has the wrong length".into()));
    }
    let flip = g.sign_flip();
    if g.bits == 8 {
        for (o, &v) in out.iter_mut().zip(&img) {
            *o = (v ^ flip) as u8;
        }
    } else {
        for (o, &v) in out.chunks_exact_mut(2).zip(&img) {
            o.copy_from_slice(&(v ^ flip).to_le_bytes());
        }
    }
    Ok(())
}

const MAX_SAMPLES_PER_BYTE: usize = 256;

fn workers(threads: usize, frames: usize) -> usize {
    threads.clamp(1, frames.max(1))
}

/// Code `pixels` (little-endian samples of geometry `g`) using up to `threads` threads (frames in parallel).
pub fn encode(pixels: &[u8], g: &Geometry, threads: usize) -> Result<Vec<u8>, Error> {
    let size = g.check()?;
    if pixels.len() != size {
        return Err(Error::Input(format!(
            "{} pixel bytes, geometry says {size}",
            pixels.len()
        )));
    }
    let fb = g.frame_bytes();
    let frames: Vec<&[u8]> = pixels.chunks_exact(fb).collect();
    let n = workers(threads, frames.len());
    let coded: Vec<Vec<u8>> = if n == 1 {
        frames.iter().map(|f| encode_frame(f, g)).collect()
    } else {
        let per = frames.len().div_ceil(n);
        std::thread::scope(|s| {
            let handles: Vec<_> = frames
                .chunks(per)
                .map(|group| {
                    s.spawn(move || group.iter().map(|f| encode_frame(f, g)).collect::<Vec<_>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    };
    Ok(coded.concat())
}

/// The (arith, raw) parts of every frame of `stream`, checked to tile it exactly.
/// One frame's (arithmetic-coded, raw-bit) parts.
type Parts<'a> = (&'a [u8], &'a [u8]);

fn split(stream: &[u8], frames: usize) -> Result<Vec<Parts<'_>>, Error> {
    let mut parts = Vec::with_capacity(frames.min(1 << 16));
    let mut pos = 0usize;
    for _ in 0..frames {
        let head = stream
            .get(pos..pos + 8)
            .ok_or_else(|| Error::Corrupt("truncated frame header".into()))?;
        let alen = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let rlen = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let a0 = pos + 8;
        let r0 = a0
            .checked_add(alen)
            .ok_or_else(|| Error::Corrupt("length overflow".into()))?;
        let end = r0
            .checked_add(rlen)
            .ok_or_else(|| Error::Corrupt("length overflow".into()))?;
        if end > stream.len() {
            return Err(Error::Corrupt(
                "frame runs past the end of the stream".into(),
            ));
        }
        parts.push((&stream[a0..r0], &stream[r0..end]));
        pos = end;
    }
    if pos != stream.len() {
        return Err(Error::Corrupt(format!(
            "{} bytes after the last frame",
            stream.len() - pos
        )));
    }
    Ok(parts)
}

/// Restore the pixels [`encode`] coded with geometry `g`; refuses a damaged stream.
pub fn decode(stream: &[u8], g: &Geometry, threads: usize) -> Result<Vec<u8>, Error> {
    let size = g.check()?;
    // the coder spends at least ~0.05 bit per sample (five decisions at a probability of at
    // most 2033/2048): a geometry far larger than the stream can hold is refused unallocated
    let samples = size / g.bytes_per_sample();
    if samples / MAX_SAMPLES_PER_BYTE > stream.len() {
        return Err(Error::Corrupt("stream too short for the geometry".into()));
    }
    let parts = split(stream, g.frames)?;
    decode_frames(&parts, size, g, threads, |(a, r), o| {
        decode_frame(a, r, g, o)
    })
}

/// Decode `items` (one per frame) into a `size`-byte buffer, frames in parallel on up to `threads`
/// threads; `frame` fills one frame's bytes.
fn decode_frames<T: Sync>(
    items: &[T],
    size: usize,
    g: &Geometry,
    threads: usize,
    frame: impl Fn(&T, &mut [u8]) -> Result<(), Error> + Sync,
) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; size];
    let fb = g.frame_bytes();
    let n = workers(threads, items.len());
    if n == 1 {
        for (item, o) in items.iter().zip(out.chunks_exact_mut(fb)) {
            frame(item, o)?;
        }
        return Ok(out);
    }
    let per = items.len().div_ceil(n);
    let frame = &frame;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .zip(out.chunks_mut(per * fb))
            .map(|(group, dst)| {
                s.spawn(move || {
                    for (item, o) in group.iter().zip(dst.chunks_exact_mut(fb)) {
                        frame(item, o)?;
                    }
                    Ok::<(), Error>(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    })?;
    Ok(out)
}

fn parallel_encode(
    pixels: &[u8],
    g: &Geometry,
    threads: usize,
    frame: fn(&[u8], &Geometry) -> Vec<u8>,
) -> Result<Vec<u8>, Error> {
    let size = g.check()?;
    if pixels.len() != size {
        return Err(Error::Input(format!(
            "{} pixel bytes, geometry says {size}",
            pixels.len()
        )));
    }
    let frames: Vec<&[u8]> = pixels.chunks_exact(g.frame_bytes()).collect();
    let n = workers(threads, frames.len());
    if n == 1 {
        return Ok(frames.iter().flat_map(|f| frame(f, g)).collect());
    }
    let per = frames.len().div_ceil(n);
    let coded: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = frames
            .chunks(per)
            .map(|group| s.spawn(move || group.iter().map(|f| frame(f, g)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    Ok(coded.concat())
}

/// Code `pixels` as a `px3` stream (fast static-model coder; frames in parallel on up to `threads` threads).
pub fn encode_px3(pixels: &[u8], g: &Geometry, threads: usize) -> Result<Vec<u8>, Error> {
    parallel_encode(pixels, g, threads, px3::encode_frame)
}

/// Restore the pixels [`encode_px3`] coded with geometry `g`; refuses a damaged stream.
pub fn decode_px3(stream: &[u8], g: &Geometry, threads: usize) -> Result<Vec<u8>, Error> {
    let size = g.check()?;
    // every coded sample costs at least 0.0227 bit: a geometry far larger than the stream can
    // describe is refused before anything is allocated
    let samples = size / g.bytes_per_sample();
    if samples / px3::MAX_SAMPLES_PER_BYTE > stream.len() {
        return Err(Error::Corrupt("stream too short for the geometry".into()));
    }
    let mut bodies = Vec::with_capacity(g.frames.min(1 << 16));
    let mut pos = 0usize;
    for _ in 0..g.frames {
        let head = stream
            .get(pos..pos + 4)
            .ok_or_else(|| Error::Corrupt("truncated frame header".into()))?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let end = (pos + 4)
            .checked_add(len)
            .filter(|&e| e <= stream.len())
            .ok_or_else(|| Error::Corrupt("frame runs past the end of the stream".into()))?;
        bodies.push(&stream[pos + 4..end]);
        pos = end;
    }
    if pos != stream.len() {
        return Err(Error::Corrupt(format!(
            "{} bytes after the last frame",
            stream.len() - pos
        )));
    }
    decode_frames(&bodies, size, g, threads, |b, o| px3::decode_frame(b, g, o))
}
