//! Tensors on the wire: a flat `f32` vector cut into chunks of at most `chunk_bytes`, each
//! addressed by its float offset, encoded as f32 or bf16, with a CRC-32 per chunk and one over
//! the whole stream.

use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::{Encoding, ProtoError, Result};

/// The float ranges a run's streams are cut into (chunk `i` covers `grid[i]`).
pub type Grid = Arc<Vec<Range<usize>>>;

/// Default chunk payload: 1 MiB, far below gRPC's 4 MiB message limit.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// Default chunk payload of a sharded run: smaller, because the range a reducer reduces last
/// still has to cross its link once per worker after the round's other bytes (with N workers,
/// N x 1 MiB is 34 ms at 1 Gbit/s for N = 4; 8 ms at 256 KiB). On loopback, where the round is
/// CPU work, smaller chunks cost more per byte, so one coordinator keeps 1 MiB.
pub const SHARDED_CHUNK_BYTES: usize = 256 << 10;

#[inline]
pub fn bytes_per_float(enc: Encoding) -> usize {
    if enc == Encoding::Bf16 { 2 } else { 4 }
}

/// Round-to-nearest-even f32 -> bf16 (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((b >> 16) | 0x40) as u16;
    // A select, not a branch, so that encoding a slice vectorizes.
    if x.is_nan() { quiet_nan } else { rounded }
}

#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Float ranges of the chunks of a `total`-float vector.
pub fn chunk_ranges(
    total: usize,
    enc: Encoding,
    chunk_bytes: usize,
) -> impl Iterator<Item = Range<usize>> {
    let per = (chunk_bytes / bytes_per_float(enc)).max(1);
    (0..total.div_ceil(per)).map(move |i| i * per..((i + 1) * per).min(total))
}

/// The order in which a sharded run lays the chunks of the flat vector on its grid: chunk `j`
/// of the grid holds chunk `order[j]` of the vector, in bit-reversed order (of the smallest
/// power of two at least `n`, skipping the indices past `n`). Any run of consecutive grid
/// chunks then samples the whole vector evenly, so a reducer's span (a run of them) holds a
/// share of every layer: the ranges the backward pass makes final first (the decoder's and the
/// digit capsules', at the end of the vector) go to every reducer at once, not all to the one
/// whose span ends the vector, and every reducer's link is busy from the first range on.
pub fn stripe_order(n: usize) -> Vec<usize> {
    let bits = n.next_power_of_two().trailing_zeros();
    (0..n.next_power_of_two())
        .map(|j| {
            if bits == 0 {
                0
            } else {
                j.reverse_bits() >> (usize::BITS - bits)
            }
        })
        .filter(|&i| i < n)
        .collect()
}

/// A grid of the chunks `natural` (a vector's, in order) laid end to end in `order`, and for
/// each of its chunks the floats of the vector it holds: `(grid, place)`.
pub fn reorder(natural: &[Range<usize>], order: &[usize]) -> (Grid, Grid) {
    let mut at = 0;
    let mut grid = Vec::with_capacity(order.len());
    let mut place = Vec::with_capacity(order.len());
    for &i in order {
        let r = natural[i].clone();
        grid.push(at..at + r.len());
        at += r.len();
        place.push(r);
    }
    (Arc::new(grid), Arc::new(place))
}

/// `x` (in the vector's order) in the order of `grid`, whose chunk `j` holds the vector's
/// floats `place[j]`; empty stays empty.
pub fn to_grid_order(x: &[f32], grid: &[Range<usize>], place: &[Range<usize>]) -> Vec<f32> {
    move_chunks(x, place, grid)
}

/// The inverse of [`to_grid_order`]: `w` in grid order back in the vector's order.
pub fn to_vector_order(w: &[f32], grid: &[Range<usize>], place: &[Range<usize>]) -> Vec<f32> {
    move_chunks(w, grid, place)
}

/// A copy of `x` with its floats `from[j]` moved to `to[j]`, for every `j`.
fn move_chunks(x: &[f32], from: &[Range<usize>], to: &[Range<usize>]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    if !x.is_empty() {
        for (f, t) in from.iter().zip(to) {
            out[t.clone()].copy_from_slice(&x[f.clone()]);
        }
    }
    out
}

/// Encodes floats as a payload in a fresh buffer (see [`encode_pooled`] for the hot paths).
pub fn encode(values: &[f32], enc: Encoding) -> Bytes {
    let mut b = vec![0u8; values.len() * bytes_per_float(enc)];
    encode_into(values, enc, &mut b);
    Bytes::from(b)
}

/// Encodes floats into a buffer of `pool` (memory of earlier payloads, no page faults).
#[inline(always)]
pub fn encode_pooled(values: &[f32], enc: Encoding, pool: &BufPool) -> Bytes {
    let mut b = pool.take(values.len() * bytes_per_float(enc));
    encode_into(values, enc, b.as_mut());
    b.freeze()
}

/// Writes the payload bytes of `values` to `out`, which holds exactly
/// `values.len() * bytes_per_float(enc)` bytes. bf16 rounds each float branch-free, so the loop
/// vectorizes; f32 on a little-endian machine is one copy.
#[inline]
pub fn encode_into(values: &[f32], enc: Encoding, out: &mut [u8]) {
    assert_eq!(
        out.len(),
        values.len() * bytes_per_float(enc),
        "payload buffer size"
    );
    match enc {
        Encoding::Bf16 => {
            for (o, &x) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f32_to_bf16(x).to_le_bytes());
            }
        }
        #[cfg(target_endian = "little")]
        _ => out.copy_from_slice(bytemuck::cast_slice(values)),
        #[cfg(not(target_endian = "little"))]
        _ => {
            for (o, &x) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Payload buffers that return to their pool when the last [`Bytes`] into them is dropped, so
/// that each round's payloads reuse the memory of the round before instead of faulting in (and
/// zeroing) fresh pages: 33 MB per update and per pull.
#[derive(Clone, Debug)]
pub struct BufPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl BufPool {
    /// A pool that keeps at most `keep` free buffers.
    pub fn new(keep: usize) -> Self {
        BufPool {
            free: Arc::default(),
            keep,
        }
    }

    /// A buffer of `len` bytes; its contents are left over from earlier payloads (or zeros).
    pub fn take(&self, len: usize) -> PoolBuf {
        let reused = self.free.lock().ok().and_then(|mut f| {
            // Prefer a buffer that is large enough, so that it does not grow.
            let i = f.iter().position(|b| b.capacity() >= len)?;
            Some(f.swap_remove(i))
        });
        let mut data = reused.unwrap_or_default();
        data.resize(len, 0);
        data.truncate(len);
        PoolBuf {
            data,
            pool: Arc::downgrade(&self.free),
            keep: self.keep,
        }
    }

    /// Free buffers held now.
    pub fn free_buffers(&self) -> usize {
        self.free.lock().map_or(0, |f| f.len())
    }
}

/// A buffer taken from a [`BufPool`]; write it through `as_mut`, then `freeze` it into a payload.
#[derive(Debug)]
pub struct PoolBuf {
    data: Vec<u8>,
    pool: Weak<Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl PoolBuf {
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// The buffer as a vector, to append to (a payload whose length is known only once written).
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl AsMut<[u8]> for PoolBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade()
            && let Ok(mut free) = pool.lock()
            && free.len() < self.keep
        {
            free.push(std::mem::take(&mut self.data));
        }
    }
}

/// Decodes a payload into `out` (whose length must match).
#[inline]
pub fn decode_into(payload: &[u8], enc: Encoding, out: &mut [f32]) -> Result<()> {
    let n = bytes_per_float(enc);
    if payload.len() != out.len() * n {
        return Err(ProtoError::Invalid(format!(
            "payload of {} bytes does not hold {} floats of {n} bytes",
            payload.len(),
            out.len()
        )));
    }
    match enc {
        Encoding::Bf16 => {
            for (o, c) in out.iter_mut().zip(payload.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        #[cfg(target_endian = "little")]
        _ => bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(payload),
        #[cfg(not(target_endian = "little"))]
        _ => {
            for (o, c) in out.iter_mut().zip(payload.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    Ok(())
}

/// What [`scan`] found in a payload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scan {
    /// Every value within bounds; the sum of squares of the values (or of their differences
    /// from the reference).
    Ok { sum_sq: f64 },
    /// The first value out of bounds (not finite, too large, or too far from its reference),
    /// and where.
    Bad {
        index: usize,
        value: f32,
        /// Its reference value, when one was given.
        reference: Option<f32>,
    },
}

/// The bounds [`scan`] checks every value against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    /// `|x| <= max_abs` (which also fails NaN and infinities).
    pub max_abs: f32,
    /// With a reference: `|x - r| <= abs + rel * |r|`.
    pub max_delta: Option<(f32, f32)>,
}

/// Checks every value of `payload` (in `enc`) against `bounds` and sums the squares of
/// `x - reference` (the reference decoded from its own encoding; zero without one): an
/// update's squared norm, or in params mode its squared distance from the parameters it
/// started from. One pass, in blocks summed in f32 and added up in f64.
#[inline(always)]
pub fn scan(
    payload: &[u8],
    enc: Encoding,
    reference: Option<(&[u8], Encoding)>,
    bounds: Bounds,
) -> Scan {
    const B: usize = 1024;
    let bpf = bytes_per_float(enc);
    let n = payload.len() / bpf;
    let (mut x, mut r) = ([0.0f32; B], [0.0f32; B]);
    let (delta_abs, delta_rel) = match (reference, bounds.max_delta) {
        (Some(_), Some(d)) => d,
        _ => (f32::INFINITY, 0.0),
    };
    let ok = |a: f32, b: f32| {
        a.abs() <= bounds.max_abs && (a - b).abs() <= delta_abs + delta_rel * b.abs()
    };
    let mut sum_sq = 0.0f64;
    let mut start = 0;
    while start < n {
        let len = B.min(n - start);
        let xs = &mut x[..len];
        let _ = decode_into(&payload[start * bpf..(start + len) * bpf], enc, xs);
        let rs = &mut r[..len];
        if let Some((p, e)) = reference {
            rs.fill(0.0);
            let rb = bytes_per_float(e);
            if let Some(p) = p.get(start * rb..(start + len) * rb) {
                let _ = decode_into(p, e, rs);
            }
        }
        let (block, mut bad) = squares_within(xs, reference.map(|_| &rs[..]), bounds.max_abs);
        if reference.is_some() && bounds.max_delta.is_some() {
            bad |= xs.iter().zip(rs.iter()).any(|(&a, &b)| !ok(a, b));
        }
        if bad {
            let i = xs
                .iter()
                .zip(rs.iter())
                .position(|(&a, &b)| !ok(a, b))
                .unwrap_or(0);
            return Scan::Bad {
                index: start + i,
                value: xs[i],
                reference: reference.map(|_| rs[i]),
            };
        }
        sum_sq += f64::from(block);
        start += len;
    }
    Scan::Ok { sum_sq }
}

/// The sum of squares of `x - r` (of `x` without `r`), and whether some `|x| > max_abs`
/// (NaN and infinities included, compared on the bits): eight lanes, so the loop vectorizes.
#[inline]
fn squares_within(x: &[f32], r: Option<&[f32]>, max_abs: f32) -> (f32, bool) {
    let max_bits = max_abs.to_bits();
    let mut lanes = [0.0f32; 8];
    let mut over = 0u32;
    let mut step = |a: &[f32], b: Option<&[f32]>| {
        for k in 0..a.len() {
            let d = a[k] - b.map_or(0.0, |b| b[k]);
            lanes[k] += d * d;
            over |= u32::from((a[k].to_bits() & 0x7FFF_FFFF) > max_bits);
        }
    };
    let xe = x.chunks_exact(8);
    let tail = xe.remainder();
    match r {
        Some(r) => {
            for (a, b) in xe.zip(r.chunks_exact(8)) {
                step(a, Some(b));
            }
            step(tail, Some(&r[x.len() - tail.len()..]));
        }
        None => {
            for a in xe {
                step(a, None);
            }
            step(tail, None);
        }
    }
    (lanes.iter().sum(), over != 0)
}

/// `out += w * payload` element by element (the payload decoded from `enc`; lengths must
/// match).
#[inline]
pub fn add_scaled(out: &mut [f32], w: f32, payload: &[u8], enc: Encoding) {
    match enc {
        Encoding::Bf16 => {
            for (o, c) in out.iter_mut().zip(payload.chunks_exact(2)) {
                *o += w * bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        _ => {
            for (o, c) in out.iter_mut().zip(payload.chunks_exact(4)) {
                *o += w * f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

pub fn crc32(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// Delta pulls: a parameter chunk sent as its change from the round before, which the puller
/// holds. With `x` the XOR of a float's old and new payload word (`w` bytes, little-endian:
/// 4 for f32, 2 for bf16), an Adam step changes the low bits of almost every float but the top
/// byte (the sign and most of the exponent) of few: the payload is the low `w - 1` bytes of
/// every `x`, float by float, then each nonzero top byte as a LEB128 gap (its float's index
/// minus the index after the previous one's) and the byte. Lossless: the puller rebuilds the
/// exact payload of the round and checks it against the chunk's CRC.
///
/// One block of a delta: the low bytes of `old` XOR `new` (the payload of `old.len()` floats)
/// into `low` (`old.len() * (w - 1)` bytes), and each nonzero top byte with its float's index
/// (from `first`) into `high`.
#[inline]
pub fn delta_block(
    old: &[f32],
    new: &[u8],
    enc: Encoding,
    low: &mut [u8],
    first: u32,
    high: &mut Vec<(u32, u8)>,
) {
    let w = bytes_per_float(enc);
    debug_assert!(new.len() == old.len() * w && low.len() == old.len() * (w - 1));
    // Eight floats at a time, the top bytes looked at one by one only where one of the eight
    // changed (few do), so that the loop over the low bytes vectorizes; then the rest.
    const G: usize = 8;
    let body = old.len() / G * G;
    let mut x = [0u32; G];
    let mut push = |at: usize, x: &[u32], shift: u32| {
        for (k, &v) in x.iter().enumerate() {
            if v >> shift != 0 {
                high.push((first + (at + k) as u32, (v >> shift) as u8));
            }
        }
    };
    match enc {
        Encoding::Bf16 => {
            for (g, ((o, n), l)) in (old[..body].chunks_exact(G))
                .zip(new.chunks_exact(2 * G))
                .zip(low.chunks_exact_mut(G))
                .enumerate()
            {
                let mut any = 0;
                for k in 0..G {
                    let v = f32_to_bf16(o[k]) ^ u16::from_le_bytes([n[2 * k], n[2 * k + 1]]);
                    l[k] = v as u8;
                    x[k] = u32::from(v);
                    any |= v;
                }
                if any >> 8 != 0 {
                    push(g * G, &x, 8);
                }
            }
            for i in body..old.len() {
                let v = f32_to_bf16(old[i]) ^ u16::from_le_bytes([new[2 * i], new[2 * i + 1]]);
                low[i] = v as u8;
                push(i, &[u32::from(v)], 8);
            }
        }
        _ => {
            for (g, ((o, n), l)) in (old[..body].chunks_exact(G))
                .zip(new.chunks_exact(4 * G))
                .zip(low.chunks_exact_mut(3 * G))
                .enumerate()
            {
                let mut any = 0;
                for k in 0..G {
                    let v = o[k].to_bits()
                        ^ u32::from_le_bytes([n[4 * k], n[4 * k + 1], n[4 * k + 2], n[4 * k + 3]]);
                    x[k] = v;
                    any |= v;
                }
                // Four floats' low bytes in three words.
                for (q, l) in x.chunks_exact(4).zip(l.chunks_exact_mut(12)) {
                    let a = (q[0] & 0x00FF_FFFF) | (q[1] << 24);
                    let b = ((q[1] >> 8) & 0xFFFF) | (q[2] << 16);
                    let c = ((q[2] >> 16) & 0xFF) | (q[3] << 8);
                    l[0..4].copy_from_slice(&a.to_le_bytes());
                    l[4..8].copy_from_slice(&b.to_le_bytes());
                    l[8..12].copy_from_slice(&c.to_le_bytes());
                }
                if any >> 24 != 0 {
                    push(g * G, &x, 24);
                }
            }
            for i in body..old.len() {
                let n = &new[4 * i..4 * i + 4];
                let v = old[i].to_bits() ^ u32::from_le_bytes([n[0], n[1], n[2], n[3]]);
                low[3 * i..3 * i + 3].copy_from_slice(&v.to_le_bytes()[..3]);
                push(i, &[v], 24);
            }
        }
    }
}

/// A buffer for the low bytes of a delta of `n` floats (zeroed), with room for the top bytes of
/// one float in four.
pub fn delta_buffer(n: usize, enc: Encoding) -> Vec<u8> {
    let low = n * (bytes_per_float(enc) - 1);
    let mut b = Vec::with_capacity(low + n / 2);
    b.resize(low, 0);
    b
}

/// Appends the top bytes of [`delta_block`] (in index order) to a delta's low bytes.
pub fn delta_finish(low: &mut Vec<u8>, high: &[(u32, u8)]) {
    low.reserve(high.len() * 2);
    let mut next = 0u32;
    for &(i, b) in high {
        let mut gap = i - next;
        loop {
            let more = gap >= 0x80;
            low.push((gap as u8 & 0x7F) | if more { 0x80 } else { 0 });
            gap >>= 7;
            if !more {
                break;
            }
        }
        low.push(b);
        next = i + 1;
    }
}

/// The delta of the payload `new` (of `old.len()` floats as `enc`) from the floats `old`.
pub fn delta_encode(old: &[f32], new: &[u8], enc: Encoding) -> Bytes {
    let mut low = delta_buffer(old.len(), enc);
    let mut high = vec![];
    delta_block(old, new, enc, &mut low, 0, &mut high);
    delta_finish(&mut low, &high);
    Bytes::from(low)
}

/// Rebuilds into `out` the payload that the delta `delta` of [`delta_encode`] makes of the
/// floats `old` (as `enc`). A delta that does not fit `old.len()` floats is an error.
pub fn delta_decode(delta: &[u8], old: &[f32], enc: Encoding, out: &mut Vec<u8>) -> Result<()> {
    let w = bytes_per_float(enc);
    let n = old.len();
    let bad = |why: String| ProtoError::Invalid(format!("delta of {n} floats: {why}"));
    let (low, mut rest) = delta
        .split_at_checked(n * (w - 1))
        .ok_or_else(|| bad(format!("{} bytes, too few for the low bytes", delta.len())))?;
    out.clear();
    out.resize(n * w, 0);
    // The low bytes, XORed onto the old payload.
    match enc {
        Encoding::Bf16 => {
            for ((o, &x), &l) in out.chunks_exact_mut(2).zip(old).zip(low) {
                o.copy_from_slice(&(f32_to_bf16(x) ^ u16::from(l)).to_le_bytes());
            }
        }
        _ => {
            // Four floats' low bytes from three words, then the rest.
            let body = n / 4 * 4;
            for ((o, x), l) in (out[..body * 4].chunks_exact_mut(16))
                .zip(old.chunks_exact(4))
                .zip(low.chunks_exact(12))
            {
                let word = |k: usize| u32::from_le_bytes([l[k], l[k + 1], l[k + 2], l[k + 3]]);
                let (a, b, c) = (word(0), word(4), word(8));
                let d = [
                    a & 0x00FF_FFFF,
                    (a >> 24) | ((b & 0xFFFF) << 8),
                    (b >> 16) | ((c & 0xFF) << 16),
                    c >> 8,
                ];
                for k in 0..4 {
                    o[4 * k..4 * k + 4].copy_from_slice(&(x[k].to_bits() ^ d[k]).to_le_bytes());
                }
            }
            for i in body..n {
                let l = &low[3 * i..3 * i + 3];
                let d = u32::from_le_bytes([l[0], l[1], l[2], 0]);
                out[4 * i..4 * i + 4].copy_from_slice(&(old[i].to_bits() ^ d).to_le_bytes());
            }
        }
    }
    // The top bytes.
    let mut next = 0usize;
    while !rest.is_empty() {
        let mut gap = 0usize;
        let mut shift = 0;
        loop {
            let (&b, r) = rest
                .split_first()
                .ok_or_else(|| bad("a top byte's gap is cut short".into()))?;
            rest = r;
            if shift > 28 {
                return Err(bad("a top byte's gap is too long".into()));
            }
            gap |= usize::from(b & 0x7F) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let i = next
            .checked_add(gap)
            .filter(|&i| i < n)
            .ok_or_else(|| bad(format!("a top byte for float {} or later", next + gap)))?;
        let (&b, r) = rest
            .split_first()
            .ok_or_else(|| bad(format!("no top byte for float {i}")))?;
        rest = r;
        if b == 0 {
            return Err(bad(format!("a zero top byte for float {i}")));
        }
        out[i * w + w - 1] ^= b;
        next = i + 1;
    }
    Ok(())
}

/// One encoded chunk, before it is put in a message.
#[derive(Clone, Debug)]
pub struct EncodedChunk {
    pub offset: u64,
    pub payload: Bytes,
    pub crc32: u32,
    /// Set on the last chunk: CRC-32 of all payloads in order.
    pub total_crc32: Option<u32>,
    /// The payload as its change from the previous round's ([`delta_encode`]), for pullers
    /// that hold that.
    pub delta: Option<Bytes>,
    /// Where the payload lies in shared memory, for pullers on this machine
    /// ([`capsnet_shm::SlotPool`]).
    pub shared: Option<capsnet_shm::At>,
}

/// Cuts `values` into encoded chunks with their checksums.
pub fn encode_chunks(values: &[f32], enc: Encoding, chunk_bytes: usize) -> Vec<EncodedChunk> {
    chunk_encoder(values, enc, chunk_bytes, &BufPool::new(0)).collect()
}

/// [`encode_chunks`] one chunk at a time, as the iterator is advanced: a sender encodes the next
/// chunk while the previous one is on the wire. `values` is owned (a `Vec<f32>`, an
/// `Arc<[f32]>`) or borrowed. Payloads are written into buffers of `pool`.
pub fn chunk_encoder<V: AsRef<[f32]>>(
    values: V,
    enc: Encoding,
    chunk_bytes: usize,
    pool: &BufPool,
) -> impl Iterator<Item = EncodedChunk> + use<V> {
    let pool = pool.clone();
    let ranges: Vec<Range<usize>> = chunk_ranges(values.as_ref().len(), enc, chunk_bytes).collect();
    let mut total = GridCrc::new(ranges.len());
    ranges.into_iter().enumerate().map(move |(i, r)| {
        let payload = encode_pooled(&values.as_ref()[r.clone()], enc, &pool);
        // One pass over the bytes: the chunk's CRC, also part of the total.
        let mut h = crc32fast::Hasher::new();
        h.update(&payload);
        total.record(i, h.clone());
        EncodedChunk {
            offset: r.start as u64,
            crc32: h.finalize(),
            payload,
            total_crc32: total.total(),
            delta: None,
            shared: None,
        }
    })
}

/// One received chunk, as the assembler checks it.
#[derive(Clone, Copy, Debug)]
pub struct ChunkIn<'a> {
    pub offset: u64,
    pub total: u64,
    pub encoding: Encoding,
    pub payload: &'a [u8],
    pub crc32: u32,
    pub total_crc32: Option<u32>,
}

impl<'a> ChunkIn<'a> {
    /// An encoded chunk of a `total`-float vector as its receiver sees it (tests, and
    /// in-process streams).
    pub fn of(c: &'a EncodedChunk, total: u64, encoding: Encoding) -> Self {
        ChunkIn {
            offset: c.offset,
            total,
            encoding,
            payload: &c.payload,
            crc32: c.crc32,
            total_crc32: c.total_crc32,
        }
    }
}

/// Update and parameter chunks carry the same fields; one conversion serves both.
macro_rules! chunk_in_from {
    ($($msg:ty),*) => {$(
        impl<'a> From<&'a $msg> for ChunkIn<'a> {
            fn from(c: &'a $msg) -> Self {
                ChunkIn {
                    offset: c.offset,
                    total: c.total_len,
                    encoding: Encoding::try_from(c.encoding).unwrap_or(Encoding::Unspecified),
                    payload: &c.payload,
                    crc32: c.crc32,
                    total_crc32: c.total_crc32,
                }
            }
        }
    )*};
}
chunk_in_from!(crate::pb::UpdateChunk, crate::pb::ParamChunk);

/// The CRC-32 of a whole stream, combined from its chunks' in grid order whatever order they
/// were sent or received in.
#[derive(Clone, Debug)]
pub struct GridCrc {
    parts: Vec<Option<crc32fast::Hasher>>,
    missing: usize,
}

impl GridCrc {
    /// For a stream of `chunks` chunks.
    pub fn new(chunks: usize) -> Self {
        GridCrc {
            parts: vec![None; chunks],
            missing: chunks,
        }
    }

    /// Records chunk `index`'s hasher; false when it was recorded before (or is off the grid).
    pub fn record(&mut self, index: usize, h: crc32fast::Hasher) -> bool {
        match self.parts.get_mut(index) {
            Some(slot @ None) => {
                *slot = Some(h);
                self.missing -= 1;
                true
            }
            _ => false,
        }
    }

    pub fn has(&self, index: usize) -> bool {
        self.parts.get(index).is_some_and(Option::is_some)
    }

    /// Chunks not recorded yet.
    pub fn missing(&self) -> usize {
        self.missing
    }

    /// The whole stream's CRC once every chunk is recorded.
    pub fn total(&self) -> Option<u32> {
        if self.missing > 0 {
            return None;
        }
        let mut whole = crc32fast::Hasher::new();
        for h in self.parts.iter().flatten() {
            whole.combine(h);
        }
        Some(whole.finalize())
    }
}

/// Cuts the chunks of `grid` into `parts` contiguous spans of chunk indices, balanced by floats
/// (so by bytes): span k ends at the chunk boundary nearest to k/parts of the floats, and none
/// is empty. None when there are fewer chunks than parts. The spans a run's reducers own.
pub fn spans(grid: &[Range<usize>], parts: usize) -> Option<Vec<Range<usize>>> {
    let n = grid.len();
    if parts == 0 || parts > n {
        return None;
    }
    let total = grid.last().map_or(0, |r| r.end) as f64;
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for k in 1..=parts {
        let end = if k == parts {
            n
        } else {
            let want = total * k as f64 / parts as f64;
            // The boundary after chunk i is grid[i].end; leave room for the spans still to come.
            let lo = start + 1;
            let hi = n - (parts - k);
            (lo..=hi)
                .min_by(|&a, &b| {
                    let da = (grid[a - 1].end as f64 - want).abs();
                    let db = (grid[b - 1].end as f64 - want).abs();
                    da.total_cmp(&db)
                })
                .unwrap_or(lo)
        };
        out.push(start..end);
        start = end;
    }
    Some(out)
}

/// The chunks `span` of `grid` of a vector whose span holds `values` (the span's floats, from
/// its first chunk's start), encoded as `enc`: offsets on the whole grid, the last chunk with
/// the CRC-32 of the span's payloads in grid order (what [`Assembler::span`] checks).
pub fn encode_span(
    values: &[f32],
    grid: &[Range<usize>],
    span: Range<usize>,
    enc: Encoding,
) -> Vec<EncodedChunk> {
    let base = grid.get(span.start).map_or(0, |r| r.start);
    let mut total = crc32fast::Hasher::new();
    let n = span.len();
    span.enumerate()
        .map(|(k, i)| {
            let r = grid[i].clone();
            let payload = encode(&values[r.start - base..r.end - base], enc);
            let mut h = crc32fast::Hasher::new();
            h.update(&payload);
            total.combine(&h);
            EncodedChunk {
                offset: r.start as u64,
                crc32: h.finalize(),
                payload,
                total_crc32: (k + 1 == n).then(|| total.clone().finalize()),
                delta: None,
                shared: None,
            }
        })
        .collect()
}

/// The hasher of a chunk whose CRC-32 and length are known (no pass over its bytes).
pub fn chunk_hasher(crc: u32, len: usize) -> crc32fast::Hasher {
    crc32fast::Hasher::new_with_initial_len(crc, len as u64)
}

/// Checks a chunk stream as it arrives and decodes it into a buffer. The stream is cut on the
/// run's grid: every chunk covers exactly one range of it, in any order, each once; all agree
/// on the total length and encoding and match their CRC; the chunk that completes the stream
/// (and only that one) carries the CRC of all payloads in grid order.
#[derive(Debug)]
pub struct Assembler {
    grid: Grid,
    /// The chunk indices the stream covers: the whole grid, or one reducer's span.
    span: Range<usize>,
    total: u64,
    enc: Encoding,
    crc: GridCrc,
    /// False for a stream within one process ([`Assembler::in_process`]).
    verify: bool,
}

impl Assembler {
    /// `grid`: the run's chunk ranges (they end at the number of floats the receiver's model
    /// has); `first_total` and `enc`: what the first chunk says.
    pub fn new(grid: Grid, first_total: u64, enc: Encoding) -> Result<Self> {
        let n = grid.len();
        Self::span(grid, 0..n, first_total, enc)
    }

    /// A stream of the chunks `span` of the grid only (one reducer's share, [`spans`]): the
    /// same checks, and the total checksum over the span's payloads in grid order.
    pub fn span(grid: Grid, span: Range<usize>, first_total: u64, enc: Encoding) -> Result<Self> {
        if span.is_empty() || span.end > grid.len() {
            return Err(ProtoError::Invalid(format!(
                "chunks {span:?} are not a span of a grid of {} chunks",
                grid.len()
            )));
        }
        let expected = grid.last().map_or(0, |r| r.end) as u64;
        if first_total != expected {
            return Err(ProtoError::Size {
                expected,
                got: first_total,
            });
        }
        if enc == Encoding::Unspecified {
            return Err(ProtoError::Invalid("encoding unspecified".into()));
        }
        Ok(Assembler {
            crc: GridCrc::new(span.len()),
            grid,
            span,
            total: expected,
            enc,
            verify: true,
        })
    }

    /// For a stream between two parts of one process (a worker and the reducer it serves),
    /// where no byte crosses a wire: every check but the checksums' values (which such a
    /// sender does not compute). Never for a stream that came over a connection.
    pub fn in_process(mut self) -> Self {
        self.verify = false;
        self
    }

    /// The grid of a `total`-float vector sent as `enc` in chunks of `chunk_bytes`.
    pub fn grid(total: usize, enc: Encoding, chunk_bytes: usize) -> Grid {
        Arc::new(chunk_ranges(total, enc, chunk_bytes).collect())
    }

    /// Checks one chunk and decodes it into `out[range]` (the whole vector's buffer).
    pub fn accept(&mut self, chunk: ChunkIn<'_>, out: &mut [f32]) -> Result<usize> {
        let (i, r) = self.check(chunk)?;
        decode_into(chunk.payload, chunk.encoding, &mut out[r])?;
        Ok(i)
    }

    /// Checks one chunk (grid, sizes, encoding, checksums) without decoding it, and returns
    /// its index on the grid and the float range it covers.
    pub fn check(&mut self, chunk: ChunkIn<'_>) -> Result<(usize, Range<usize>)> {
        let ChunkIn {
            offset,
            total,
            encoding: enc,
            payload,
            crc32: chunk_crc,
            total_crc32: total_crc,
        } = chunk;
        let err = |reason: String| ProtoError::Chunk { offset, reason };
        if self.crc.missing() == 0 {
            return Err(err("chunk after the last one".into()));
        }
        if total != self.total {
            return Err(ProtoError::Size {
                expected: self.total,
                got: total,
            });
        }
        if enc != self.enc {
            return Err(err(format!(
                "encoding changed mid-stream from {:?} to {enc:?}",
                self.enc
            )));
        }
        let index = self
            .grid
            .binary_search_by_key(&offset, |r| r.start as u64)
            .map_err(|_| err("not the start of a chunk of this run's grid".into()))?;
        if !self.span.contains(&index) {
            return Err(err(format!(
                "chunk {index} is not one of this stream's chunks {:?}",
                self.span
            )));
        }
        let r = self.grid[index].clone();
        let slot = index - self.span.start;
        let bpf = bytes_per_float(enc);
        if payload.len() != r.len() * bpf {
            return Err(err(format!(
                "payload of {} bytes; this run's chunk there holds {} floats ({} bytes)",
                payload.len(),
                r.len(),
                r.len() * bpf
            )));
        }
        if self.crc.has(slot) {
            return Err(err("sent twice".into()));
        }
        if !self.verify {
            let last = self.crc.missing() == 1;
            if last != total_crc.is_some() {
                return Err(err(if last {
                    "last chunk carries no total checksum".into()
                } else {
                    "total checksum on a chunk that is not the last".into()
                }));
            }
            self.crc
                .record(slot, chunk_hasher(chunk_crc, payload.len()));
            return Ok((index, r));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(payload);
        let got = h.clone().finalize();
        if got != chunk_crc {
            return Err(ProtoError::Checksum {
                what: format!("in the chunk at offset {offset}"),
                sent: chunk_crc,
                got,
            });
        }
        let last = self.crc.missing() == 1;
        if last {
            let sent =
                total_crc.ok_or_else(|| err("last chunk carries no total checksum".into()))?;
            let mut whole = self.crc.clone();
            whole.record(slot, h.clone());
            let got = whole.total().unwrap_or_default();
            if sent != got {
                return Err(ProtoError::Checksum {
                    what: "over the whole tensor".into(),
                    sent,
                    got,
                });
            }
        } else if total_crc.is_some() {
            return Err(err("total checksum on a chunk that is not the last".into()));
        }
        self.crc.record(slot, h);
        Ok((index, r))
    }

    /// Whether every chunk arrived and checked out.
    pub fn finish(&self) -> Result<()> {
        if self.crc.missing() == 0 {
            return Ok(());
        }
        let got = (self.span.clone())
            .filter(|&i| self.crc.has(i - self.span.start))
            .map(|i| self.grid[i].len() as u64)
            .sum();
        Err(ProtoError::Size {
            expected: self.total,
            got,
        })
    }
}

#[cfg(test)]
mod tests {
    /// A delta rebuilds the exact payload, in both encodings, whatever changed: small steps
    /// (few top bytes), sign flips and exponent changes (many), nothing, everything.
    #[test]
    fn a_delta_rebuilds_the_payload_of_the_new_floats() {
        // Not a multiple of the blocks of eight: the rest is encoded one by one.
        let old: Vec<f32> = (0..5003)
            .map(|i| ((i * 7919) % 2001) as f32 * 1e-4 - 0.1)
            .collect();
        let steps: [&dyn Fn(usize, f32) -> f32; 4] = [
            &|i, x| x - 1e-3 * (((i * 31) % 17) as f32 / 8.0 - 1.0),
            &|i, x| if i % 3 == 0 { -x * 4.0 } else { x },
            &|_, x| x,
            &|i, _| (i as f32).sin() * 1e6,
        ];
        for enc in [Encoding::F32, Encoding::Bf16] {
            let w = bytes_per_float(enc);
            // What the puller holds: the old payload, decoded.
            let mut held = vec![0.0; old.len()];
            decode_into(&encode(&old, enc), enc, &mut held).unwrap();
            for (k, step) in steps.iter().enumerate() {
                let new: Vec<f32> = old.iter().enumerate().map(|(i, &x)| step(i, x)).collect();
                let payload = encode(&new, enc);
                // The reducer encodes from its f32 master copy; the puller from what it holds.
                let d = delta_encode(&old, &payload, enc);
                let mut out = vec![];
                delta_decode(&d, &held, enc, &mut out).unwrap();
                assert_eq!(out, payload.as_ref(), "{enc:?} step {k}");
                if k == 0 {
                    // Small steps: the low bytes and a few top bytes.
                    assert!(d.len() < old.len() * (w - 1) + old.len() / 5, "{}", d.len());
                }
                if k == 2 {
                    assert_eq!(d.len(), old.len() * (w - 1));
                }
            }
            // Block by block, as a reducer builds it, the same bytes.
            let new: Vec<f32> = old.iter().map(|&x| x * 1.5).collect();
            let payload = encode(&new, enc);
            let mut low = vec![0u8; old.len() * (w - 1)];
            let mut high = vec![];
            for (b, (o, l)) in old
                .chunks(1024)
                .zip(low.chunks_mut(1024 * (w - 1)))
                .enumerate()
            {
                let p = &payload[b * 1024 * w..(b * 1024 + o.len()) * w];
                delta_block(o, p, enc, l, (b * 1024) as u32, &mut high);
            }
            delta_finish(&mut low, &high);
            assert_eq!(low, delta_encode(&old, &payload, enc));
        }
    }

    /// A delta that does not fit the floats it is for is refused with what is wrong, never read
    /// out of bounds.
    #[test]
    fn a_delta_that_does_not_fit_is_refused() {
        let old = vec![1.0f32; 10];
        let mut new = old.clone();
        new[9] = -1.0;
        let d = delta_encode(&old, &encode(&new, Encoding::F32), Encoding::F32);
        assert_eq!(d.len(), 30 + 2); // gap 9, then the top byte
        let mut out = vec![];
        let err = |d: &[u8]| {
            let mut out = vec![];
            delta_decode(d, &old, Encoding::F32, &mut out)
                .unwrap_err()
                .to_string()
        };
        assert!(
            err(&d[..29]).contains("too few for the low bytes"),
            "{}",
            err(&d[..29])
        );
        assert!(err(&d[..31]).contains("no top byte for float 9"));
        let mut far = d[..30].to_vec();
        far.extend([10, 0x80]);
        assert!(err(&far).contains("float 10 or later"), "{}", err(&far));
        let mut zero = d[..30].to_vec();
        zero.extend([3, 0]);
        assert!(err(&zero).contains("zero top byte for float 3"));
        let mut long = d[..30].to_vec();
        long.extend([0x80; 6]);
        assert!(err(&long).contains("too long"), "{}", err(&long));
        let mut cut = d[..30].to_vec();
        cut.push(0x80);
        assert!(err(&cut).contains("cut short"));
        // A second top byte for the last float runs past the end.
        let mut twice = d.to_vec();
        twice.extend([0, 0x80]);
        assert!(err(&twice).contains("float 10 or later"));
        delta_decode(&d, &old, Encoding::F32, &mut out).unwrap();
        assert_eq!(out, encode(&new, Encoding::F32).as_ref());
    }

    /// The norm (and distance) are exact sums of squares; values out of bounds are found
    /// where they are, in both encodings.
    #[test]
    fn scan_sums_squares_and_finds_values_out_of_bounds() {
        let bounds = Bounds {
            max_abs: 1e15,
            max_delta: Some((0.5, 0.0)),
        };
        let x: Vec<f32> = (0..3001).map(|i| (i % 7) as f32 - 3.0).collect();
        let want: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
        for enc in [Encoding::F32, Encoding::Bf16] {
            let p = encode(&x, enc);
            let Scan::Ok { sum_sq } = scan(&p, enc, None, bounds) else {
                panic!("{enc:?}")
            };
            assert!(
                (sum_sq - want).abs() < 1e-6 * want,
                "{enc:?}: {sum_sq} vs {want}"
            );
            for (at, bad) in [(5, f32::NAN), (2999, f32::INFINITY), (1024, 1e30)] {
                let mut y = x.clone();
                y[at] = bad;
                match scan(&encode(&y, enc), enc, None, bounds) {
                    Scan::Bad { index, .. } => assert_eq!(index, at, "{enc:?} {bad}"),
                    s => panic!("{enc:?} {bad}: {s:?}"),
                }
            }
        }
        // Against a reference: the distance, and a value moved too far.
        let r = encode(&x, Encoding::F32);
        let mut y = x.clone();
        y[10] += 0.25;
        let Scan::Ok { sum_sq } = scan(
            &encode(&y, Encoding::F32),
            Encoding::F32,
            Some((&r, Encoding::F32)),
            bounds,
        ) else {
            panic!()
        };
        assert!((sum_sq - 0.0625).abs() < 1e-9, "{sum_sq}");
        y[2000] += 1.0;
        match scan(
            &encode(&y, Encoding::F32),
            Encoding::F32,
            Some((&r, Encoding::F32)),
            bounds,
        ) {
            Scan::Bad {
                index, reference, ..
            } => {
                assert_eq!((index, reference), (2000, Some(x[2000])));
            }
            s => panic!("{s:?}"),
        }
    }

    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect()
    }

    fn assemble(
        chunks: &[EncodedChunk],
        total: u64,
        enc: Encoding,
        chunk_bytes: usize,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0.0; total as usize];
        let grid = Assembler::grid(total as usize, enc, chunk_bytes);
        let mut a = Assembler::new(grid, total, enc)?;
        for c in chunks {
            a.accept(ChunkIn::of(c, total, enc), &mut out)?;
        }
        a.finish()?;
        Ok(out)
    }

    /// A payload's buffer goes back to the pool when its last `Bytes` is dropped, and not
    /// before; the pool keeps no more than it was told.
    #[test]
    fn pooled_buffers_are_reused_only_once_released() {
        let pool = BufPool::new(1);
        let v = values(1000);
        let a = encode_pooled(&v, Encoding::F32, &pool);
        let a2 = a.clone();
        let b = encode_pooled(&v, Encoding::Bf16, &pool);
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(a, encode(&v, Encoding::F32));
        assert_eq!(b, encode(&v, Encoding::Bf16));
        let a_ptr = a.as_ptr();
        drop(a);
        assert_eq!(pool.free_buffers(), 0, "a clone still holds it");
        drop(a2);
        assert_eq!(pool.free_buffers(), 1);
        drop(b);
        assert_eq!(pool.free_buffers(), 1, "kept more than asked");
        // The next payload of that size is written into the released buffer.
        let c = encode_pooled(&v[..500], Encoding::F32, &pool);
        assert_eq!(c.as_ptr(), a_ptr);
        assert_eq!(c, encode(&v[..500], Encoding::F32));
        // A buffer outliving its pool is simply freed.
        drop(pool);
        drop(c);
    }

    #[test]
    fn f32_round_trip_is_exact_and_chunks_respect_the_size() {
        let v = values(1000);
        let chunks = encode_chunks(&v, Encoding::F32, 400);
        assert_eq!(chunks.len(), 10);
        assert!(chunks.iter().all(|c| c.payload.len() <= 400));
        assert_eq!(assemble(&chunks, 1000, Encoding::F32, 400).unwrap(), v);
    }

    #[test]
    fn bf16_rounds_to_nearest_even_within_its_precision() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::INFINITY)), f32::INFINITY);
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even (1.0).
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        let v = values(333);
        let back = assemble(
            &encode_chunks(&v, Encoding::Bf16, 64),
            333,
            Encoding::Bf16,
            64,
        )
        .unwrap();
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 256.0, "{a} {b}");
        }
    }

    /// Chunks in any order assemble to the same vector when the one that completes the
    /// stream carries the total checksum (combined in grid order).
    #[test]
    fn chunks_in_any_order_assemble_with_the_total_on_the_last_sent() {
        let v = values(100);
        let mut chunks = encode_chunks(&v, Encoding::F32, 80);
        let total = chunks.last().and_then(|c| c.total_crc32);
        chunks.reverse();
        for c in &mut chunks {
            c.total_crc32 = None;
        }
        let last = chunks.len() - 1;
        chunks[last].total_crc32 = total;
        assert_eq!(assemble(&chunks, 100, Encoding::F32, 80).unwrap(), v);
        // The same total from a GridCrc fed in the order of sending.
        let mut g = GridCrc::new(chunks.len());
        for c in &chunks {
            let i = (c.offset / 20) as usize;
            assert!(g.record(i, chunk_hasher(c.crc32, c.payload.len())));
            assert_eq!(g.total().is_some(), g.missing() == 0);
        }
        assert_eq!(g.total(), total);
        assert!(!g.record(0, crc32fast::Hasher::new()), "recorded twice");
    }

    /// Spans are contiguous, cover the grid, are never empty, and split the floats as evenly
    /// as whole chunks allow.
    /// The stripe order is a permutation in which every run of consecutive grid chunks
    /// samples the whole vector: cut into spans for 2 to 8 reducers, every span of the paper
    /// model's grid holds chunks of the last 35% of the vector (what the backward pass makes
    /// final first) in about its share; the reordered grid tiles the vector, and the state
    /// goes to grid order and back unchanged.
    #[test]
    fn the_stripe_order_spreads_every_span_over_the_vector() {
        for n in [1, 2, 3, 7, 8, 126, 252] {
            let mut o = stripe_order(n);
            assert_eq!(o.len(), n);
            o.sort_unstable();
            assert_eq!(o, (0..n).collect::<Vec<_>>(), "{n}");
        }
        assert_eq!(stripe_order(8), vec![0, 4, 2, 6, 1, 5, 3, 7]);
        let natural: Vec<_> = chunk_ranges(8_215_568, Encoding::F32, 256 << 10).collect();
        let (grid, place) = reorder(&natural, &stripe_order(natural.len()));
        assert_eq!(grid.first().map(|r| r.start), Some(0));
        assert_eq!(grid.last().map(|r| r.end), Some(8_215_568));
        assert!(grid.windows(2).all(|w| w[0].end == w[1].start));
        let late = 8_215_568 * 65 / 100;
        for parts in 2..=8 {
            for s in spans(&grid, parts).unwrap() {
                let all: usize = grid[s.clone()].iter().map(|r| r.len()).sum();
                let first: usize = place[s.clone()]
                    .iter()
                    .filter(|r| r.start >= late)
                    .map(|r| r.len())
                    .sum();
                let share = first as f64 / all as f64;
                assert!((0.2..0.5).contains(&share), "{parts} spans, {s:?}: {share}");
            }
        }
        let x: Vec<f32> = (0..8_215_568).map(|i| i as f32).collect();
        let w = to_grid_order(&x, &grid, &place);
        assert_ne!(w, x);
        assert_eq!(to_vector_order(&w, &grid, &place), x);
        assert!(to_grid_order(&[], &grid, &place).is_empty());
    }

    #[test]
    fn spans_cover_the_grid_in_balanced_contiguous_parts() {
        let grid: Vec<_> = chunk_ranges(8_215_568, Encoding::F32, 1 << 20).collect();
        assert_eq!(grid.len(), 32);
        for parts in 1..=grid.len() {
            let s = spans(&grid, parts).unwrap();
            assert_eq!(s.len(), parts);
            assert_eq!(s[0].start, 0);
            assert_eq!(s[parts - 1].end, grid.len());
            assert!(s.windows(2).all(|w| w[0].end == w[1].start));
            assert!(s.iter().all(|r| !r.is_empty()));
            let floats: Vec<usize> = s
                .iter()
                .map(|r| grid[r.end - 1].end - grid[r.start].start)
                .collect();
            let (lo, hi) = (floats.iter().min().unwrap(), floats.iter().max().unwrap());
            // Within a chunk and a bit (a span boundary is a chunk boundary).
            assert!(hi - lo <= 2 * grid[0].len(), "{parts}: {floats:?}");
        }
        assert_eq!(spans(&grid, 3).unwrap(), vec![0..10, 10..21, 21..32]);
        assert!(spans(&grid, 0).is_none() && spans(&grid, 33).is_none());
    }

    /// A stream of one span: only its chunks, in any order, the total over the span.
    #[test]
    fn a_span_stream_takes_only_its_chunks() {
        let v = values(100);
        let chunks = encode_chunks(&v, Encoding::F32, 80);
        let grid = Assembler::grid(100, Encoding::F32, 80);
        let span = 1..3;
        let mut crc = GridCrc::new(2);
        for (k, c) in chunks[span.clone()].iter().enumerate() {
            crc.record(k, chunk_hasher(c.crc32, c.payload.len()));
        }
        let send = |a: &mut Assembler, c: &EncodedChunk, total: Option<u32>, out: &mut [f32]| {
            let chunk = ChunkIn {
                total_crc32: total,
                ..ChunkIn::of(c, 100, Encoding::F32)
            };
            a.accept(chunk, out)
        };
        let mut out = vec![0.0; 100];
        let mut a = Assembler::span(grid.clone(), span.clone(), 100, Encoding::F32).unwrap();
        let e = send(&mut a, &chunks[0], None, &mut out).unwrap_err();
        assert!(
            e.to_string().contains("not one of this stream's chunks"),
            "{e}"
        );
        assert_eq!(send(&mut a, &chunks[2], None, &mut out).unwrap(), 2);
        assert!(a.finish().is_err());
        assert_eq!(send(&mut a, &chunks[1], crc.total(), &mut out).unwrap(), 1);
        a.finish().unwrap();
        assert_eq!(out[20..60], v[20..60]);
        assert!(out[..20].iter().chain(&out[60..]).all(|&x| x == 0.0));
        assert!(Assembler::span(grid.clone(), 3..3, 100, Encoding::F32).is_err());
        assert!(Assembler::span(grid, 4..6, 100, Encoding::F32).is_err());
    }

    #[test]
    fn corrupt_missing_duplicate_off_grid_and_oversized_streams_are_rejected() {
        let v = values(100);
        let chunks = encode_chunks(&v, Encoding::F32, 80);
        let asm = |c: &[EncodedChunk]| assemble(c, 100, Encoding::F32, 80);
        // A flipped byte.
        let mut bad = chunks.clone();
        let mut p = bad[1].payload.to_vec();
        p[3] ^= 0x10;
        bad[1].payload = Bytes::from(p);
        assert!(matches!(asm(&bad), Err(ProtoError::Checksum { .. })));
        // A missing chunk: the total checksum comes before the stream is complete.
        let mut bad = chunks.clone();
        bad.remove(2);
        let e = asm(&bad).unwrap_err();
        assert!(e.to_string().contains("not the last"), "{e}");
        // A chunk sent twice.
        let mut bad = chunks.clone();
        bad.insert(1, chunks[0].clone());
        let e = asm(&bad).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        // A chunk off the grid (shifted by one float), and one cut short.
        let mut bad = chunks.clone();
        bad[1].offset += 1;
        let e = asm(&bad).unwrap_err();
        assert!(e.to_string().contains("grid"), "{e}");
        let mut bad = chunks.clone();
        bad[1].payload = bad[1].payload.slice(..40);
        bad[1].crc32 = crc32(&bad[1].payload);
        let e = asm(&bad).unwrap_err();
        assert!(e.to_string().contains("holds 20 floats"), "{e}");
        // Swapped chunks without moving the total checksum to the new last one.
        let mut bad = chunks.clone();
        let n = bad.len();
        bad.swap(n - 2, n - 1);
        let e = asm(&bad).unwrap_err();
        assert!(e.to_string().contains("total checksum"), "{e}");
        // Truncated stream.
        let bad = &chunks[..chunks.len() - 1];
        assert!(matches!(asm(bad), Err(ProtoError::Size { .. })));
        // Wrong total.
        assert!(matches!(
            Assembler::new(Assembler::grid(100, Encoding::F32, 80), 99, Encoding::F32),
            Err(ProtoError::Size {
                expected: 100,
                got: 99
            })
        ));
        // A forged total checksum.
        let mut bad = chunks;
        let last = bad.len() - 1;
        bad[last].total_crc32 = Some(0);
        assert!(matches!(asm(&bad), Err(ProtoError::Checksum { .. })));
    }

    /// A stream within one process goes without checksums: its assembler takes chunks whose
    /// checksums are zero (which a stream from a connection is refused for) and still holds
    /// it to everything else: the grid, each chunk once, the total on the last chunk only.
    #[test]
    fn an_in_process_stream_skips_the_checksums_and_nothing_else() {
        let v = values(100);
        let grid = Assembler::grid(100, Encoding::F32, 80);
        let mut chunks = encode_chunks(&v, Encoding::F32, 80);
        let last = chunks.len() - 1;
        for c in &mut chunks {
            c.crc32 = 0;
        }
        chunks[last].total_crc32 = Some(0);
        let feed = |a: &mut Assembler, cs: &[EncodedChunk], out: &mut [f32]| {
            cs.iter()
                .try_for_each(|c| a.accept(ChunkIn::of(c, 100, Encoding::F32), out).map(drop))
        };
        let fresh = || {
            Assembler::new(grid.clone(), 100, Encoding::F32)
                .unwrap()
                .in_process()
        };
        let mut out = vec![0.0; 100];
        let mut a = fresh();
        feed(&mut a, &chunks, &mut out).unwrap();
        a.finish().unwrap();
        assert_eq!(out, v);
        // Over a connection the same stream is refused at its first chunk.
        let mut net = Assembler::new(grid.clone(), 100, Encoding::F32).unwrap();
        let e = feed(&mut net, &chunks, &mut out).unwrap_err();
        assert!(matches!(e, ProtoError::Checksum { .. }), "{e}");
        // The other checks hold.
        let mut twice = chunks.clone();
        twice.insert(1, chunks[0].clone());
        let e = feed(&mut fresh(), &twice, &mut out).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let mut off = chunks.clone();
        off[1].offset += 1;
        let e = feed(&mut fresh(), &off, &mut out).unwrap_err();
        assert!(e.to_string().contains("grid"), "{e}");
        let mut early = chunks.clone();
        early[0].total_crc32 = Some(0);
        let e = feed(&mut fresh(), &early, &mut out).unwrap_err();
        assert!(e.to_string().contains("not the last"), "{e}");
        let mut none = chunks.clone();
        none[last].total_crc32 = None;
        let e = feed(&mut fresh(), &none, &mut out).unwrap_err();
        assert!(e.to_string().contains("no total checksum"), "{e}");
        let mut short = chunks;
        short.pop();
        let mut a = fresh();
        feed(&mut a, &short, &mut out).unwrap();
        assert!(matches!(a.finish(), Err(ProtoError::Size { .. })));
    }
}
