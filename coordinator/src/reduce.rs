//! One round's updates, reduced range by range while they stream in.
//!
//! Updates arrive as chunks on the run's grid (chunk `i` covers the floats `grid[i]`). As soon
//! as every worker the round expects has delivered chunk `i`, that range is averaged (weighted
//! by samples, in member order, so the bits never depend on arrival order), stepped through
//! Adam and encoded for the next pull. The step writes into a second set of buffers, so the
//! current parameters and moments stay untouched until the round commits: a worker that fails
//! half-way (corrupt last chunk, dropped connection, missed deadline) only makes the ranges it
//! took part in be redone at close, over the updates that did complete. Received payloads are
//! kept as the `Bytes` they arrived in (no decode copy) until the round closes.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use bytes::Bytes;
use capsnet_core::optim::AdamStep;
use capsnet_proto::Encoding;
use capsnet_proto::wire::{self, BufPool, EncodedChunk};

use crate::error::{CoordinatorError, Result};

/// Floats per block of the fused reduction: the block's sum, parameters, moments and encoded
/// output (about 60 KB) stay in L1/L2 from the sum to the encoding.
const BLOCK: usize = 2048;

/// An update being received (or complete) from one plan member.
struct Slot {
    samples: u64,
    /// Its weight's factor: 1, or less for an update clipped to the norm limit.
    scale: f32,
    loss: f64,
    encoding: Encoding,
    chunks: Vec<Option<Bytes>>,
    complete: bool,
}

/// A range already reduced: the members it averaged and its encoded result.
struct Reduced {
    members: Vec<usize>,
    chunk: EncodedChunk,
    crc: crc32fast::Hasher,
    /// Which reduction produced it: a range reduced again gets a new generation, so a copy sent
    /// early can be told from the final one.
    generation: u64,
    /// Every new parameter (and moment) of the range is finite.
    finite: bool,
}

/// The state a range is reduced from: the committed parameters and moments of the reducer's
/// span (indexed from the span's first float), and how the average of the updates becomes the
/// new parameters.
pub(crate) struct Source<'a> {
    pub params: &'a [f32],
    /// Adam's moments (grad mode), or the outer optimizer's momentum in `m` (params mode).
    pub m: &'a [f32],
    pub v: &'a [f32],
    pub update: Update,
}

impl<'a> Source<'a> {
    /// What a round of `mode` reduces from: the parameters, and Adam's moments (grad mode),
    /// the outer momentum (params mode with `outer` = (lr, momentum)) or nothing.
    pub fn of(
        mode: capsnet_proto::SyncMode,
        outer: Option<(f32, f32)>,
        params: &'a [f32],
        adam: &'a capsnet_core::optim::Adam,
        outer_m: &'a [f32],
    ) -> Self {
        let (m, v, update): (&[f32], &[f32], Update) = match (mode, outer) {
            (capsnet_proto::SyncMode::Grad, _) => {
                (&adam.m, &adam.v, Update::Adam(adam.next_step()))
            }
            (_, Some((lr, momentum))) => (outer_m, &[], Update::Nesterov { lr, momentum }),
            _ => (&[], &[], Update::Average),
        };
        Source {
            params,
            m,
            v,
            update,
        }
    }
}

impl Kept {
    /// The state a reducer of `mode` keeps (`outer`: params mode with the outer optimizer).
    pub fn of(mode: capsnet_proto::SyncMode, outer: bool) -> Self {
        match (mode, outer) {
            (capsnet_proto::SyncMode::Grad, _) => Kept::AdamMoments,
            (_, true) => Kept::Momentum,
            _ => Kept::Nothing,
        }
    }
}

/// What a round does with the average of its updates.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Update {
    /// Grad mode: an Adam step along the averaged gradient.
    Adam(AdamStep),
    /// Params mode: the average is the new parameters.
    Average,
    /// Params mode with an outer optimizer (DiLoCo): the change `params - average` is a
    /// pseudo-gradient `g` for Nesterov momentum: `m = momentum x m + g`, then
    /// `params -= lr x (g + momentum x m)` (PyTorch's SGD with `nesterov=True`). With `lr` 1
    /// and `momentum` 0 it is [`Update::Average`].
    Nesterov { lr: f32, momentum: f32 },
}

/// The optimizer state a reducer keeps new copies of, besides the parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kept {
    Nothing,
    /// One vector: the outer optimizer's momentum.
    Momentum,
    /// Two: Adam's moments.
    AdamMoments,
}

/// The new state of one block of a range: its moments, momentum, or nothing.
enum BlockState<'b> {
    Adam(&'b mut [f32], &'b mut [f32]),
    Momentum(&'b mut [f32]),
    Nothing,
}

/// Block `k` of a range: its new parameters, its encoded bytes and its new optimizer state.
type Block<'o, 'b> = (
    usize,
    ((&'o mut [f32], &'o mut [u8]), &'o mut BlockState<'b>),
);

/// Block `k` of a range's delta: the old floats, the new payload and the low bytes' place.
type DeltaBlock<'a> = (usize, ((&'a [f32], &'a [u8]), &'a mut [u8]));

/// A range's encoded result: in a slot of shared memory, or in a buffer of the pool.
enum OutBuf {
    Shared(capsnet_shm::SlotBuf),
    Heap(wire::PoolBuf),
}

impl OutBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            OutBuf::Shared(b) => b.as_mut(),
            OutBuf::Heap(b) => b.as_mut(),
        }
    }

    fn as_ref(&self) -> &[u8] {
        match self {
            OutBuf::Shared(b) => b.as_ref(),
            OutBuf::Heap(b) => b.as_ref(),
        }
    }

    fn freeze(self) -> (Bytes, Option<capsnet_shm::At>) {
        match self {
            OutBuf::Shared(b) => {
                let (bytes, at) = b.freeze();
                (bytes, Some(at))
            }
            OutBuf::Heap(b) => (b.freeze(), None),
        }
    }
}

/// What a closed round hands back: the new state lives in the reducer's `next_*` buffers.
pub(crate) struct Closed {
    pub members: Vec<usize>,
    pub samples: u64,
    pub loss: f64,
    pub chunks: Vec<EncodedChunk>,
    /// The generation of each chunk.
    pub generations: Vec<u64>,
    /// Every new parameter and moment is finite: false means the round must not be committed.
    pub finite: bool,
}

pub(crate) struct Reducer {
    grid: Arc<Vec<Range<usize>>>,
    /// The grid chunks this reducer owns: the whole grid when one process reduces everything,
    /// one span of it per reducer in a sharded layout ([`capsnet_proto::wire::spans`]). Its
    /// updates, results and state buffers hold only these chunks' floats.
    span: Range<usize>,
    /// The span's first float: a float's index in the state buffers is its index minus this.
    base: usize,
    wire: Encoding,
    slots: BTreeMap<usize, Slot>,
    reduced: Vec<Option<Reduced>>,
    /// Buffers of the encoded results, reused once the pulls of their round are done.
    pool: BufPool,
    /// Threads that reduce the blocks of a range (none: the calling thread alone).
    threads: Option<rayon::ThreadPool>,
    /// Reductions so far (the generation of the next one).
    generation: u64,
    /// Also encode each range as its change from the parameters it was reduced from.
    delta: bool,
    /// Slots of shared memory for the encoded results, for pullers on this machine to read
    /// ([`Reducer::with_shared_memory`]); results go to `pool` when none is free.
    shared: Option<capsnet_shm::SlotPool>,
    pub next_params: Vec<f32>,
    pub next_m: Vec<f32>,
    pub next_v: Vec<f32>,
}

impl Reducer {
    /// A reducer of the chunks `span` of `grid`, whose [`Source`]s hold those chunks' floats;
    /// with `delta`, each reduced range also carries its change from the parameters it was
    /// reduced from ([`EncodedChunk::delta`]), for the workers that hold them.
    pub fn new(
        grid: Arc<Vec<Range<usize>>>,
        span: Range<usize>,
        wire: Encoding,
        kept: Kept,
        threads: usize,
        delta: bool,
    ) -> Result<Self> {
        if span.is_empty() || span.end > grid.len() {
            return Err(CoordinatorError::Config(format!(
                "chunks {span:?} are not a span of a grid of {} chunks",
                grid.len()
            )));
        }
        let base = grid[span.start].start;
        let total = grid[span.end - 1].end - base;
        let (m_len, v_len) = match kept {
            Kept::Nothing => (0, 0),
            Kept::Momentum => (total, 0),
            Kept::AdamMoments => (total, total),
        };
        let threads = match threads {
            0 | 1 => None,
            n => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("capsnet-reduce-{i}"))
                    .build()
                    .map_err(|source| capsnet_core::CoreError::ThreadPool { threads: n, source })?,
            ),
        };
        Ok(Reducer {
            reduced: (0..span.len()).map(|_| None).collect(),
            wire,
            slots: BTreeMap::new(),
            // This round's results, the last round's (still being pulled) and one more; as
            // many again for their changes.
            pool: BufPool::new(if delta { 6 } else { 3 } * span.len()),
            grid,
            span,
            base,
            next_params: vec![0.0; total],
            next_m: vec![0.0; m_len],
            next_v: vec![0.0; v_len],
            threads,
            generation: 0,
            delta,
            shared: None,
        })
    }

    /// Encodes the results into shared memory (as many slots as the pool keeps buffers, each
    /// the size of the largest chunk), which pullers on this machine copy out of without a
    /// socket between. Without it (memfd refused) the reducer goes on as it was.
    pub fn with_shared_memory(mut self) -> Self {
        use capsnet_proto::shared::{PULL_SLOTS_PER_CHUNK, pull_slot_len};
        let slot = pull_slot_len(&self.grid, self.span.clone(), self.wire);
        match capsnet_shm::SlotPool::create(PULL_SLOTS_PER_CHUNK * self.span.len(), slot) {
            Ok(p) => self.shared = Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "no shared memory: results go out over the socket")
            }
        }
        self
    }

    pub fn grid(&self) -> Arc<Vec<Range<usize>>> {
        self.grid.clone()
    }

    /// Chunk `index` of the grid as an index into this reducer's own chunks.
    fn slot(&self, index: usize) -> Option<usize> {
        self.span.contains(&index).then(|| index - self.span.start)
    }

    /// Members with an update in progress or complete.
    pub fn has(&self, k: usize) -> bool {
        self.slots.contains_key(&k)
    }

    pub fn complete(&self, k: usize) -> bool {
        self.slots.get(&k).is_some_and(|s| s.complete)
    }

    /// Members whose update is complete, in member order.
    pub fn completed(&self) -> Vec<usize> {
        self.slots
            .iter()
            .filter(|(_, s)| s.complete)
            .map(|(&k, _)| k)
            .collect()
    }

    /// Opens member `k`'s update.
    pub fn begin(&mut self, k: usize, samples: u64, loss: f64, encoding: Encoding) {
        self.slots.insert(
            k,
            Slot {
                samples,
                scale: 1.0,
                loss,
                encoding,
                chunks: vec![None; self.span.len()],
                complete: false,
            },
        );
    }

    /// Range `index` as reduced so far this round, with its generation.
    pub fn reduced(&self, index: usize) -> Option<(u64, &EncodedChunk)> {
        self.reduced
            .get(self.slot(index)?)?
            .as_ref()
            .map(|r| (r.generation, &r.chunk))
    }

    /// Stores chunk `index` of member `k` (checked by the service) and reduces that range when
    /// every member of `expected` has it (then returns true).
    pub fn chunk(
        &mut self,
        k: usize,
        index: usize,
        payload: Bytes,
        expected: &[usize],
        src: &Source<'_>,
    ) -> bool {
        let Some(at) = self.slot(index) else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(&k) else {
            return false;
        };
        slot.chunks[at] = Some(payload);
        if !expected.is_empty()
            && expected.contains(&k)
            && expected
                .iter()
                .all(|m| self.slots.get(m).is_some_and(|s| s.chunks[at].is_some()))
        {
            self.reduce(index, expected, src);
            return true;
        }
        false
    }

    /// Marks member `k`'s update complete; every chunk must be there.
    pub fn end(&mut self, k: usize) -> Result<()> {
        let slot = self
            .slots
            .get_mut(&k)
            .ok_or_else(|| CoordinatorError::BadUpdate("no update in progress".into()))?;
        if let Some(at) = slot.chunks.iter().position(Option::is_none) {
            let i = self.span.start + at;
            return Err(CoordinatorError::BadUpdate(format!(
                "update ended without chunk {i} (floats {:?})",
                self.grid[i]
            )));
        }
        slot.complete = true;
        Ok(())
    }

    /// Scales member `k`'s update by `factor` (clipping it) and forgets every range already
    /// reduced with it, to be reduced again; returns those ranges.
    pub fn rescale(&mut self, k: usize, factor: f32) -> Vec<usize> {
        let Some(slot) = self.slots.get_mut(&k) else {
            return vec![];
        };
        slot.scale = factor;
        self.forget(k)
    }

    /// Drops member `k`'s update and forgets every range it took part in; returns those ranges.
    pub fn abort(&mut self, k: usize) -> Vec<usize> {
        if self.slots.remove(&k).is_some() {
            self.forget(k)
        } else {
            vec![]
        }
    }

    /// Forgets every range reduced with member `k`; returns their grid indices.
    fn forget(&mut self, k: usize) -> Vec<usize> {
        let mut forgotten = vec![];
        for (at, r) in self.reduced.iter_mut().enumerate() {
            if r.as_ref().is_some_and(|r| r.members.contains(&k)) {
                *r = None;
                forgotten.push(self.span.start + at);
            }
        }
        forgotten
    }

    /// Averages range `index` over `members` (weighted by samples, in member order), steps it
    /// into the `next_*` buffers and encodes it for the next pull: one pass over the range in
    /// blocks that stay in L1, instead of a pass each for the sum, the step and the encoding,
    /// with the blocks spread over the reducer's threads (each element's arithmetic is the
    /// same on any thread, so the bits do not depend on the thread count).
    fn reduce(&mut self, index: usize, members: &[usize], src: &Source<'_>) {
        let at = index - self.span.start;
        let r = self.grid[index].clone();
        // The range in the state buffers.
        let local = r.start - self.base..r.end - self.base;
        let total: u64 = members.iter().map(|m| self.slots[m].samples).sum();
        let inputs: Vec<(f32, &[u8], Encoding)> = members
            .iter()
            .filter_map(|m| {
                let s = &self.slots[m];
                let w = (s.samples as f64 / total as f64) as f32 * s.scale;
                s.chunks[at].as_deref().map(|p| (w, p, s.encoding))
            })
            .collect();
        let (wire, update) = (self.wire, src.update);
        let out_bpf = wire::bytes_per_float(wire);
        let mut payload = match self.shared.as_ref().and_then(|p| p.take(r.len() * out_bpf)) {
            Some(b) => OutBuf::Shared(b),
            None => OutBuf::Heap(self.pool.take(r.len() * out_bpf)),
        };
        // The new optimizer state's blocks: Adam's moments, the outer momentum, or none.
        let mut moments: Vec<BlockState<'_>> = match update {
            Update::Adam(_) => self.next_m[local.clone()]
                .chunks_mut(BLOCK)
                .zip(self.next_v[local.clone()].chunks_mut(BLOCK))
                .map(|(m, v)| BlockState::Adam(m, v))
                .collect(),
            Update::Nesterov { .. } => self.next_m[local.clone()]
                .chunks_mut(BLOCK)
                .map(BlockState::Momentum)
                .collect(),
            Update::Average => (0..r.len().div_ceil(BLOCK))
                .map(|_| BlockState::Nothing)
                .collect(),
        };
        let out = &mut self.next_params[local.clone()];
        let block = |(k, ((out, bytes), mv)): Block<'_, '_>| {
            let b = k * BLOCK;
            let (lo, hi) = (local.start + b, local.start + b + out.len());
            let src = Source {
                params: &src.params[lo..hi],
                m: src.m.get(lo..hi).unwrap_or_default(),
                v: src.v.get(lo..hi).unwrap_or_default(),
                update,
            };
            reduce_block(&inputs, b, &src, (out, mv), (wire, bytes))
        };
        let crcs: Vec<(crc32fast::Hasher, bool)> = match &self.threads {
            Some(pool) => pool.install(|| {
                out.par_chunks_mut(BLOCK)
                    .zip(payload.as_mut().par_chunks_mut(BLOCK * out_bpf))
                    .zip(moments.par_iter_mut())
                    .enumerate()
                    .map(block)
                    .collect()
            }),
            // One thread: on this one, without handing each range to a pool and back.
            None => out
                .chunks_mut(BLOCK)
                .zip(payload.as_mut().chunks_mut(BLOCK * out_bpf))
                .zip(moments.iter_mut())
                .enumerate()
                .map(block)
                .collect(),
        };
        let mut crc = crc32fast::Hasher::new();
        for (h, _) in &crcs {
            crc.combine(h);
        }
        let finite = crcs.iter().all(|(_, f)| *f);
        // The range's change from the parameters it was reduced from, which the last round
        // published, for the workers that hold them.
        let delta = self
            .delta
            .then(|| self.delta_of(&src.params[local], payload.as_ref()));
        self.generation += 1;
        let (payload, shared) = payload.freeze();
        self.reduced[at] = Some(Reduced {
            generation: self.generation,
            members: members.to_vec(),
            chunk: EncodedChunk {
                offset: r.start as u64,
                crc32: crc.clone().finalize(),
                payload,
                total_crc32: None,
                delta,
                shared,
            },
            crc,
            finite,
        });
    }

    /// The delta ([`wire::delta_encode`]) of the encoded range `new` from the floats `old`, in
    /// blocks over the reducer's threads.
    fn delta_of(&self, old: &[f32], new: &[u8]) -> Bytes {
        let w = wire::bytes_per_float(self.wire);
        // From the pool (no fresh pages): every low byte is written, the top bytes appended.
        let mut buf = self.pool.take(old.len() * (w - 1));
        let low = buf.as_mut();
        let block = |(k, ((o, n), l)): DeltaBlock<'_>| {
            let mut high = vec![];
            wire::delta_block(o, n, self.wire, l, (k * BLOCK) as u32, &mut high);
            high
        };
        let highs: Vec<Vec<(u32, u8)>> = match &self.threads {
            Some(pool) => pool.install(|| {
                (old.par_chunks(BLOCK).zip(new.par_chunks(BLOCK * w)))
                    .zip(low.par_chunks_mut(BLOCK * (w - 1)))
                    .enumerate()
                    .map(block)
                    .collect()
            }),
            None => (old.chunks(BLOCK).zip(new.chunks(BLOCK * w)))
                .zip(low.chunks_mut(BLOCK * (w - 1)))
                .enumerate()
                .map(block)
                .collect(),
        };
        wire::delta_finish(buf.vec_mut(), &highs.concat());
        buf.freeze()
    }

    /// Closes the round over the complete updates: redoes every range that was reduced over
    /// another set of members (or not yet), and returns the encoded new parameters. None when
    /// no update is complete. Clears the round's updates either way.
    pub fn close(&mut self, src: &Source<'_>) -> Option<Closed> {
        let members = self.completed();
        self.close_over(&members, src)
    }

    /// [`Reducer::close`] over exactly `members` (in member order), as a reducer of a sharded
    /// run is told by the coordinator: None when it is empty or one of them is not complete
    /// here. Clears the round's updates either way.
    pub fn close_over(&mut self, members: &[usize], src: &Source<'_>) -> Option<Closed> {
        let members = members.to_vec();
        if members.is_empty()
            || members.windows(2).any(|w| w[0] >= w[1])
            || !members.iter().all(|&k| self.complete(k))
        {
            self.clear();
            return None;
        }
        for at in 0..self.span.len() {
            if self.reduced[at]
                .as_ref()
                .is_none_or(|r| r.members != members)
            {
                self.reduce(self.span.start + at, &members, src);
            }
        }
        let samples = members.iter().map(|m| self.slots[m].samples).sum::<u64>();
        let loss = members
            .iter()
            .map(|m| self.slots[m].loss * self.slots[m].samples as f64)
            .sum::<f64>()
            / samples as f64;
        let finite = self.reduced.iter().flatten().all(|r| r.finite);
        let mut total = crc32fast::Hasher::new();
        let n = self.reduced.len();
        let (chunks, generations) = self
            .reduced
            .iter_mut()
            .enumerate()
            .filter_map(|(i, r)| {
                let r = r.take()?;
                total.combine(&r.crc);
                let mut c = r.chunk;
                c.total_crc32 = (i + 1 == n).then(|| total.clone().finalize());
                Some((c, r.generation))
            })
            .unzip();
        self.clear();
        Some(Closed {
            members,
            samples,
            loss,
            chunks,
            generations,
            finite,
        })
    }

    /// Forgets the round's updates and reductions.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.reduced.iter_mut().for_each(|r| *r = None);
    }
}

/// One block of a range: the weighted sum of the members' payloads (`inputs`, from float
/// `b` of the range), the update of `src` (this block's slices) into `out` and the new
/// optimizer state, the encoding into `bytes` and its checksum; false when anything new is not
/// finite. Everything stays in cache between the passes, and the loops run 8 wide where the CPU
/// can ([`capsnet_core::simd::with_avx2`], the same bits).
fn reduce_block(
    inputs: &[(f32, &[u8], Encoding)],
    b: usize,
    src: &Source<'_>,
    state: (&mut [f32], &mut BlockState<'_>),
    encoded: (Encoding, &mut [u8]),
) -> (crc32fast::Hasher, bool) {
    capsnet_core::simd::with_avx2(
        #[inline(always)]
        || reduce_block_body(inputs, b, src, state, encoded),
    )
}

#[inline(always)]
fn reduce_block_body(
    inputs: &[(f32, &[u8], Encoding)],
    b: usize,
    src: &Source<'_>,
    (out, mv): (&mut [f32], &mut BlockState<'_>),
    (wire, bytes): (Encoding, &mut [u8]),
) -> (crc32fast::Hasher, bool) {
    let e = b + out.len();
    let mut g = [0.0f32; BLOCK];
    let g = &mut g[..out.len()];
    for &(w, p, enc) in inputs {
        let bpf = wire::bytes_per_float(enc);
        wire::add_scaled(g, w, &p[b * bpf..e * bpf], enc);
    }
    let finite = match (src.update, mv) {
        (Update::Adam(step), BlockState::Adam(m, v)) => {
            step.apply_into(
                (src.params, src.m, src.v),
                g,
                (&mut *out, &mut **m, &mut **v),
            );
            all_finite(m) && all_finite(v)
        }
        (Update::Nesterov { lr, momentum }, BlockState::Momentum(m)) => {
            let (p, m_old) = (src.params, src.m);
            for i in 0..out.len() {
                let g = p[i] - g[i];
                let buf = momentum * m_old[i] + g;
                m[i] = buf;
                out[i] = p[i] - lr * (g + momentum * buf);
            }
            all_finite(m)
        }
        _ => {
            out.copy_from_slice(g);
            true
        }
    } && all_finite(out);
    wire::encode_into(out, wire, bytes);
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    (h, finite)
}

/// Every value is finite (no early exit: the block is in L1 and the loop vectorizes).
#[inline]
fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(true, |a, v| a & v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsnet_core::optim::{Adam, AdamConfig};

    fn grad(k: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 31 + k * 7) as f32 * 0.01).sin())
            .collect()
    }

    /// The whole-vector reference: weighted average in member order, then Adam.
    fn reference(p: &[f32], adam: &Adam, updates: &[(u64, Vec<f32>)]) -> Vec<f32> {
        let total: u64 = updates.iter().map(|u| u.0).sum();
        let mut avg = vec![0.0f32; p.len()];
        for (s, g) in updates {
            let w = (*s as f64 / total as f64) as f32;
            for (o, x) in avg.iter_mut().zip(g) {
                *o += w * x;
            }
        }
        let (mut p, mut adam) = (p.to_vec(), adam.clone());
        adam.update(&mut p, &avg).unwrap();
        p
    }

    /// A reducer of every chunk of `grid`, as the coordinator's own.
    fn whole(grid: &Arc<Vec<Range<usize>>>, kept: Kept, threads: usize) -> Reducer {
        Reducer::new(
            grid.clone(),
            0..grid.len(),
            Encoding::F32,
            kept,
            threads,
            false,
        )
        .unwrap()
    }

    fn decode(chunks: &[EncodedChunk], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n];
        let grid = wire::Assembler::grid(n, Encoding::F32, (chunks[0].payload.len()).max(4));
        let mut a = wire::Assembler::new(grid, n as u64, Encoding::F32).unwrap();
        for c in chunks {
            a.accept(wire::ChunkIn::of(c, n as u64, Encoding::F32), &mut out)
                .unwrap();
        }
        a.finish().unwrap();
        out
    }

    /// Chunks arriving in any interleaving, a member failing half-way and retrying, and a
    /// member missing the round all give the bits of the whole-vector reference over the
    /// updates that completed.
    /// Results in shared memory are the bits of results on the heap, and read back through
    /// another mapping of the region; when every slot is held (pullers still hold three
    /// rounds), results go to the heap with the same bits.
    #[test]
    fn results_in_shared_memory_are_the_bits_of_results_on_the_heap() {
        let n = 12_000;
        let grid: Arc<Vec<Range<usize>>> =
            Arc::new(wire::chunk_ranges(n, Encoding::Bf16, 2 * 5000).collect());
        let p: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        let adam = Adam::new(AdamConfig::default(), n);
        let src = Source {
            params: &p,
            m: &adam.m,
            v: &adam.v,
            update: Update::Adam(adam.next_step()),
        };
        let round = |red: &mut Reducer| {
            red.begin(0, 2, 0.1, Encoding::Bf16);
            for i in 0..grid.len() {
                red.chunk(
                    0,
                    i,
                    wire::encode(&grad(0, n)[grid[i].clone()], Encoding::Bf16),
                    &[0],
                    &src,
                );
            }
            red.end(0).unwrap();
            red.close(&src).unwrap().chunks
        };
        let mk = || {
            Reducer::new(
                grid.clone(),
                0..grid.len(),
                Encoding::Bf16,
                Kept::AdamMoments,
                2,
                false,
            )
            .unwrap()
        };
        let heap = round(&mut mk());
        assert!(heap.iter().all(|c| c.shared.is_none()));
        let mut red = mk().with_shared_memory();
        let readers = capsnet_shm::Readers::new(2);
        let mut held = vec![];
        for r in 0..4 {
            let chunks = round(&mut red);
            for (c, h) in chunks.iter().zip(&heap) {
                assert_eq!((&c.payload, c.crc32), (&h.payload, h.crc32));
                match (&c.shared, r) {
                    (Some(at), 0..3) => {
                        let reader = readers.get(&at.region, u64::MAX).unwrap();
                        let len = c.payload.len() as u64;
                        assert_eq!(reader.bytes(at.offset, len).unwrap(), c.payload);
                    }
                    (None, 3) => {}
                    (s, r) => panic!("round {r}: {s:?}"),
                }
            }
            held.push(chunks);
        }
        // Slots come back once their chunks are gone.
        held.clear();
        assert!(round(&mut red).iter().all(|c| c.shared.is_some()));
    }

    #[test]
    fn ranges_reduced_while_streaming_equal_the_whole_vector_reference() {
        // Chunks of 5000 floats: three blocks each, the last one short.
        let n = 20_000;
        let grid: Arc<Vec<Range<usize>>> =
            Arc::new(wire::chunk_ranges(n, Encoding::F32, 4 * 5000).collect());
        let p: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        let mut adam = Adam::new(AdamConfig::default(), n);
        adam.update(&mut p.clone(), &grad(9, n)).unwrap();
        let src = Source {
            params: &p,
            m: &adam.m,
            v: &adam.v,
            update: Update::Adam(adam.next_step()),
        };
        let payload =
            |k: usize, i: usize| wire::encode(&grad(k, n)[grid[i].clone()], Encoding::F32);
        let mut red = whole(&grid, Kept::AdamMoments, 3);
        let expected = [0, 1, 2];
        red.begin(2, 5, 0.5, Encoding::F32);
        red.begin(0, 3, 0.1, Encoding::F32);
        red.begin(1, 4, 0.2, Encoding::F32);
        // Member 1 sends two chunks with wrong data, then fails; it retries with the right ones.
        for i in 0..2 {
            red.chunk(1, i, payload(7, i), &expected, &src);
        }
        red.abort(1);
        red.begin(1, 4, 0.2, Encoding::F32);
        for i in (0..grid.len()).rev() {
            for k in [2, 1, 0] {
                red.chunk(k, i, payload(k, i), &expected, &src);
            }
        }
        for k in 0..3 {
            red.end(k).unwrap();
        }
        let closed = red.close(&src).unwrap();
        assert_eq!(closed.members, vec![0, 1, 2]);
        assert_eq!(closed.samples, 12);
        let want = reference(
            &p,
            &adam,
            &[(3, grad(0, n)), (4, grad(1, n)), (5, grad(2, n))],
        );
        assert_eq!(decode(&closed.chunks, n), want);
        assert_eq!(red.next_params, want);

        // Member 2 streams everything but never completes: ranges reduced with it are redone.
        red.begin(0, 3, 0.1, Encoding::F32);
        red.begin(2, 5, 0.5, Encoding::F32);
        for i in 0..grid.len() {
            red.chunk(2, i, payload(2, i), &[0, 2], &src);
            red.chunk(0, i, payload(0, i), &[0, 2], &src);
        }
        red.end(0).unwrap();
        let closed = red.close(&src).unwrap();
        assert_eq!(closed.members, vec![0]);
        assert_eq!(
            decode(&closed.chunks, n),
            reference(&p, &adam, &[(3, grad(0, n))])
        );
        // A closed round leaves nothing behind.
        assert!(!red.has(0) && !red.has(2) && red.completed().is_empty());
        assert!(red.close(&src).is_none());
    }

    /// The sharded layout's arithmetic: R reducers, each over its span of the grid with its
    /// span's state, give the bits of one reducer over the whole grid (parameters, moments and
    /// encoded results, and their changes from the parameters reduced from, which rebuild
    /// them), for R = 1, 2, 3, whatever order the chunks arrive in and on any number of
    /// threads.
    #[test]
    fn reducers_of_spans_give_the_bits_of_one_over_the_grid() {
        let n = 23_000;
        let grid: Arc<Vec<Range<usize>>> =
            Arc::new(wire::chunk_ranges(n, Encoding::F32, 4 * 3000).collect());
        assert_eq!(grid.len(), 8);
        let p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.013).cos()).collect();
        let mut adam = Adam::new(AdamConfig::default(), n);
        adam.update(&mut p.clone(), &grad(9, n)).unwrap();
        let updates = [(3u64, grad(0, n)), (5u64, grad(1, n))];
        type Out = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<EncodedChunk>);
        // `threads` 1 reduces on the calling thread, more on a pool: the bits are the same.
        let run = |span: Range<usize>, backwards: bool, threads: usize| -> Out {
            let (lo, hi) = (grid[span.start].start, grid[span.end - 1].end);
            let src = Source {
                params: &p[lo..hi],
                m: &adam.m[lo..hi],
                v: &adam.v[lo..hi],
                update: Update::Adam(adam.next_step()),
            };
            let mut red = Reducer::new(
                grid.clone(),
                span.clone(),
                Encoding::F32,
                Kept::AdamMoments,
                threads,
                true,
            )
            .unwrap();
            for (k, (samples, _)) in updates.iter().enumerate() {
                red.begin(k, *samples, 0.1, Encoding::F32);
            }
            let mut order: Vec<usize> = span.clone().collect();
            if backwards {
                order.reverse();
            }
            for i in order {
                for k in [1, 0] {
                    let payload = wire::encode(&updates[k].1[grid[i].clone()], Encoding::F32);
                    red.chunk(k, i, payload, &[0, 1], &src);
                }
            }
            for k in 0..2 {
                red.end(k).unwrap();
            }
            let closed = red.close(&src).unwrap();
            assert!(closed.finite);
            (red.next_params, red.next_m, red.next_v, closed.chunks)
        };
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let (wp, wm, wv, wc) = run(0..grid.len(), false, 1);
        let mut rebuilt = vec![];
        for (c, r) in wc.iter().zip(grid.iter()) {
            let d = c.delta.as_ref().unwrap();
            assert!(
                d.len() < c.payload.len(),
                "{} of {}",
                d.len(),
                c.payload.len()
            );
            wire::delta_decode(d, &p[r.clone()], Encoding::F32, &mut rebuilt).unwrap();
            assert!(
                rebuilt == c.payload,
                "the change at {r:?} does not rebuild the result"
            );
        }
        for r in 1..=3 {
            let (mut sp, mut sm, mut sv, mut payloads) = (vec![], vec![], vec![], vec![]);
            for (j, span) in wire::spans(&grid, r).unwrap().into_iter().enumerate() {
                let (p, m, v, chunks) = run(span.clone(), j % 2 == 1, 2 + j % 2);
                let offsets: Vec<u64> = chunks.iter().map(|c| c.offset).collect();
                let want: Vec<u64> = span.clone().map(|i| grid[i].start as u64).collect();
                assert_eq!(offsets, want, "{r} reducers: span {span:?}");
                assert!(chunks.last().and_then(|c| c.total_crc32).is_some());
                sp.extend(p);
                sm.extend(m);
                sv.extend(v);
                payloads.extend(chunks.into_iter().map(|c| (c.payload, c.delta)));
            }
            assert_eq!(bits(&sp), bits(&wp), "{r} reducers: parameters");
            assert_eq!(bits(&sm), bits(&wm), "{r} reducers: first moments");
            assert_eq!(bits(&sv), bits(&wv), "{r} reducers: second moments");
            assert!(
                payloads
                    .iter()
                    .zip(&wc)
                    .all(|(a, b)| a.0 == b.payload && a.1 == b.delta),
                "{r} reducers: encoded results"
            );
        }
        // A span off the grid is refused.
        assert!(Reducer::new(grid.clone(), 8..9, Encoding::F32, Kept::Nothing, 1, false).is_err());
        assert!(Reducer::new(grid, 3..3, Encoding::F32, Kept::Nothing, 1, false).is_err());
    }

    /// A reduction whose result is not finite (here from a damaged moment) says so, so that
    /// the round is not committed.
    #[test]
    fn a_non_finite_result_is_flagged() {
        let n = 3000;
        let grid = Arc::new(wire::chunk_ranges(n, Encoding::F32, 4 * 1000).collect::<Vec<_>>());
        let p = vec![0.5f32; n];
        let adam = Adam::new(AdamConfig::default(), n);
        let m = adam.m.clone();
        let mut v = adam.v.clone();
        let update = Update::Adam(adam.next_step());
        let mut red = whole(&grid, Kept::AdamMoments, 2);
        let mut finite = |v: &[f32]| {
            let src = Source {
                params: &p,
                m: &m,
                v,
                update,
            };
            red.begin(0, 1, 0.1, Encoding::F32);
            for (i, r) in grid.iter().enumerate() {
                let payload = wire::encode(&grad(0, n)[r.clone()], Encoding::F32);
                red.chunk(0, i, payload, &[0], &src);
            }
            red.end(0).unwrap();
            red.close(&src).unwrap().finite
        };
        assert!(finite(&v));
        v[2500] = f32::NAN;
        assert!(!finite(&v));
    }

    /// Params mode with the outer optimizer: two members' parameters, their sample-weighted
    /// average `a`, then `g = p - a`, `m' = 0.9 m + g`, `p' = p - 0.7 (g + 0.9 m')`, bit for bit;
    /// with lr 1 and momentum 0 it is the plain average.
    #[test]
    fn the_outer_nesterov_step_follows_the_formula() {
        let n = 5000;
        let grid = Arc::new(wire::chunk_ranges(n, Encoding::F32, 4 * 2000).collect::<Vec<_>>());
        let p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).cos()).collect();
        let m: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).sin() * 0.1).collect();
        let locals = [(3u64, grad(1, n)), (5u64, grad(2, n))];
        let run = |update: Update| {
            let mut red = whole(&grid, Kept::Momentum, 2);
            let src = Source {
                params: &p,
                m: &m,
                v: &[],
                update,
            };
            for (k, (s, _)) in locals.iter().enumerate() {
                red.begin(k, *s, 0.1, Encoding::F32);
            }
            for (i, r) in grid.iter().enumerate() {
                for (k, (_, l)) in locals.iter().enumerate() {
                    red.chunk(
                        k,
                        i,
                        wire::encode(&l[r.clone()], Encoding::F32),
                        &[0, 1],
                        &src,
                    );
                }
            }
            for k in 0..2 {
                red.end(k).unwrap();
            }
            let closed = red.close(&src).unwrap();
            assert!(closed.finite);
            (decode(&closed.chunks, n), red.next_m.clone())
        };
        let mut avg = vec![0.0f32; n];
        for (s, l) in &locals {
            let w = (*s as f64 / 8.0) as f32;
            for (a, x) in avg.iter_mut().zip(l) {
                *a += w * x;
            }
        }
        let (got, got_m) = run(Update::Nesterov {
            lr: 0.7,
            momentum: 0.9,
        });
        for i in 0..n {
            let g = p[i] - avg[i];
            let buf = 0.9 * m[i] + g;
            assert_eq!(got_m[i], buf, "momentum at {i}");
            assert_eq!(got[i], p[i] - 0.7 * (g + 0.9 * buf), "parameter at {i}");
        }
        let (plain, _) = run(Update::Nesterov {
            lr: 1.0,
            momentum: 0.0,
        });
        let worst = plain
            .iter()
            .zip(&avg)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-6,
            "lr 1, momentum 0 is the average (off by {worst})"
        );
    }

    #[test]
    fn an_update_missing_a_chunk_cannot_complete() {
        let grid = Arc::new(wire::chunk_ranges(10, Encoding::F32, 16).collect::<Vec<_>>());
        let mut red = whole(&grid, Kept::AdamMoments, 1);
        red.begin(0, 1, 0.0, Encoding::F32);
        let e = red.end(0).unwrap_err();
        assert!(e.to_string().contains("chunk 0"), "{e}");
    }
}
