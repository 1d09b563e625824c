//! How many machines to use: the time of a training round projected from costs measured on this
//! machine (`capsnet bench scale`).
//!
//! A round is a training step on every worker, then the sync of its update. The model of the
//! sync, per layout, with `N` workers, `F` floats of `b` bytes on the wire (`B = F b`), a link
//! of `rate` bits/s each way on every machine and `c` cores on each:
//!
//! | layout | bytes on the busiest link, each way | reduce work on the busiest machine |
//! |---|---|---|
//! | one coordinator | `N B` (every update in, every result out) | `N F` adds, `F` optimizer steps and encodes, over `c` cores |
//! | sharded, a reducer in each worker machine | `2 (N-1)/N B` (its share of every push and pull, the rest stays local) | `F` adds, `F/N` steps and encodes |
//! | sharded, one reducer machine per worker | `B` (each worker's push and pull) | as above |
//!
//! The sync takes the longest of: the link's bytes at its rate, the reduce work, the worker's
//! own encode and decode of `F` floats; plus a pipeline fill of one chunk in and one out.
//! Every byte through a socket also costs CPU at both of its ends (framing, checksums, system
//! calls, the kernel's copies and TCP): half of the measured data-plane cost per byte on each
//! machine it leaves or enters, added to the reduce work and the worker's own.
//! With `--delta-pulls` a pull carries `rho B` (the measured share of the change an early
//! training step makes): a link's busier direction is still the pushes'
//! with one coordinator and with separate reducers, while a co-located worker's link carries
//! `(N-1)/N (1 + rho) B` each way; the reducers add an encoding of their span's change, the
//! workers a rebuild and a copy of the parameters. A link's rate counts whole Ethernet frames: of a 1,514-byte frame (MTU 1500) TCP carries 1,448
//! bytes of payload (with timestamps), so payload moves at 95.6% of the rate.
//! With overlap, a worker sends each range once the backward pass has made it final: the
//! decoder's and digit capsules' gradients (35% of the paper model's floats) while the primary
//! capsules' and conv1's backward passes run, the primary capsules' weights (65%) while their
//! input gradient and conv1's run. The sync moves like a fluid through the busiest link: what
//! is final can be sent while the rest is computed ([`Stage`]), and that much of the sync is
//! hidden; its CPU is then taken from the step's cores, which lengthens the step (and leaves
//! more of the backward pass to hide behind: the fixed point of the two). With `--sync params
//! --sync-every K` a round is K local steps and one sync (no overlap: parameters are pushed
//! after the last step). Scaling efficiency is the step time alone over the step time plus the
//! sync's share: what N workers train per second over N times one worker without sync.

use std::time::Instant;

use capsnet_core::CapsNetConfig;
use capsnet_core::bench::{BenchMode, BenchSettings, run_setting};
use capsnet_core::optim::{Adam, AdamConfig};
use capsnet_proto::Encoding;
use capsnet_proto::wire;

use crate::{BenchError, Result};

/// What a round costs on this machine, measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Costs {
    pub floats: usize,
    pub batch: usize,
    /// Cores of each machine (the compute threads of a worker, the threads of a reducer).
    pub cores: usize,
    /// Seconds of one training step at `batch` on `cores` threads.
    pub step_s: f64,
    /// When parts of the gradient become final during the backward pass, earliest first.
    pub stages: Vec<Stage>,
    /// Seconds per float on one core, by wire encoding (f32, bf16): encoding an update or a
    /// result, decoding one, adding one into a sum.
    pub encode_s: [f64; 2],
    pub decode_s: [f64; 2],
    pub add_s: [f64; 2],
    /// Seconds per float of an Adam step on one core.
    pub adam_s: f64,
    /// `--delta-pulls`, by wire encoding: a pulled change's bytes over the whole payload's
    /// (of an early training step, [`DELTA_STEPS`]), and seconds per float on one core to
    /// encode the change (a reducer) and to rebuild the payload from it (a worker).
    pub delta_share: [f64; 2],
    pub delta_encode_s: [f64; 2],
    pub delta_decode_s: [f64; 2],
    /// Seconds per float to copy the parameters (a worker's base for the changes).
    pub copy_s: f64,
    /// CPU seconds per byte that crosses a socket, sender and receiver together, beyond the
    /// per-float work above: framing, checksums, system calls, the kernel's copies and its TCP.
    /// By layout (one coordinator; reducers, each with its default chunk size), then wire
    /// encoding. Measured from loopback rounds of the real data plane ([`crate::sync::measure`],
    /// 2 workers): it also holds the per-float work those rounds do beyond the single-core
    /// passes measured above (cold caches, checks, copies), charged per byte that crosses a
    /// socket, which is conservative where more of the floats cross sockets than there.
    pub net_s: [[f64; 2]; 2],
    /// Chunk payload with one coordinator, and with reducers (the defaults of each).
    pub chunk_bytes: usize,
    pub sharded_chunk_bytes: usize,
}

/// A point of the backward pass: `share` of the floats (counted from the end of the flat
/// vector) have their final gradient, and `window_s` of the pass is left.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Stage {
    pub share: f64,
    pub window_s: f64,
}

/// The share of an update that goes through a link of `sync_s` per whole update while the
/// backward pass is still running, given the `stages` at which parts of it become final (their
/// windows scaled by `slow`, the step's slowdown on a shared machine).
pub fn hidden_share(stages: &[Stage], sync_s: f64, slow: f64) -> f64 {
    if sync_s <= 0.0 {
        return 0.0;
    }
    let mut done: f64 = 0.0;
    for (i, st) in stages.iter().enumerate() {
        let until = stages.get(i + 1).map_or(0.0, |n| n.window_s);
        let time = (st.window_s - until).max(0.0) * slow;
        done = (done + time / sync_s).min(st.share);
    }
    done.clamp(0.0, 1.0)
}

/// Where the reduction runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Layout {
    Coordinator,
    ShardedColocated,
    ShardedSeparate,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Coordinator => "one coordinator",
            Layout::ShardedColocated => "sharded, in the workers",
            Layout::ShardedSeparate => "sharded, own machines",
        }
    }
}

/// One projected setting.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Scenario {
    pub layout: Layout,
    pub workers: usize,
    /// Bits per second of every link, each way.
    pub rate_bps: f64,
    pub wire: WireKind,
    pub overlap: bool,
    /// Local steps per sync (`--sync params --sync-every K`; 1 is grad mode).
    pub sync_every: usize,
    /// Parameters pulled as their changes (`--delta-pulls`; grad mode only).
    pub delta: bool,
    /// All processes share one machine of this many cores (the LAN benchmark), instead of a
    /// machine each.
    pub shared_cores: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum WireKind {
    F32,
    Bf16,
}

impl WireKind {
    fn index(self) -> usize {
        match self {
            WireKind::F32 => 0,
            WireKind::Bf16 => 1,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            WireKind::F32 => 4,
            WireKind::Bf16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            WireKind::F32 => "f32",
            WireKind::Bf16 => "bf16",
        }
    }
    fn encoding(self) -> Encoding {
        match self {
            WireKind::F32 => Encoding::F32,
            WireKind::Bf16 => Encoding::Bf16,
        }
    }
}

/// A projected round.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Projection {
    /// Seconds of the sync that are not hidden, per sync.
    pub sync_s: f64,
    /// Of it, the link's part (the busiest link's bytes at its rate).
    pub link_s: f64,
    /// Seconds per round: `sync_every` steps and one sync.
    pub round_s: f64,
    /// Step time over the time per step including the sync's share.
    pub efficiency: f64,
    pub images_per_s: f64,
}

/// The share of a link's bytes that is TCP payload: 1,448 of a 1,514-byte Ethernet frame.
pub const TCP_PAYLOAD_SHARE: f64 = 1448.0 / 1514.0;

/// The projected round of `s` with the costs `c`.
pub fn project(c: &Costs, s: &Scenario) -> Projection {
    let n = s.workers.max(1) as f64;
    let f = c.floats as f64;
    let k = s.wire.index();
    let bytes = f * s.wire.bytes() as f64;
    let per_byte = 8.0 / (s.rate_bps * TCP_PAYLOAD_SHARE);
    let delta = s.delta && s.sync_every <= 1;
    // A pull's bytes over a push's.
    let rho = if delta { c.delta_share[k] } else { 1.0 };
    let link_s = match s.layout {
        // Pushes in and pulls out of the busiest link: the pushes' direction bounds it.
        Layout::Coordinator => n * bytes * rho.max(1.0) * per_byte,
        Layout::ShardedColocated => (n - 1.0) / n * (1.0 + rho) * bytes * per_byte,
        Layout::ShardedSeparate => bytes * rho.max(1.0) * per_byte,
    };
    // Optimizer steps on the reducers: Adam in grad mode; the outer step is cheaper, count it
    // as one.
    let step_and_encode = c.adam_s + c.encode_s[k];
    let step_and_encode = step_and_encode + if delta { c.delta_encode_s[k] } else { 0.0 };
    let reduce_work = match s.layout {
        Layout::Coordinator => n * f * c.add_s[k] + f * step_and_encode,
        Layout::ShardedColocated | Layout::ShardedSeparate => {
            f * c.add_s[k] + f / n * step_and_encode
        }
    };
    let rebuild = if delta {
        c.delta_decode_s[k] + c.copy_s
    } else {
        0.0
    };
    // Bytes through sockets per round, in and out: of a worker, of a reducer (or the
    // coordinator), and of all machines together (each byte once); a machine pays half a
    // byte's data-plane cost for each byte it sends or receives.
    let round_bytes = (1.0 + rho) * bytes;
    let (worker_bytes, reducer_bytes, all_bytes) = match s.layout {
        Layout::Coordinator => (round_bytes, n * round_bytes, n * round_bytes),
        Layout::ShardedColocated => {
            let b = (n - 1.0) / n * round_bytes;
            (b, b, n * b)
        }
        Layout::ShardedSeparate => (round_bytes, round_bytes, n * round_bytes),
    };
    let net = c.net_s[usize::from(s.layout != Layout::Coordinator)][k];
    // A worker's own sync work runs on one core; a reducer's on all of its machine's.
    let worker_work = f * (c.encode_s[k] + c.decode_s[k] + rebuild);
    let worker_cpu = worker_work + worker_bytes * net / 2.0;
    let reducer_cpu = reduce_work + reducer_bytes * net / 2.0;
    let cores = c.cores.max(1) as f64;
    let reducers = match s.layout {
        Layout::Coordinator => 1.0,
        _ => n,
    };
    // The sync's CPU: its bound on the sync, and what of it a worker's step shares its cores
    // with while overlap hides the sync behind the backward pass (on the step's cores).
    let (cpu_s, beside_step, step_cores, step_s) = match s.shared_cores {
        // One machine for everything: every process's work on its cores, the workers' steps
        // (each on one thread) taking turns on them.
        Some(shared) => {
            let shared = shared.max(1) as f64;
            let all = reducers * reduce_work + n * worker_work + all_bytes * net;
            (all / shared, all, shared, c.step_s * (n / shared).max(1.0))
        }
        None => match s.layout {
            Layout::ShardedColocated => (
                ((reducer_cpu + worker_cpu) / cores).max(worker_cpu),
                reducer_cpu + worker_cpu,
                cores,
                c.step_s,
            ),
            _ => (
                (reducer_cpu / cores).max(worker_cpu),
                worker_cpu,
                cores,
                c.step_s,
            ),
        },
    };
    let fill = if s.layout == Layout::ShardedColocated && s.workers <= 1 {
        0.0
    } else {
        let chunk = if s.layout == Layout::Coordinator {
            c.chunk_bytes
        } else {
            c.sharded_chunk_bytes
        };
        2.0 * chunk.min(c.floats * s.wire.bytes()) as f64 * per_byte
    };
    let moving = link_s.max(cpu_s);
    // With overlap, the part of the sync that is hidden runs beside the backward pass and
    // takes its CPU from the step, which then leaves more time to hide: the fixed point of
    // the two (both only grow, and the share is at most 1).
    let (mut hidden, mut step_s) = (0.0, step_s);
    if s.overlap && s.sync_every <= 1 {
        let alone = step_s;
        for _ in 0..100 {
            let h = hidden_share(&c.stages, moving, step_s / c.step_s.max(1e-12));
            step_s = match s.shared_cores {
                Some(_) => alone.max((n * c.step_s + h * beside_step) / step_cores),
                None => alone + h * beside_step / step_cores,
            };
            let done = (h - hidden).abs() < 1e-12;
            hidden = h;
            if done {
                break;
            }
        }
    }
    let sync_s = moving * (1.0 - hidden) + fill;
    let k_steps = s.sync_every.max(1) as f64;
    let round_s = k_steps * step_s + sync_s;
    let per_step = round_s / k_steps;
    Projection {
        sync_s,
        link_s,
        round_s,
        efficiency: c.step_s / per_step,
        images_per_s: n * c.batch as f64 / per_step,
    }
}

/// Training steps before the one whose change [`measure`] sizes: the LAN benchmark's warm-up.
const DELTA_STEPS: usize = 3;

/// The parameters after `steps` training steps (batch 1, random images, Adam) from the initial
/// ones, and after one more.
fn trained_pair(model: &CapsNetConfig, steps: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    use capsnet_core::data::Batch;
    use capsnet_core::net::{Net, NetWorkspace};
    let net = Net::new(model, None)?;
    let mut params = net.init_params(1);
    let mut rng = capsnet_core::rng::Rng::new(2);
    let images: Vec<f32> = (0..net.pixels()).map(|_| rng.uniform(0.0, 1.0)).collect();
    let batch = Batch::single(
        images,
        vec![rng.below(net.classes())],
        model.image_size,
        model.image_size,
    );
    let mut grads = capsnet_core::params::Params::zeros(net.layout());
    let mut adam = Adam::new(AdamConfig::default(), params.data.len());
    let mut ws = NetWorkspace::new();
    let mut before = vec![];
    for _ in 0..=steps {
        before.clone_from(&params.data);
        net.train_batch(&params, &batch, &[0], &mut grads, &mut ws)?;
        adam.update(&mut params.data, &grads.data)?;
    }
    Ok((before, params.data))
}

/// The best of `reps` timings of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Measures the costs of `model` at `batch` on `threads` threads: a few training steps, and the
/// per-float costs of the sync path on one core.
pub fn measure(model: &CapsNetConfig, batch: usize, threads: usize, steps: usize) -> Result<Costs> {
    let row = run_setting(&BenchSettings {
        mode: BenchMode::Train,
        batch,
        steps: steps.max(1),
        warmup: 1,
        threads: threads.max(1),
        model: model.clone(),
        primary_chunk: None,
        baseline: None,
    })?;
    let part = |name: &str| {
        row.parts
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0.0, |(_, s)| *s)
    };
    let layout = capsnet_core::ParamLayout::for_config(model);
    let floats = layout.total();
    let share = |prefixes: &[&str]| {
        (layout.specs().iter())
            .filter(|s| prefixes.iter().any(|p| s.name.starts_with(p)))
            .map(|s| s.range().len())
            .sum::<usize>() as f64
            / floats as f64
    };
    // The timed parts are forward + backward; a convolution's backward pass is two GEMMs to its
    // forward pass's one (the weight gradient, then the input gradient), conv1's about half.
    let stages = vec![
        Stage {
            share: share(&["digit", "decoder"]),
            window_s: 2.0 / 3.0 * part("primary") + 0.5 * part("conv1"),
        },
        Stage {
            share: share(&["primary", "digit", "decoder"]),
            window_s: 1.0 / 3.0 * part("primary") + 0.5 * part("conv1"),
        },
    ];
    // The sync path's per-float work, on one core, over the whole vector.
    let x: Vec<f32> = (0..floats).map(|i| (i as f32 * 1e-3).sin()).collect();
    let mut out = vec![0.0f32; floats];
    let reps = 3;
    let mut costs = [[0.0; 2]; 3];
    for kind in [WireKind::F32, WireKind::Bf16] {
        let enc = kind.encoding();
        let mut bytes = vec![0u8; floats * kind.bytes()];
        let k = kind.index();
        costs[0][k] = best_of(reps, || wire::encode_into(&x, enc, &mut bytes)) / floats as f64;
        let mut err = None;
        costs[1][k] = best_of(reps, || {
            if let Err(e) = wire::decode_into(&bytes, enc, &mut out) {
                err = Some(e);
            }
        }) / floats as f64;
        if let Some(e) = err {
            return Err(BenchError::Proto(e));
        }
        costs[2][k] =
            best_of(reps, || wire::add_scaled(&mut out, 0.5, &bytes, enc)) / floats as f64;
    }
    let adam = Adam::new(AdamConfig::default(), floats);
    let step = adam.next_step();
    let (mut p2, mut m2, mut v2) = (vec![0.0; floats], vec![0.0; floats], vec![0.0; floats]);
    let adam_s = best_of(reps, || {
        step.apply_into((&x, &adam.m, &adam.v), &out, (&mut p2, &mut m2, &mut v2));
    }) / floats as f64;
    // Delta pulls: the change that a training step makes to the parameters, after as many
    // steps from the initial ones as the LAN benchmark's first timed round (batch 1, random
    // images; the first steps move every parameter by about the learning rate, later ones less).
    let (init, mut p2) = trained_pair(model, DELTA_STEPS)?;
    let (mut delta_share, mut delta_encode_s, mut delta_decode_s) = ([0.0; 2], [0.0; 2], [0.0; 2]);
    for kind in [WireKind::F32, WireKind::Bf16] {
        let (enc, k) = (kind.encoding(), kind.index());
        let payload = wire::encode(&p2, enc);
        let mut sent = 0;
        let pool = wire::BufPool::new(64);
        delta_encode_s[k] = best_of(reps, || {
            // In chunks, into buffers of a pool, as a reducer encodes them.
            let chunk = wire::SHARDED_CHUNK_BYTES / kind.bytes();
            sent = (init.chunks(chunk).zip(payload.chunks(chunk * kind.bytes())))
                .map(|(o, p)| {
                    let mut buf = pool.take(o.len() * (kind.bytes() - 1));
                    let mut high = vec![];
                    wire::delta_block(o, p, enc, buf.as_mut(), 0, &mut high);
                    wire::delta_finish(buf.vec_mut(), &high);
                    buf.freeze().len()
                })
                .sum::<usize>();
        }) / floats as f64;
        let change = wire::delta_encode(&init, &payload, enc);
        delta_share[k] = sent as f64 / payload.len() as f64;
        let mut rebuilt = vec![];
        let mut err = None;
        delta_decode_s[k] = best_of(reps, || {
            if let Err(e) = wire::delta_decode(&change, &init, enc, &mut rebuilt) {
                err = Some(e);
            }
        }) / floats as f64;
        if let Some(e) = err {
            return Err(BenchError::Proto(e));
        }
    }
    let copy_s = best_of(reps, || p2.copy_from_slice(&init)) / floats as f64;
    let net_s = data_plane_costs(model, floats, (&costs, adam_s))?;
    Ok(Costs {
        floats,
        batch,
        cores: threads.max(1),
        step_s: row.median_s,
        stages,
        encode_s: costs[0],
        decode_s: costs[1],
        add_s: costs[2],
        adam_s,
        delta_share,
        delta_encode_s,
        delta_decode_s,
        copy_s,
        net_s,
        chunk_bytes: capsnet_proto::wire::DEFAULT_CHUNK_BYTES,
        sharded_chunk_bytes: capsnet_proto::wire::SHARDED_CHUNK_BYTES,
    })
}

/// The data plane's CPU per byte through a socket ([`Costs::net_s`]): rounds of 2 synthetic
/// workers on loopback TCP, with one coordinator and with a reducer in each worker, their
/// process's CPU time less the per-float work the model counts apart (`per_float`: encode,
/// decode and add by encoding; Adam); the lower of two runs, as other work on the machine only
/// adds to a process's CPU time.
fn data_plane_costs(
    model: &CapsNetConfig,
    floats: usize,
    (per_float, adam_s): (&[[f64; 2]; 3], f64),
) -> Result<[[f64; 2]; 2]> {
    let (n, f) = (2.0, floats as f64);
    let mut net = [[0.0; 2]; 2];
    for (i, reducers) in [0usize, 2].into_iter().enumerate() {
        for kind in [WireKind::F32, WireKind::Bf16] {
            let mut cpu_ms = f64::INFINITY;
            for _ in 0..2 {
                let row = crate::sync::measure(&crate::sync::SyncSettings {
                    workers: 2,
                    wire: kind.encoding(),
                    rounds: 10,
                    warmup: 3,
                    model: model.clone(),
                    chunk_bytes: if reducers == 0 {
                        wire::DEFAULT_CHUNK_BYTES
                    } else {
                        wire::SHARDED_CHUNK_BYTES
                    },
                    reducers,
                    unix: false,
                    delta: false,
                })?;
                cpu_ms = cpu_ms.min(row.cpu_ms_per_round.ok_or(BenchError::NoRounds)?);
            }
            let k = kind.index();
            let b = f * kind.bytes() as f64;
            let [encode, decode, add] = [per_float[0][k], per_float[1][k], per_float[2][k]];
            let workers = n * f * (encode + decode);
            // One coordinator: every update in, every result out. A reducer in each worker:
            // the other worker's half of the update in, of the result out; its own half stays
            // in the process.
            let (work, bytes) = if reducers == 0 {
                (n * f * add + f * (adam_s + encode) + workers, 2.0 * n * b)
            } else {
                (
                    n * (f * add + f / n * (adam_s + encode)) + workers,
                    2.0 * (n - 1.0) * b,
                )
            };
            net[i][k] = ((cpu_ms / 1e3 - work) / bytes).max(0.0);
        }
    }
    Ok(net)
}

pub use crate::plots::FONT;

/// One line of the plot: a label and (workers, efficiency) points, in one panel per rate.
pub struct Line {
    pub label: String,
    pub rate_gbps: f64,
    pub points: Vec<(usize, f64)>,
}

/// Draws scaling efficiency against workers, one 560 x 460 panel per link rate, to `path` (PNG,
/// or SVG by the extension), the text in the font at `font`.
pub fn plot_png(path: &std::path::Path, font: &std::path::Path, lines: &[Line]) -> Result<()> {
    use crate::plots::{Panel, Series, XAxis};
    let mut rates: Vec<f64> = lines.iter().map(|l| l.rate_gbps).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let panels: Vec<Panel> = rates
        .iter()
        .map(|rate| Panel {
            title: format!("{rate} Gbit/s links"),
            x_desc: "workers".into(),
            y_desc: "scaling efficiency".into(),
            x_axis: XAxis::Log2,
            y_range: Some((0.0, 1.05)),
            legend_upper_right: false,
            series: (lines.iter().filter(|l| l.rate_gbps == *rate))
                .map(|l| Series {
                    label: l.label.clone(),
                    points: (l.points.iter())
                        .map(|&(n, e)| ((n as f64).log2(), e))
                        .collect(),
                })
                .collect(),
        })
        .collect();
    crate::plots::draw(path, font, &panels, panels.len(), (560, 460))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Costs with no CPU work and a fixed step: the sync is the link's bytes and the fill.
    fn free_cpu(step_s: f64) -> Costs {
        Costs {
            floats: 1_000_000,
            batch: 32,
            cores: 2,
            step_s,
            stages: vec![
                Stage {
                    share: 0.35,
                    window_s: 0.05,
                },
                Stage {
                    share: 0.99,
                    window_s: 0.02,
                },
            ],
            encode_s: [0.0; 2],
            decode_s: [0.0; 2],
            add_s: [0.0; 2],
            adam_s: 0.0,
            delta_share: [0.75, 0.5],
            delta_encode_s: [0.0; 2],
            delta_decode_s: [0.0; 2],
            copy_s: 0.0,
            net_s: [[0.0; 2]; 2],
            chunk_bytes: 1 << 20,
            sharded_chunk_bytes: 256 << 10,
        }
    }

    fn scenario(layout: Layout, workers: usize) -> Scenario {
        Scenario {
            layout,
            workers,
            rate_bps: 1e9,
            wire: WireKind::F32,
            overlap: false,
            sync_every: 1,
            shared_cores: None,
            delta: false,
        }
    }

    #[test]
    fn the_links_carry_what_each_layout_sends() {
        let c = free_cpu(0.1);
        let rate = 1e9 * TCP_PAYLOAD_SHARE;
        let b = 4e6 * 8.0 / rate; // seconds of one update on a link
        let fill = 2.0 * (1 << 20) as f64 * 8.0 / rate;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let p = project(&c, &scenario(Layout::Coordinator, 4));
        assert!(
            close(p.link_s, 4.0 * b) && close(p.sync_s, 4.0 * b + fill),
            "{p:?}"
        );
        let p = project(&c, &scenario(Layout::ShardedColocated, 4));
        assert!(close(p.link_s, 1.5 * b), "{p:?}");
        let p = project(&c, &scenario(Layout::ShardedSeparate, 4));
        assert!(close(p.link_s, b), "{p:?}");
        // One worker with its own reducer sends nothing.
        let p = project(&c, &scenario(Layout::ShardedColocated, 1));
        assert!(close(p.sync_s, 0.0) && close(p.efficiency, 1.0), "{p:?}");
        // bf16 halves the bytes; K local steps divide the sync's share by K.
        let mut s = scenario(Layout::Coordinator, 4);
        s.wire = WireKind::Bf16;
        assert!(close(project(&c, &s).link_s, 2.0 * b));
        s.wire = WireKind::F32;
        s.sync_every = 8;
        let p = project(&c, &s);
        assert!(close(p.round_s, 8.0 * 0.1 + 4.0 * b + fill), "{p:?}");
        // Delta pulls shrink what comes back (0.75 of f32 here): a co-located worker's link
        // carries both ways, so it gains; the coordinator's and a separate worker's busier
        // direction is the pushes', so they do not. Parameters pushed after local steps are
        // never pulled as changes.
        let delta = |layout, n| {
            let mut s = scenario(layout, n);
            s.delta = true;
            project(&c, &s).link_s
        };
        assert!(close(delta(Layout::ShardedColocated, 4), 0.75 * 1.75 * b));
        assert!(close(delta(Layout::Coordinator, 4), 4.0 * b));
        assert!(close(delta(Layout::ShardedSeparate, 4), b));
        s.delta = true;
        assert!(close(project(&c, &s).round_s, p.round_s));
    }

    #[test]
    fn efficiency_falls_with_workers_for_one_coordinator_and_not_for_sharding() {
        let c = free_cpu(0.2);
        let eff = |l, n| project(&c, &scenario(l, n)).efficiency;
        assert!(eff(Layout::Coordinator, 16) < eff(Layout::Coordinator, 2));
        assert!(eff(Layout::ShardedSeparate, 64) == eff(Layout::ShardedSeparate, 2));
        assert!(eff(Layout::ShardedColocated, 64) > eff(Layout::Coordinator, 64));
    }

    #[test]
    fn overlap_hides_what_is_final_and_fits_in_the_windows() {
        let c = free_cpu(0.2);
        let st = &c.stages;
        // A slow link: 0.03 s of the first stage's window, then 0.02 s of both, each moving
        // a share of time / sync.
        assert!((hidden_share(st, 1.0, 1.0) - 0.05).abs() < 1e-12);
        // A fast one: the first stage's share is sent at once, the second's in its window.
        assert!((hidden_share(st, 0.01, 1.0) - 0.99).abs() < 1e-12);
        // In between, the first stage is capped by its share (0.35 of a 0.06 s sync moves in
        // 0.021 s), then 0.02 s more move 1/3 of the update.
        assert!((hidden_share(st, 0.06, 1.0) - (0.35 + 0.02 / 0.06)).abs() < 1e-12);
        // A machine twice as slow has twice the windows.
        assert!((hidden_share(st, 1.0, 2.0) - 0.1).abs() < 1e-12);
        assert_eq!(hidden_share(st, 0.0, 1.0), 0.0);
        let mut s = scenario(Layout::ShardedSeparate, 8);
        let plain = project(&c, &s).sync_s;
        s.overlap = true;
        let hidden = plain - project(&c, &s).sync_s;
        assert!(hidden > 0.0 && hidden <= 0.05 + 1e-12, "{hidden}");
        // No overlap for parameters pushed after K local steps.
        s.sync_every = 4;
        let p = project(&c, &s);
        assert!((p.round_s - (0.8 + plain)).abs() < 1e-12, "{p:?}");
    }

    #[test]
    fn a_shared_machine_serialises_the_cpu_work_and_the_steps() {
        let mut c = free_cpu(0.1);
        c.add_s = [1e-9; 2];
        let mut s = scenario(Layout::Coordinator, 4);
        s.shared_cores = Some(2);
        let p = project(&c, &s);
        // Four single-thread steps on two cores take twice one step.
        assert!((p.round_s - p.sync_s - 0.2).abs() < 1e-12, "{p:?}");
    }

    #[test]
    fn the_data_plane_costs_cpu_where_bytes_are_sent_and_received() {
        let mut c = free_cpu(0.2);
        c.net_s = [[1e-9; 2]; 2];
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let mut s = scenario(Layout::ShardedSeparate, 4);
        // At 100 Gbit/s the link moves the 4 MB in 0.33 ms: the sync is the CPU of a worker's
        // 8 MB in and out, half a byte's cost each on one core (4 ms), not the reducer's
        // (the same bytes on two cores).
        s.rate_bps = 100e9;
        let fill = 2.0 * (256 << 10) as f64 * 8.0 / (100e9 * TCP_PAYLOAD_SHARE);
        let p = project(&c, &s);
        assert!(p.link_s < 0.001 && close(p.sync_s, 0.004 + fill), "{p:?}");
        // One coordinator's machine handles every worker's bytes: 4 x 8 MB on two cores.
        s.layout = Layout::Coordinator;
        let fill = 2.0 * (1 << 20) as f64 * 8.0 / (100e9 * TCP_PAYLOAD_SHARE);
        assert!(close(project(&c, &s).sync_s, 0.008 + fill));
        // On one shared machine of two cores every byte costs both its ends there: 32 MB.
        s.layout = Layout::ShardedSeparate;
        s.shared_cores = Some(2);
        let fill = 2.0 * (256 << 10) as f64 * 8.0 / (100e9 * TCP_PAYLOAD_SHARE);
        assert!(close(project(&c, &s).sync_s, 0.016 + fill));
    }

    #[test]
    fn a_hidden_sync_takes_its_cpu_from_the_step() {
        let mut c = free_cpu(0.2);
        c.net_s = [[1e-9; 2]; 2];
        let mut s = scenario(Layout::ShardedSeparate, 4);
        s.rate_bps = 100e9;
        s.overlap = true;
        let fill = 2.0 * (256 << 10) as f64 * 8.0 / (100e9 * TCP_PAYLOAD_SHARE);
        // The 4 ms of CPU fit in the windows (0.99 of the update is hidden), and that CPU is
        // taken from the step's two cores: 0.99 x 4 ms / 2 longer.
        let p = project(&c, &s);
        let step = 0.2 + 0.99 * 0.004 / 2.0;
        assert!(
            (p.round_s - (step + 0.01 * 0.004 + fill)).abs() < 1e-12,
            "{p:?}"
        );
        // Without a data-plane cost, hiding is free.
        c.net_s = [[0.0; 2]; 2];
        let free = project(&c, &s);
        assert!(free.round_s < p.round_s && (free.round_s - free.sync_s - 0.2).abs() < 1e-12);
        // On a shared machine the hidden CPU stretches the steps' turns, which leaves more
        // of the backward pass to hide behind: at 100 Mbit/s more is hidden than without it.
        c.net_s = [[1e-9; 2]; 2];
        s.rate_bps = 1e8;
        s.shared_cores = Some(2);
        let shared = project(&c, &s);
        c.net_s = [[0.0; 2]; 2];
        let shared_free = project(&c, &s);
        assert!(
            shared.sync_s < shared_free.sync_s,
            "{shared:?} {shared_free:?}"
        );
        assert!(
            shared.round_s > shared_free.round_s,
            "{shared:?} {shared_free:?}"
        );
    }
}
