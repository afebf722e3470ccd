//! The greyscale model: a blend of four predictors weighted by their recent
//! errors, a LOCO-I bias correction per context, and residual tokens coded
//! with adaptive binary contexts chosen by the local error activity.

use crate::rc::{BitReader, BitWriter, Decoder, Encoder, Prob, PROB_INIT};

const NSUB: usize = 4;
const ACT_CTX: usize = 36;
const BIAS_CTX: usize = ACT_CTX * 27;
const TOKEN_NODES: usize = 16; // a 4-level tree (tokens 0..15); node 0 splits 15 from 16
const MAX_TOKEN: u32 = 16;
const ERR_CAP: u32 = 4095;
const BIAS_RESET: i32 = 64;

/// Reciprocal of the squared error (+1), the weight of a sub-predictor (at least 2^10).
fn recip_table() -> Vec<u32> {
    (0..=u64::from(ERR_CAP))
        .map(|e| ((1u64 << 34) / ((e + 1) * (e + 1))).min(u64::from(u32::MAX)) as u32)
        .collect()
}

const DIV_BITS: u32 = 12;
const DIV_SHIFT: u32 = 24;

/// 2^24 / d for d in [2^11, 2^12): the blend divides by the weight sum scaled into that range.
fn div_table() -> Vec<i64> {
    let lo = 1i64 << (DIV_BITS - 1);
    (lo..2 * lo)
        .map(|d| ((1i64 << DIV_SHIFT) + d / 2) / d)
        .collect()
}

#[inline(always)]
fn act_bucket(a: u32) -> usize {
    if a < 2 {
        a as usize
    } else {
        let len = 32 - a.leading_zeros(); // >= 2
        let b = (2 * len - 2 + ((a >> (len - 2)) & 1)) as usize;
        b.min(ACT_CTX - 1)
    }
}

#[inline(always)]
fn sign3(d: i32) -> usize {
    (d.signum() + 1) as usize
}

/// What the coder does with each residual: the encoder writes the one it is
/// given, the decoder ignores it and returns the one it reads.
pub(crate) trait Residuals {
    const ENCODE: bool;
    fn code(&mut self, m: &mut Models, ctx: usize, r: u32) -> u32;
}

pub(crate) struct Models {
    tok: Vec<[Prob; TOKEN_NODES]>,
    mant: Vec<[Prob; MAX_TOKEN as usize + 1]>,
    pub bad: bool,
}

impl Models {
    fn new() -> Self {
        Models {
            tok: vec![[PROB_INIT; TOKEN_NODES]; ACT_CTX],
            mant: vec![[PROB_INIT; MAX_TOKEN as usize + 1]; ACT_CTX],
            bad: false,
        }
    }
}

pub(crate) struct Enc {
    pub rc: Encoder,
    pub raw: BitWriter,
}

impl Residuals for Enc {
    const ENCODE: bool = true;

    #[inline(always)]
    fn code(&mut self, m: &mut Models, ctx: usize, r: u32) -> u32 {
        let t = 32 - r.leading_zeros();
        let probs = &mut m.tok[ctx];
        let t4 = t.min(15);
        let mut node = 1usize;
        for i in (0..4).rev() {
            let bit = (t4 >> i) & 1;
            self.rc.bit(&mut probs[node], bit);
            node = (node << 1) | bit as usize;
        }
        if t4 == 15 {
            self.rc.bit(&mut probs[0], t - 15);
        }
        if t >= 2 {
            self.rc
                .bit(&mut m.mant[ctx][t as usize], (r >> (t - 2)) & 1);
            if t > 2 {
                self.raw.put(r, t - 2);
            }
        }
        r
    }
}

pub(crate) struct Dec<'a> {
    pub rc: Decoder<'a>,
    pub raw: BitReader<'a>,
}

impl Residuals for Dec<'_> {
    const ENCODE: bool = false;

    #[inline(always)]
    fn code(&mut self, m: &mut Models, ctx: usize, _r: u32) -> u32 {
        let probs = &mut m.tok[ctx];
        let mut node = 1usize;
        for _ in 0..4 {
            node = (node << 1) | self.rc.bit(&mut probs[node]) as usize;
        }
        let mut t = (node - TOKEN_NODES) as u32;
        if t == 15 {
            t += self.rc.bit(&mut probs[0]);
        }
        match t {
            0 => 0,
            1 => 1,
            2..=MAX_TOKEN => {
                let top = self.rc.bit(&mut m.mant[ctx][t as usize]);
                let low = if t > 2 { self.raw.get(t - 2) } else { 0 };
                (1 << (t - 1)) | (top << (t - 2)) | low
            }
            _ => {
                m.bad = true; // 17: cannot happen in a stream the encoder wrote
                0
            }
        }
    }
}

/// Codes one frame (`img`, `rows*cols` samples of `bits` bits, unsigned):
/// the encoder reads `img`, the decoder fills it.
pub(crate) fn code_frame<R: Residuals>(
    img: &mut [u16],
    rows: usize,
    cols: usize,
    bits: u32,
    io: &mut R,
) -> bool {
    let mask = ((1u32 << bits) - 1) as i32;
    let half = 1i32 << (bits - 1);
    let recip = recip_table();
    let div = div_table();
    let mut models = Models::new();
    let mut bias_b = vec![0i32; BIAS_CTX];
    let mut bias_n = vec![1i32; BIAS_CTX];
    let mut bias_c = vec![0i32; BIAS_CTX];
    // errors of the four sub-predictors and of the final prediction, per position of the
    // current and the previous row, padded by one on each side (pads stay 0)
    let w2 = cols + 2;
    let mut cur_err = vec![[0u32; NSUB + 1]; w2];
    let mut prev_err = vec![[0u32; NSUB + 1]; w2];
    for y in 0..rows {
        std::mem::swap(&mut cur_err, &mut prev_err);
        let row = y * cols;
        for x in 0..cols {
            let i = row + x;
            let (w, n, nw, ne);
            if y == 0 {
                w = if x > 0 { i32::from(img[i - 1]) } else { 0 };
                n = w;
                nw = w;
                ne = w;
            } else {
                n = i32::from(img[i - cols]);
                nw = if x > 0 {
                    i32::from(img[i - cols - 1])
                } else {
                    n
                };
                ne = if x + 1 < cols {
                    i32::from(img[i - cols + 1])
                } else {
                    n
                };
                w = if x > 0 { i32::from(img[i - 1]) } else { n };
            }
            let preds = [w + n - nw, w + ne - n, n, w];
            let (l, p0, p1, p2) = (cur_err[x], prev_err[x], prev_err[x + 1], prev_err[x + 2]);
            let mut e = [0u32; NSUB + 1];
            for k in 0..=NSUB {
                e[k] = l[k] + p0[k] + p1[k] + p2[k];
            }
            // blend = N + sum(w_k * (p_k - N)) / sum(w_k), the division by a table of
            // reciprocals of the weight sum scaled to 12 bits (sum >= 4 * 2^10)
            let mut sw: u64 = 0;
            let mut swd: i64 = 0;
            for k in 0..NSUB {
                let wk = recip[e[k].min(ERR_CAP) as usize];
                sw += u64::from(wk);
                swd += i64::from(wk) * i64::from(preds[k] - n);
            }
            let shift = (64 - sw.leading_zeros()).saturating_sub(DIV_BITS);
            let d = (sw >> shift) as usize - (1 << (DIV_BITS - 1));
            let blend =
                n + (((swd >> shift) * div[d] + (1 << (DIV_SHIFT - 1))) >> DIV_SHIFT) as i32;
            let act = e[NSUB];
            let actx = act_bucket(act);
            let bctx = actx * 27 + sign3(n - nw) * 9 + sign3(w - nw) * 3 + sign3(ne - n);
            let pred = (blend + bias_c[bctx]).clamp(0, mask);
            let v = if R::ENCODE {
                let v = i32::from(img[i]);
                let d = (((v - pred) + half) & mask) - half;
                let z = ((d << 1) ^ (d >> 31)) as u32;
                io.code(&mut models, actx, z);
                v
            } else {
                let z = io.code(&mut models, actx, 0);
                let d = ((z >> 1) as i32) ^ -((z & 1) as i32);
                let v = (pred + d) & mask;
                img[i] = v as u16;
                v
            };
            // model updates
            let err = v - pred;
            cur_err[x + 1] = [
                (v - preds[0]).unsigned_abs(),
                (v - preds[1]).unsigned_abs(),
                (v - preds[2]).unsigned_abs(),
                (v - preds[3]).unsigned_abs(),
                err.unsigned_abs(),
            ];
            let (b, nn, c) = (&mut bias_b[bctx], &mut bias_n[bctx], &mut bias_c[bctx]);
            *b += err;
            *nn += 1;
            if *nn == BIAS_RESET {
                *b >>= 1;
                *nn >>= 1;
            }
            if *b <= -*nn {
                *c -= 1;
                *b += *nn;
                if *b <= -*nn {
                    *b = -*nn + 1;
                }
            } else if *b > 0 {
                *c += 1;
                *b -= *nn;
                if *b > 0 {
                    *b = 0;
                }
            }
            *c = (*c).clamp(-half, half);
        }
    }
    !models.bad
}
