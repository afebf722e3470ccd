//! An adaptive binary range coder (the LZMA shape: 11-bit probabilities, carry
//! propagation through a cached byte) and a raw bit stream for the bits that
//! are not worth modelling.

/// Probability of a 0, in 1/2048ths.
pub type Prob = u16;
pub const PROB_INIT: Prob = 1 << 10;
const PROB_BITS: u32 = 11;
const MOVE_BITS: u32 = 4;
const TOP: u32 = 1 << 24;

pub struct Encoder {
    low: u64,
    range: u32,
    cache: u8,
    cache_size: u64,
    out: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        Encoder {
            low: 0,
            range: u32::MAX,
            cache: 0,
            cache_size: 1,
            out: Vec::new(),
        }
    }

    #[inline(always)]
    pub fn bit(&mut self, p: &mut Prob, bit: u32) {
        // branch-free selects: the bits of a good model are unpredictable by construction
        let bound = (self.range >> PROB_BITS) * u32::from(*p);
        let one = bit != 0;
        let mask = 0u32.wrapping_sub(bit & 1);
        self.low += u64::from(bound & mask);
        self.range = if one { self.range - bound } else { bound };
        *p = if one {
            *p - (*p >> MOVE_BITS)
        } else {
            *p + (((1 << PROB_BITS) - *p) >> MOVE_BITS)
        };
        while self.range < TOP {
            self.range <<= 8;
            self.shift_low();
        }
    }

    fn shift_low(&mut self) {
        if (self.low as u32) < 0xFF00_0000 || (self.low >> 32) != 0 {
            let carry = (self.low >> 32) as u8;
            let mut temp = self.cache;
            loop {
                self.out.push(temp.wrapping_add(carry));
                temp = 0xFF;
                self.cache_size -= 1;
                if self.cache_size == 0 {
                    break;
                }
            }
            self.cache = ((self.low >> 24) & 0xFF) as u8;
        }
        self.cache_size += 1;
        self.low = (self.low & 0x00FF_FFFF) << 8;
    }

    pub fn finish(mut self) -> Vec<u8> {
        for _ in 0..5 {
            self.shift_low();
        }
        self.out
    }
}

/// Decodes what [`Encoder`] wrote. Never panics: reading past the end yields
/// zero bytes and sets `overrun`, which the caller turns into an error.
pub struct Decoder<'a> {
    code: u32,
    range: u32,
    buf: &'a [u8],
    pos: usize,
    pub overrun: bool,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        let mut d = Decoder {
            code: 0,
            range: u32::MAX,
            buf,
            pos: 0,
            overrun: false,
        };
        if d.byte() != 0 {
            d.overrun = true; // the first byte an Encoder writes is always 0
        }
        for _ in 0..4 {
            d.code = (d.code << 8) | u32::from(d.byte());
        }
        d
    }

    #[inline(always)]
    fn byte(&mut self) -> u8 {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                b
            }
            None => {
                self.overrun = true;
                0
            }
        }
    }

    #[inline(always)]
    pub fn bit(&mut self, p: &mut Prob) -> u32 {
        let bound = (self.range >> PROB_BITS) * u32::from(*p);
        let one = self.code >= bound;
        let bit = u32::from(one);
        self.code -= bound & 0u32.wrapping_sub(bit);
        self.range = if one { self.range - bound } else { bound };
        *p = if one {
            *p - (*p >> MOVE_BITS)
        } else {
            *p + (((1 << PROB_BITS) - *p) >> MOVE_BITS)
        };
        while self.range < TOP {
            self.range <<= 8;
            self.code = (self.code << 8) | u32::from(self.byte());
        }
        bit
    }

    /// Bytes consumed (the encoder's output length when the stream was read to its end).
    pub fn consumed(&self) -> usize {
        self.pos
    }
}

/// Raw bits, least significant first, little-endian bytes.
#[derive(Default)]
pub struct BitWriter {
    acc: u64,
    n: u32,
    out: Vec<u8>,
}

impl BitWriter {
    #[inline(always)]
    pub fn put(&mut self, value: u32, bits: u32) {
        debug_assert!(bits <= 24);
        self.acc |= u64::from(value & ((1u32 << bits) - 1)) << self.n;
        self.n += bits;
        if self.n >= 32 {
            self.out.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.n -= 32;
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        while self.n > 0 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n = self.n.saturating_sub(8);
        }
        self.out
    }
}

/// Reads what [`BitWriter`] wrote; past the end it yields zeros and sets `overrun`.
pub struct BitReader<'a> {
    acc: u64,
    n: u32,
    buf: &'a [u8],
    pos: usize,
    pub overrun: bool,
}

impl<'a> BitReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        BitReader {
            acc: 0,
            n: 0,
            buf,
            pos: 0,
            overrun: false,
        }
    }

    #[inline(always)]
    pub fn get(&mut self, bits: u32) -> u32 {
        if self.n < bits {
            self.refill();
            if self.n < bits {
                self.overrun = true;
                self.n = bits;
            }
        }
        let v = (self.acc & ((1u64 << bits) - 1)) as u32;
        self.acc >>= bits;
        self.n -= bits;
        v
    }

    fn refill(&mut self) {
        while self.n <= 56 {
            match self.buf.get(self.pos) {
                Some(&b) => {
                    self.acc |= u64::from(b) << self.n;
                    self.n += 8;
                    self.pos += 1;
                }
                None => break,
            }
        }
    }

    /// Whether every byte was read and the unread bits of the last byte are zero padding.
    pub fn at_clean_end(&self) -> bool {
        !self.overrun && self.pos == self.buf.len() && self.n < 8 && self.acc == 0
    }
}
