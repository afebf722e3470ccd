//! The `px3` pixel stream: a fast static-model coder for greyscale frames.
//!
//! Per frame: the encoder picks one of [`NPRED`] fixed predictors for every
//! strip of [`STRIP`] rows (the one with the smallest estimated cost), codes
//! the zigzag residual (modulo 2^bits) as a token (values below 16 as
//! themselves, larger ones as their bit length and top mantissa bit) plus raw
//! low bits, and codes the tokens with two interleaved rANS states over static
//! per-context frequency tables. The context is the bucketed sum of the
//! neighbouring residuals (N, NW, NE of the previous row, twice W), and
//! adjacent buckets are merged where one table is cheaper than two. Contexts
//! only depend on residuals, so the decoder decodes a row of residuals and then
//! rebuilds the row's pixels with the strip's predictor.
//!
//! Frame: `body_len u32 | body`, body = `ngroups u8 | ngroups-1 bucket
//! boundaries u8 | predictor u8 per strip | per group: nsym u8, nsym LEB128
//! frequencies (sum 4096) | nwords u32 | raw_len u32 | nwords u16 rANS words |
//! raw_len bytes of raw bits (LSB first)`. The decoder checks every field, that
//! the rANS states end where the encoder started them and that both parts are
//! consumed exactly; it never panics.

use crate::{Error, Geometry};

const PREC: u32 = 12;
const M: u32 = 1 << PREC;
/// No frequency above this: every symbol costs at least log2(4096/4032) = 0.0227 bit,
/// which bounds the samples a stream can describe (see [`MAX_SAMPLES_PER_BYTE`]).
const MAX_FREQ: u32 = M - 64;
/// Samples per stream byte a valid stream cannot exceed (8 / 0.0227 = 352).
pub(crate) const MAX_SAMPLES_PER_BYTE: usize = 352;
const RANS_L: u32 = 1 << 16;
const FINE: usize = 16;
const STRIP: usize = 32;
const NPRED: usize = 7;
const ALPHA: usize = 40;

fn alphabet(bits: u32) -> usize {
    if bits == 8 {
        24
    } else {
        ALPHA
    }
}

#[inline(always)]
fn token(z: u32) -> (u32, u32) {
    if z < 16 {
        (z, 0)
    } else {
        let n = 31 - z.leading_zeros();
        (16 + (n - 4) * 2 + ((z >> (n - 1)) & 1), n - 1)
    }
}

/// (raw bit count, base value) of every token.
fn token_table() -> [(u32, u32); ALPHA] {
    let mut t = [(0u32, 0u32); ALPHA];
    for (k, e) in t.iter_mut().enumerate() {
        let k = k as u32;
        *e = if k < 16 {
            (0, k)
        } else {
            let n = 4 + (k - 16) / 2;
            (n - 1, (1 << n) | (((k - 16) & 1) << (n - 1)))
        };
    }
    t
}

/// floor(log2(act + 1)), at most 15 (the float exponent: exact for act < 2^24, and vectorisable).
#[inline(always)]
fn bucket(act: u32) -> usize {
    (((act as f32 + 1.0).to_bits() >> 23) - 127).min(FINE as u32 - 1) as usize
}

/// The activity of a pixel's neighbourhood: its previous row's residuals (NW + 2N + NE).
#[inline(always)]
fn act(nw: u32, n: u32, ne: u32) -> u32 {
    nw + 2 * n + ne
}

#[inline(always)]
fn rans_step(s: &mut u32, base: u32, table: &[u32], words: &[u16], wp: &mut usize) -> u8 {
    let e = table[(base | (*s & (M - 1))) as usize];
    let x = (e & 0x1FFF) * (*s >> PREC) + ((e >> 13) & 0xFFF);
    let need = x < RANS_L;
    // words has one zero of padding; a stream that reads past it is refused at the end
    let w = u32::from(words[(*wp).min(words.len() - 1)]);
    *s = if need { (x << 16) | w } else { x };
    *wp += usize::from(need);
    (e >> 25) as u8
}

#[inline(always)]
fn zigzag(d: i32) -> u32 {
    ((d << 1) ^ (d >> 31)) as u32
}

#[inline(always)]
fn unzigzag(z: u32) -> i32 {
    ((z >> 1) as i32) ^ -((z & 1) as i32)
}

#[inline(always)]
fn predict<const P: usize>(w: i32, n: i32, nw: i32, ne: i32) -> i32 {
    match P {
        0 => {
            let (lo, hi) = if w < n { (w, n) } else { (n, w) };
            (w + n - nw).clamp(lo, hi)
        }
        1 => w + n - nw,
        2 => (w + n) >> 1,
        3 => w,
        4 => n,
        5 => w + ((ne - nw) >> 1),
        _ => (3 * (w + n) - 2 * nw + 2) >> 2,
    }
}

/// Residuals `z` of one row (`y > 0`): `pp` is the previous row padded by one
/// on each side (pads = its end samples), `cw` the row shifted right by one
/// (`cw[0]` = the previous row's first sample, the W of x = 0), `cur` the row.
#[inline(always)]
fn residual_row<const P: usize>(
    pp: &[i32],
    cw: &[i32],
    cur: &[i32],
    z: &mut [u16],
    mask: i32,
    half: i32,
) {
    let cols = cur.len();
    let (pp, cw, z) = (&pp[..cols + 2], &cw[..cols], &mut z[..cols]);
    for x in 0..cols {
        let p = predict::<P>(cw[x], pp[x + 1], pp[x], pp[x + 2]);
        z[x] = zigzag((((cur[x] - p) + half) & mask) - half) as u16;
    }
}

fn residual_row_dyn(
    k: usize,
    pp: &[i32],
    cw: &[i32],
    cur: &[i32],
    z: &mut [u16],
    mask: i32,
    half: i32,
) {
    match k {
        0 => residual_row::<0>(pp, cw, cur, z, mask, half),
        1 => residual_row::<1>(pp, cw, cur, z, mask, half),
        2 => residual_row::<2>(pp, cw, cur, z, mask, half),
        3 => residual_row::<3>(pp, cw, cur, z, mask, half),
        4 => residual_row::<4>(pp, cw, cur, z, mask, half),
        5 => residual_row::<5>(pp, cw, cur, z, mask, half),
        _ => residual_row::<6>(pp, cw, cur, z, mask, half),
    }
}

#[inline(always)]
fn rebuild_row<const P: usize>(pp: &[i32], z: &[u32], cur: &mut [i32], mask: i32) {
    let mut w = pp[1];
    for (x, (c, &zz)) in cur.iter_mut().zip(z).enumerate() {
        let p = predict::<P>(w, pp[x + 1], pp[x], pp[x + 2]);
        w = (p + unzigzag(zz)) & mask;
        *c = w;
    }
}

fn rebuild_row_dyn(k: usize, pp: &[i32], z: &[u32], cur: &mut [i32], mask: i32) {
    match k {
        0 => rebuild_row::<0>(pp, z, cur, mask),
        1 => rebuild_row::<1>(pp, z, cur, mask),
        2 => rebuild_row::<2>(pp, z, cur, mask),
        3 => rebuild_row::<3>(pp, z, cur, mask),
        4 => rebuild_row::<4>(pp, z, cur, mask),
        5 => rebuild_row::<5>(pp, z, cur, mask),
        _ => rebuild_row::<6>(pp, z, cur, mask),
    }
}

fn pad_row(row: &[i32], pp: &mut [i32]) {
    pp[1..row.len() + 1].copy_from_slice(row);
    pp[0] = row[0];
    pp[row.len() + 1] = row[row.len() - 1];
}

/// Estimated cost of a residual row: about the bit length of each zigzag value
/// (the float exponent of z + 1, which vectorises where a leading-zero count does not).
fn row_cost(z: &[u16]) -> u64 {
    z.iter()
        .map(|&v| u64::from(((f32::from(v) + 1.0).to_bits() >> 23) - 127))
        .sum()
}

// ------------------------------------------------------------------ frequency tables

fn entropy_bits(h: &[u32]) -> f64 {
    let total: u64 = h.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return 0.0;
    }
    let t = total as f64;
    let used = h.iter().filter(|&&c| c > 0).count() as f64;
    h.iter()
        .filter(|&&c| c > 0)
        .map(|&c| -(c as f64) * (c as f64 / t).log2())
        .sum::<f64>()
        + 12.0 * used
        + 8.0
}

fn merged(a: &[u32; ALPHA], b: &[u32; ALPHA]) -> [u32; ALPHA] {
    let mut m = *a;
    for (x, y) in m.iter_mut().zip(b) {
        *x += y;
    }
    m
}

/// Contiguous groups of fine buckets (as their first bucket), merged greedily while merging saves bits.
fn merge_groups(hist: &[[u32; ALPHA]; FINE]) -> Vec<usize> {
    let mut starts: Vec<usize> = (0..FINE).collect();
    let mut sums: Vec<[u32; ALPHA]> = hist.to_vec();
    let mut cost: Vec<f64> = sums.iter().map(|h| entropy_bits(h)).collect();
    // gain[i]: bits saved by merging groups i and i + 1 (negative: merging costs)
    let pair_gain = |sums: &[[u32; ALPHA]], cost: &[f64], i: usize| {
        cost[i] + cost[i + 1] - entropy_bits(&merged(&sums[i], &sums[i + 1]))
    };
    let mut gain: Vec<f64> = (0..FINE - 1).map(|i| pair_gain(&sums, &cost, i)).collect();
    while let Some(i) = (0..gain.len())
        .filter(|&i| gain[i] >= 0.0)
        .max_by(|&a, &b| gain[a].total_cmp(&gain[b]))
    {
        sums[i] = merged(&sums[i], &sums[i + 1]);
        sums.remove(i + 1);
        cost[i] = entropy_bits(&sums[i]);
        cost.remove(i + 1);
        starts.remove(i + 1);
        gain.remove(i);
        if i < gain.len() {
            gain[i] = pair_gain(&sums, &cost, i);
        }
        if i > 0 {
            gain[i - 1] = pair_gain(&sums, &cost, i - 1);
        }
    }
    starts
}

/// Frequencies summing to [`M`], each used symbol at least 1, none above [`MAX_FREQ`].
fn normalize(h: &[u32; ALPHA]) -> [u32; ALPHA] {
    let total: u64 = h.iter().map(|&c| u64::from(c)).sum();
    let mut f = [0u32; ALPHA];
    if total == 0 {
        f[0] = MAX_FREQ;
        f[1] = M - MAX_FREQ;
        return f;
    }
    for (o, &c) in f.iter_mut().zip(h) {
        if c > 0 {
            *o = ((u64::from(c) * u64::from(M) + total / 2) / total).max(1) as u32;
        }
    }
    let sum: u32 = f.iter().sum();
    let top = (0..ALPHA).max_by_key(|&i| f[i]).unwrap_or(0);
    f[top] = (f[top] + M).saturating_sub(sum).max(1);
    let sum: u32 = f.iter().sum();
    if sum != M {
        // only when rounding made the largest negative: take from the largest ones
        let mut excess = sum - M;
        while excess > 0 {
            let i = (0..ALPHA).max_by_key(|&i| f[i]).unwrap_or(0);
            f[i] -= 1;
            excess -= 1;
        }
    }
    if f[top] > MAX_FREQ {
        let other = if top == 0 { 1 } else { 0 };
        f[other] += f[top] - MAX_FREQ;
        f[top] = MAX_FREQ;
    }
    f
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// ------------------------------------------------------------------ encoder

/// Row `y` of `frame` as unsigned samples (sign bit flipped for signed data).
fn load_row(frame: &[u8], g: &Geometry, y: usize, out: &mut [i32]) {
    let flip = i32::from(g.sign_flip());
    let cols = g.cols;
    if g.bits == 8 {
        for (o, &b) in out.iter_mut().zip(&frame[y * cols..(y + 1) * cols]) {
            *o = i32::from(b) ^ flip;
        }
    } else {
        for (o, c) in out
            .iter_mut()
            .zip(frame[y * cols * 2..(y + 1) * cols * 2].chunks_exact(2))
        {
            *o = i32::from(u16::from_le_bytes([c[0], c[1]])) ^ flip;
        }
    }
}

/// The previous row padded (`pp`) and the current row shifted (`cw`) for [`residual_row`].
fn neighbours(prev: &[i32], cur: &[i32], pp: &mut [i32], cw: &mut [i32]) {
    pad_row(prev, pp);
    cw[0] = prev[0];
    cw[1..cur.len()].copy_from_slice(&cur[..cur.len() - 1]);
}

/// Per (group, token): what the rANS encoder needs.
#[derive(Clone, Copy, Default)]
struct EncSym {
    /// floor(2^64 / freq) + 1: x / freq = (x * rcp) >> 64 exactly for x < 2^32 (freq >= 2)
    rcp: u64,
    freq: u32,
    start: u32,
}

pub(crate) fn encode_frame(frame: &[u8], g: &Geometry) -> Vec<u8> {
    let (rows, cols, bits) = (g.rows, g.cols, g.bits);
    let mask = ((1u32 << bits) - 1) as i32;
    let half = 1i32 << (bits - 1);
    let n = rows * cols;
    let mut z = vec![0u16; n];
    let mut prev = vec![0i32; cols];
    let mut cur = vec![0i32; cols];
    // row 0: every predictor is W (0 at x = 0)
    load_row(frame, g, 0, &mut cur);
    let mut w = 0;
    for x in 0..cols {
        let v = cur[x];
        z[x] = zigzag((((v - w) + half) & mask) - half) as u16;
        w = v;
    }
    let nstrips = rows.div_ceil(STRIP);
    let mut preds = vec![0u8; nstrips];
    let mut pp = vec![0i32; cols + 2];
    let mut cw = vec![0i32; cols];
    let mut trial = vec![0u16; cols];
    for (s, pred) in preds.iter_mut().enumerate() {
        let (y0, y1) = ((s * STRIP).max(1), ((s + 1) * STRIP).min(rows));
        let mut costs = [0u64; NPRED];
        // judge on every fourth row (every row when the strip is short)
        let step = if y1 - y0 > 8 { 4 } else { 1 };
        for y in (y0..y1).step_by(step) {
            load_row(frame, g, y - 1, &mut prev);
            load_row(frame, g, y, &mut cur);
            neighbours(&prev, &cur, &mut pp, &mut cw);
            for (k, c) in costs.iter_mut().enumerate() {
                residual_row_dyn(k, &pp, &cw, &cur, &mut trial, mask, half);
                *c += row_cost(&trial);
            }
        }
        let best = (0..NPRED).min_by_key(|&k| costs[k]).unwrap_or(0);
        *pred = best as u8;
        load_row(frame, g, y0 - 1, &mut cur);
        for y in y0..y1 {
            std::mem::swap(&mut prev, &mut cur);
            load_row(frame, g, y, &mut cur);
            neighbours(&prev, &cur, &mut pp, &mut cw);
            let zr = &mut z[y * cols..(y + 1) * cols];
            residual_row_dyn(best, &pp, &cw, &cur, zr, mask, half);
        }
    }
    // per pixel: its fine context and token as one index (bucket * ALPHA + token); histograms
    // of those (four copies, so runs of one bin do not wait on each other's increments); the
    // raw low bits (branch-free: the 8 bytes at the write position are rewritten every time,
    // `raw` has 8 bytes of slack)
    let mut fs = vec![0u16; n];
    let mut hist4 = vec![[0u32; FINE * ALPHA]; 4];
    let mut raw = vec![0u8; n * 2 + 8];
    let (mut acc, mut nacc, mut rpos) = (0u64, 0u32, 0usize);
    let mut zp = vec![0u32; cols + 2];
    let mut bk = vec![0u16; cols];
    for y in 0..rows {
        for (b, w) in bk.iter_mut().zip(zp.windows(3)) {
            *b = (bucket(act(w[0], w[1], w[2])) * ALPHA) as u16;
        }
        let row = &z[y * cols..(y + 1) * cols];
        let fsr = &mut fs[y * cols..(y + 1) * cols];
        for (x, ((&v, &b), f)) in row.iter().zip(&bk).zip(fsr.iter_mut()).enumerate() {
            let v = u32::from(v);
            let (t, nr) = token(v);
            acc |= u64::from(v & ((1u32 << nr) - 1)) << nacc;
            nacc += nr;
            raw[rpos..rpos + 8].copy_from_slice(&acc.to_le_bytes());
            rpos += (nacc >> 3) as usize;
            acc >>= nacc & !7;
            nacc &= 7;
            let k = usize::from(b) + t as usize;
            *f = k as u16;
            hist4[x & 3][k % (FINE * ALPHA)] += 1;
        }
        for (d, &v) in zp[1..cols + 1].iter_mut().zip(row) {
            *d = u32::from(v);
        }
    }
    raw.truncate(rpos + nacc.div_ceil(8) as usize);
    let mut hist = [[0u32; ALPHA]; FINE];
    for h in &hist4 {
        for (b, hb) in hist.iter_mut().enumerate() {
            for (t, c) in hb.iter_mut().enumerate() {
                *c += h[b * ALPHA + t];
            }
        }
    }
    let starts = merge_groups(&hist);
    let mut map = [0u8; FINE];
    let mut freqs = Vec::with_capacity(starts.len());
    for (gi, &s) in starts.iter().enumerate() {
        let e = starts.get(gi + 1).copied().unwrap_or(FINE);
        let mut h = [0u32; ALPHA];
        for b in s..e {
            map[b] = gi as u8;
            for (a, c) in h.iter_mut().zip(&hist[b]) {
                *a += c;
            }
        }
        freqs.push(normalize(&h));
    }
    let words = rans_encode(&fs, &map, &freqs);
    // assemble
    let mut out = Vec::with_capacity(80 + nstrips + words.len() * 2 + raw.len());
    out.extend_from_slice(&[0; 4]);
    out.push(starts.len() as u8);
    out.extend(starts[1..].iter().map(|&s| s as u8));
    out.extend_from_slice(&preds);
    let alpha = alphabet(bits);
    for f in &freqs {
        let nsym = (0..alpha).rev().find(|&i| f[i] > 0).map_or(1, |i| i + 1);
        out.push(nsym as u8);
        for &v in &f[..nsym] {
            put_varint(&mut out, v);
        }
    }
    out.extend_from_slice(&(words.len() as u32).to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    let wstart = out.len();
    out.resize(wstart + words.len() * 2, 0);
    for (o, w) in out[wstart..].chunks_exact_mut(2).zip(&words) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&raw);
    let body_len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&body_len.to_le_bytes());
    out
}

#[inline(always)]
fn rans_put(s: &mut u32, sym: &EncSym, out: &mut [u16], pos: &mut usize) {
    let x_max = ((RANS_L >> PREC) << 16) * sym.freq;
    let emit = *s >= x_max;
    // out[..pos] is free (at least one word): write always, keep the word only when emitting
    out[*pos - 1] = *s as u16;
    *pos -= usize::from(emit);
    if emit {
        *s >>= 16;
    }
    let q = if sym.freq == 1 {
        *s
    } else {
        ((u128::from(*s) * u128::from(sym.rcp)) >> 64) as u32
    };
    *s = (q << PREC) + (*s - q * sym.freq) + sym.start;
}

/// The rANS words of a frame's symbols (`fs`: fine context * ALPHA + token per pixel), last
/// pixel first, the two states (pixel index parity) interleaved; the decoder reads forwards.
#[inline(never)]
fn rans_encode(fs: &[u16], map: &[u8; FINE], freqs: &[[u32; ALPHA]]) -> Vec<u16> {
    // what to code for each (fine context, token): its group's frequency and start
    let mut syms = vec![EncSym::default(); FINE * ALPHA];
    for (b, row) in syms.chunks_exact_mut(ALPHA).enumerate() {
        let f = &freqs[usize::from(map[b])];
        let mut start = 0;
        for (e, &fr) in row.iter_mut().zip(f) {
            if fr > 0 {
                let rcp = if fr == 1 {
                    0
                } else {
                    u64::MAX / u64::from(fr) + 1
                };
                *e = EncSym {
                    rcp,
                    freq: fr,
                    start,
                };
            }
            start += fr;
        }
    }
    // filled from the end: at most one word per symbol plus the two final states
    let mut out = vec![0u16; fs.len() + 5];
    let mut pos = out.len();
    // sa: the state of the next pixel to code (pixels are coded last first; the state
    // alternates with the pixel index, both start at RANS_L)
    let (mut sa, mut sb) = (RANS_L, RANS_L);
    for &f in fs.iter().rev() {
        rans_put(
            &mut sa,
            &syms[usize::from(f) % (FINE * ALPHA)],
            &mut out,
            &mut pos,
        );
        std::mem::swap(&mut sa, &mut sb);
    }
    // after pixel 0, sa belongs to the odd pixels
    let st = [sb, sa];
    for s in [st[1], st[0]] {
        out[pos - 1] = s as u16;
        out[pos - 2] = (s >> 16) as u16;
        pos -= 2;
    }
    out.drain(..pos);
    out
}

// ------------------------------------------------------------------ decoder

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| Error::Corrupt("px3 frame is truncated".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn varint(&mut self) -> Result<u32, Error> {
        let mut v = 0u32;
        for shift in [0, 7] {
            let b = self.u8()?;
            v |= u32::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::Corrupt("px3 frequency is too long".into()))
    }
}

fn corrupt(m: &str) -> Error {
    Error::Corrupt(m.into())
}

/// Decode one frame body into `out` (the frame's little-endian sample bytes).
pub(crate) fn decode_frame(body: &[u8], g: &Geometry, out: &mut [u8]) -> Result<(), Error> {
    let (rows, cols, bits) = (g.rows, g.cols, g.bits);
    let mask = ((1u32 << bits) - 1) as i32;
    let alpha = alphabet(bits);
    let mut c = Cursor { buf: body, pos: 0 };
    let ngroups = usize::from(c.u8()?);
    if ngroups == 0 || ngroups > FINE {
        return Err(corrupt("px3 context group count out of range"));
    }
    let mut map = [0u8; FINE];
    let mut prev = 0usize;
    let mut bounds = Vec::with_capacity(ngroups);
    bounds.push(0usize);
    for _ in 1..ngroups {
        let b = usize::from(c.u8()?);
        if b <= prev || b >= FINE {
            return Err(corrupt("px3 context groups out of order"));
        }
        bounds.push(b);
        prev = b;
    }
    for (gi, &s) in bounds.iter().enumerate() {
        let e = bounds.get(gi + 1).copied().unwrap_or(FINE);
        for m in &mut map[s..e] {
            *m = gi as u8;
        }
    }
    let nstrips = rows.div_ceil(STRIP);
    let preds = c.take(nstrips)?;
    if preds.iter().any(|&p| usize::from(p) >= NPRED) {
        return Err(corrupt("px3 predictor out of range"));
    }
    // slot tables: freq (13 bits) | slot - start (12 bits) << 13 | symbol << 25
    let mut table = vec![0u32; ngroups << PREC];
    for gi in 0..ngroups {
        let nsym = usize::from(c.u8()?);
        if nsym == 0 || nsym > alpha {
            return Err(corrupt("px3 table size out of range"));
        }
        let mut start = 0u32;
        for sym in 0..nsym {
            let f = c.varint()?;
            if f > MAX_FREQ || start + f > M {
                return Err(corrupt("px3 frequencies out of range"));
            }
            let base = (gi << PREC) + start as usize;
            for (j, t) in table[base..base + f as usize].iter_mut().enumerate() {
                *t = f | ((j as u32) << 13) | ((sym as u32) << 25);
            }
            start += f;
        }
        if start != M {
            return Err(corrupt("px3 frequencies do not sum to 4096"));
        }
    }
    let nwords = c.u32()? as usize;
    let raw_len = c.u32()? as usize;
    let wbytes = c.take(
        nwords
            .checked_mul(2)
            .ok_or_else(|| corrupt("px3 length overflow"))?,
    )?;
    let rawb = c.take(raw_len)?;
    if c.pos != body.len() {
        return Err(corrupt("px3 frame has trailing bytes"));
    }
    if nwords < 4 {
        return Err(corrupt("px3 rANS part too short"));
    }
    let mut words: Vec<u16> = wbytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    words.push(0);
    let mut st = [
        (u32::from(words[0]) << 16) | u32::from(words[1]),
        (u32::from(words[2]) << 16) | u32::from(words[3]),
    ];
    let mut wp = 4usize;
    let mut rawp: Vec<u8> = Vec::with_capacity(raw_len + 8);
    rawp.extend_from_slice(rawb);
    rawp.extend_from_slice(&[0u8; 8]);
    let raw_max = raw_len; // byte index limit for 8-byte loads
    let mut bitpos = 0usize;
    let tt = token_table();

    let mut zp = vec![0u32; cols + 2];
    let mut zc = vec![0u32; cols + 2];
    let mut pp = vec![0i32; cols + 2];
    let mut cur = vec![0i32; cols];
    let mut idx = 0usize;
    let mut cb = vec![0u32; cols];
    let mut bk = vec![0u8; cols];
    let mut mapshift = [0u32; FINE];
    for (m, &g) in mapshift.iter_mut().zip(&map) {
        *m = u32::from(g) << PREC;
    }
    let mut syms = vec![0u8; cols];
    let bps = g.bytes_per_sample();
    let flip = i32::from(g.sign_flip());
    for y in 0..rows {
        // contexts of row y: from the previous row's residuals only, so the symbol chain
        // below does not wait for the raw bits or the pixels
        for (b, w) in bk.iter_mut().zip(zp.windows(3)) {
            *b = bucket(act(w[0], w[1], w[2])) as u8;
        }
        for (c, &b) in cb.iter_mut().zip(&bk) {
            *c = mapshift[usize::from(b) & (FINE - 1)];
        }
        // tokens of row y: two interleaved rANS states (even and odd pixel index)
        let par = idx & 1;
        let (mut s0, mut s1) = (st[par], st[par ^ 1]);
        let mut pairs = syms.chunks_exact_mut(2).zip(cb.chunks_exact(2));
        for (sy, c) in &mut pairs {
            sy[0] = rans_step(&mut s0, c[0], &table, &words, &mut wp);
            sy[1] = rans_step(&mut s1, c[1], &table, &words, &mut wp);
        }
        if cols % 2 == 1 {
            syms[cols - 1] = rans_step(&mut s0, cb[cols - 1], &table, &words, &mut wp);
        }
        st[par] = s0;
        st[par ^ 1] = s1;
        idx += cols;
        // raw low bits: residuals of row y
        for (zz, &sy) in zc[1..cols + 1].iter_mut().zip(&syms) {
            let (nr, base) = tt[usize::from(sy)];
            let at = (bitpos >> 3).min(raw_max);
            let chunk = u64::from_le_bytes(rawp[at..at + 8].try_into().unwrap_or([0; 8]));
            *zz = base | (((chunk >> (bitpos & 7)) as u32) & ((1u32 << nr) - 1));
            bitpos += nr as usize;
        }
        // pixels of row y
        if y == 0 {
            let mut w = 0i32;
            for (cv, &zz) in cur.iter_mut().zip(&zc[1..cols + 1]) {
                w = (w + unzigzag(zz)) & mask;
                *cv = w;
            }
        } else {
            rebuild_row_dyn(
                usize::from(preds[y / STRIP]),
                &pp,
                &zc[1..cols + 1],
                &mut cur,
                mask,
            );
        }
        pad_row(&cur, &mut pp);
        std::mem::swap(&mut zp, &mut zc);
        let o = &mut out[y * cols * bps..(y + 1) * cols * bps];
        if bps == 1 {
            for (ob, &v) in o.iter_mut().zip(&cur) {
                *ob = (v ^ flip) as u8;
            }
        } else {
            for (ob, &v) in o.chunks_exact_mut(2).zip(&cur) {
                ob.copy_from_slice(&((v ^ flip) as u16).to_le_bytes());
            }
        }
    }
    if st != [RANS_L, RANS_L] || wp != nwords {
        return Err(corrupt("px3 rANS part does not end where it should"));
    }
    if bitpos.div_ceil(8) != raw_len {
        return Err(corrupt("px3 raw-bit part has the wrong length"));
    }
    if bitpos % 8 != 0 && (rawb[raw_len - 1] >> (bitpos % 8)) != 0 {
        return Err(corrupt("px3 raw-bit padding is not zero"));
    }
    Ok(())
}
