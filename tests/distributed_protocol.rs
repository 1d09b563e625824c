//! The coordinator's protocol driven by hand, with no worker process: token checks, updates
//! that must be rejected, the hand-framed parameter stream read by a generic gRPC client, and
//! pulls that arrive early. A tiny network on synthetic 28x28 data, one coordinator process per
//! test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::time::Duration;

use capsnet_proto::wire::{Assembler, encode_chunks, encode_span, to_grid_order};
use capsnet_proto::{Encoding, RunSettings, pb};
use capsnet_worker::{Client, Pulled, WorkerError};
use common::*;
use tonic::Code;

/// A tiny run for clients that drive the protocol by hand: two rounds, heartbeats that do not
/// expire while a test thinks, small chunks (1024 floats).
const PROBE: [&str; 8] = [
    "--batch-size",
    "4",
    "--max-steps",
    "2",
    "--heartbeat",
    "5s",
    "--chunk-bytes",
    "4096",
];

/// `data` as the chunks of one update in the run's chunk size.
fn chunks_msg(
    id: &str,
    round: u64,
    s: &RunSettings,
    samples: u64,
    data: &[f32],
) -> Vec<pb::UpdateChunk> {
    chunks_sized(id, round, s, samples, data, s.chunk_bytes)
}

fn chunks_sized(
    id: &str,
    round: u64,
    s: &RunSettings,
    samples: u64,
    data: &[f32],
    chunk_bytes: usize,
) -> Vec<pb::UpdateChunk> {
    // On the run's grid (a sharded run's lays the vector's chunks out in stripe order), unless
    // the case is about another size of chunk or vector.
    let (grid, place) = s.grids();
    let on_grid = chunk_bytes == s.chunk_bytes && grid.last().map_or(0, |r| r.end) == data.len();
    let chunks = if on_grid {
        let ordered = to_grid_order(data, &grid, &place);
        encode_span(&ordered, &grid, 0..grid.len(), Encoding::F32)
    } else {
        encode_chunks(data, Encoding::F32, chunk_bytes)
    };
    chunks
        .into_iter()
        .map(|c| pb::UpdateChunk {
            worker_id: id.into(),
            round,
            offset: c.offset,
            total_len: data.len() as u64,
            encoding: Encoding::F32 as i32,
            payload: c.payload,
            crc32: c.crc32,
            samples,
            layout_hash: s.layout_hash,
            total_crc32: c.total_crc32,
            loss: 0.5,
            layout: 0,
            shm: None,
        })
        .collect()
}

/// Flips a bit in the payload of chunk `index`, so its checksum no longer matches.
fn corrupt(mut msgs: Vec<pb::UpdateChunk>, index: usize) -> Vec<pb::UpdateChunk> {
    let mut p = msgs[index].payload.to_vec();
    p[0] ^= 1;
    msgs[index].payload = p.into();
    msgs
}

async fn push(c: &mut Client, msgs: Vec<pb::UpdateChunk>) -> Result<(), tonic::Status> {
    c.rpc()
        .push_update(tokio_stream::iter(msgs))
        .await
        .map(|_| ())
}

/// Pulls the parameters after `after` in the run's encoding.
async fn pull(j: &mut Joined, after: Option<u64>) -> Pulled {
    capsnet_worker::pull(
        &mut j.client,
        &j.id,
        after,
        Encoding::F32,
        &j.settings.grid(),
    )
    .await
    .unwrap()
}

/// The raw parameter stream of the round after `after`, in f32, read message by message.
async fn pull_stream(c: &mut Client, id: &str, after: u64) -> tonic::Streaming<pb::ParamChunk> {
    c.rpc()
        .pull_params(pb::PullRequest {
            worker_id: id.into(),
            after_round: Some(after),
            encoding: Encoding::F32 as i32,
            layout: None,
            cannot_reach: None,
            delta: false,
            shm: false,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Pulls past the last round and checks that the run says it is finished, then stops the
/// coordinator with SIGTERM (rather than waiting out its grace period for workers).
async fn finish(j: &mut Joined, last_round: u64, coord: &mut Proc) {
    let end = pull(j, Some(last_round)).await;
    assert!(end.order.finished, "{:?}", end.order);
    coord.signal(libc::SIGTERM);
}

/// A wrong token is refused with UNAUTHENTICATED by the RPCs tonic serves (Join, Status) and by
/// the two bulk streams that are served ahead of tonic's router (PullParams, PushUpdate).
#[test]
fn a_wrong_token_is_refused_by_every_rpc() {
    let Setup {
        tmp: _tmp,
        mut coord,
        url,
        ..
    } = Setup::start(64, &PROBE);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut bad = Client::connect(&url, "wrong-token-0123456789", None)
            .await
            .unwrap();
        let refused = |rpc: &str, e: &tonic::Status| {
            assert_eq!(e.code(), Code::Unauthenticated, "{rpc}: {e}");
            assert!(e.message().contains("invalid token"), "{rpc}: {e}");
        };
        let e = bad
            .rpc()
            .join(pb::JoinRequest {
                name: "x".into(),
                rank_hint: None,
            })
            .await
            .unwrap_err();
        refused("Join", &e);
        let e = bad.rpc().status(pb::StatusRequest {}).await.unwrap_err();
        refused("Status", &e);
        match capsnet_worker::pull(
            &mut bad,
            "w",
            None,
            Encoding::F32,
            &Assembler::grid(8, Encoding::F32, 4096),
        )
        .await
        {
            Err(WorkerError::Rpc(e)) => refused("PullParams", &e),
            Err(e) => panic!("PullParams: {e}"),
            Ok(p) => panic!("PullParams answered a wrong token: {:?}", p.order),
        }
        let e = push(&mut bad, vec![pb::UpdateChunk::default()])
            .await
            .unwrap_err();
        refused("PushUpdate", &e);
    });
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
}

/// A generic gRPC client (tonic's generated one) reads the hand-framed parameter stream as the
/// same parameters and work order as the worker's own reader; and a pull in another encoding
/// than the run's wire is refused with a message that names the run's.
#[test]
fn a_generic_grpc_client_reads_the_hand_framed_parameter_stream() {
    let Setup {
        tmp: _tmp,
        mut coord,
        url,
        ..
    } = Setup::start(64, &PROBE);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut j = join(&url, "probe", Some(0)).await;
        let pulled = pull(&mut j, None).await;
        assert!(pulled.order.participate);
        let mut stream = j
            .client
            .rpc()
            .pull_params(pb::PullRequest {
                worker_id: j.id.clone(),
                after_round: None,
                encoding: Encoding::F32 as i32,
                layout: None,
                cannot_reach: None,
                delta: false,
                shm: false,
            })
            .await
            .unwrap()
            .into_inner();
        let mut via_tonic = vec![0.0f32; j.total as usize];
        let mut asm = Assembler::new(j.settings.grid(), j.total, Encoding::F32).unwrap();
        let mut work = None;
        while let Some(m) = stream.message().await.unwrap() {
            work = work.or(m.work.clone());
            asm.accept((&m).into(), &mut via_tonic).unwrap();
        }
        asm.finish().unwrap();
        assert_eq!(via_tonic, pulled.params);
        assert_eq!(work, Some(pulled.order));

        let e = capsnet_worker::pull(
            &mut j.client,
            &j.id,
            None,
            Encoding::Bf16,
            &j.settings.grid(),
        )
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("serves parameters as F32"), "{e}");
    });
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
}

/// With --delta-pulls, a worker that holds round 0's parameters pulls round 1's as their changes
/// from those: rebuilt bit for bit, in fewer bytes out of the coordinator. A worker that holds other parameters gets changes
/// that do not rebuild them, and pulls the whole chunks again: the same parameters. A pull
/// that did not ask for changes gets whole chunks.
#[test]
fn delta_pulls_rebuild_the_parameters_or_fall_back_to_whole_chunks() {
    for wire in ["f32", "bf16"] {
        let metrics = free_addr();
        let args: Vec<&str> = PROBE
            .iter()
            .copied()
            .chain(["--delta-pulls", "true", "--wire", wire])
            .chain(["--metrics-listen", metrics.as_str()])
            .collect();
        let Setup {
            tmp: _tmp,
            mut coord,
            url,
            ..
        } = Setup::start(64, &args);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut j = join(&url, "probe", Some(0)).await;
            let s = j.settings.clone();
            assert!(s.delta_pulls);
            let (enc, grid, n) = (s.wire, s.grid(), j.total as usize);
            let id = j.id.clone();
            let mut held = vec![0.0f32; n];
            let o = capsnet_worker::pull_into(&mut j.client, &id, None, enc, &grid, &mut held)
                .await
                .unwrap();
            assert_eq!(o.round, 0);
            let update = capsnet_worker::Update {
                round: 0,
                samples: o.end - o.start,
                loss: 0.5,
                data: vec![1e-3f32; n],
            };
            let pool = capsnet_proto::wire::BufPool::new(0);
            capsnet_worker::push(&mut j.client, &id, &s, update, &pool)
                .await
                .unwrap();
            let sent = || {
                let (_, body) = scrape(&metrics, "/metrics");
                let name =
                    format!(r#"capsnet_wire_bytes_total{{encoding="{wire}",direction="out"}}"#);
                sample(&body, &name).unwrap_or(0.0)
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let mut pull = async |buf: &mut Vec<f32>, holds: bool| {
                let before = sent();
                let (o, got) = capsnet_worker::pull_changes_into(
                    &mut j.client,
                    &id,
                    Some(0),
                    enc,
                    &grid,
                    buf,
                    holds,
                )
                .await
                .unwrap();
                assert_eq!(o.round, 1);
                (sent() - before, got as f64)
            };
            // Whole chunks, for a worker that says it holds nothing.
            let mut whole = held.clone();
            // What the worker counts received is what the coordinator counts sent.
            let (whole_bytes, got) = pull(&mut whole, false).await;
            assert_eq!(whole_bytes, (n * wire_bytes(enc)) as f64);
            assert_eq!(got, whole_bytes);
            assert_ne!(bits(&whole), bits(&held), "round 1 changed nothing");
            // The changes from round 0.
            let mut changed = held.clone();
            let (delta_bytes, got) = pull(&mut changed, true).await;
            assert_eq!(got, delta_bytes);
            assert_eq!(bits(&changed), bits(&whole), "{wire}");
            // Adam's first step moves every parameter by about the learning rate: the top
            // byte changes where that changes the exponent (the tiny model's zero biases,
            // small weights).
            let share = delta_bytes / whole_bytes;
            let most = if enc == Encoding::Bf16 { 0.75 } else { 0.9 };
            eprintln!("{wire}: the changes are {share:.3} of the whole");
            assert!(share > 0.25 && share < most, "{wire}: {share}");
            // Other parameters than round 0's: the changes do not rebuild, the whole chunks
            // follow (the worker stops reading the changes at the first that does not
            // rebuild; the coordinator counts what it queued).
            let mut wrong: Vec<f32> = held.iter().map(|x| x + 0.5).collect();
            let (both, got) = pull(&mut wrong, true).await;
            assert_eq!(bits(&wrong), bits(&whole), "{wire}");
            assert!(both > whole_bytes, "{both} {whole_bytes}");
            assert!(got > whole_bytes && got <= both, "{got} {both}");
        });
        coord.signal(libc::SIGTERM);
        coord.expect_success(Duration::from_secs(30));
    }
}

/// Bytes per float of `enc` on the wire.
fn wire_bytes(enc: Encoding) -> usize {
    capsnet_proto::wire::bytes_per_float(enc)
}

/// A valid round-0 update of the probe worker, for a case to break.
struct Valid<'a> {
    j: &'a Joined,
    samples: u64,
    /// Every float of the update (1e-3).
    values: &'a [f32],
    /// The sharded layout the update follows (0: the coordinator reduces).
    layout: u64,
}

impl Valid<'_> {
    fn chunks(&self, round: u64, values: &[f32]) -> Vec<pb::UpdateChunk> {
        let mut msgs = chunks_msg(&self.j.id, round, &self.j.settings, self.samples, values);
        msgs.iter_mut().for_each(|m| m.layout = self.layout);
        msgs
    }
}

/// Where the probe's updates go: the coordinator, or (with `--reducers 1`) the one reducer,
/// which owns every chunk; and how the parameters are read back from it.
struct Target {
    /// A client of the reducer, with the layout and the reducers' clients of the sharded run.
    reducer: Option<(Client, capsnet_worker::Layout, capsnet_worker::Reducers)>,
}

impl Target {
    fn layout(&self) -> u64 {
        self.reducer.as_ref().map_or(0, |(_, l, _)| l.id)
    }

    fn client<'a>(&'a mut self, j: &'a mut Joined) -> &'a mut Client {
        match &mut self.reducer {
            Some((c, _, _)) => c,
            None => &mut j.client,
        }
    }

    /// The order and parameters of the round after `after`: pulled from the coordinator, or
    /// the order from it and the parameters from the reducer.
    async fn pull(&mut self, j: &mut Joined, after: Option<u64>) -> Pulled {
        let Some((_, _, reducers)) = &mut self.reducer else {
            return pull(j, after).await;
        };
        let (grid, place) = j.settings.grids();
        let mut params = vec![0.0f32; j.total as usize];
        let want = capsnet_worker::Want {
            id: &j.id,
            after,
            enc: Encoding::F32,
            grid: &grid,
            place: &place,
            holds: false,
        };
        let (order, _) = capsnet_worker::fetch(&mut j.client, reducers, want, None, &mut params)
            .await
            .unwrap();
        Pulled { order, params }
    }
}

/// One way to break an update, and how the coordinator must refuse it.
struct Case {
    name: &'static str,
    /// The update as sent: a valid one, broken in one way.
    update: fn(&Valid) -> Vec<pb::UpdateChunk>,
    code: Code,
    /// A part of the status message that says what was wrong.
    message: String,
}

/// Each broken update is rejected with its own status and message, and none of them changes
/// the round, the parameters or the worker's slot: after each one the worker still pulls round
/// 0 as it was, with work to do. Its valid update is then accepted and is the only one used.
#[test]
fn bad_updates_are_rejected_and_change_nothing() {
    bad_updates(false);
}

/// The same at a reducer (`capsnet reducer`, owning every chunk): each broken update pushed to
/// it is refused with the same status and message, and changes neither the round nor the
/// parameters it serves; so are an update under another layout and one from a stranger.
#[test]
fn a_reducer_rejects_bad_updates_and_changes_nothing() {
    bad_updates(true);
}

fn bad_updates(sharded: bool) {
    let args: Vec<&str> = PROBE
        .iter()
        .copied()
        .chain(sharded.then_some(["--reducers", "1"]).into_iter().flatten())
        .collect();
    let Setup {
        tmp,
        mut coord,
        url,
        ..
    } = Setup::start(64, &args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut red = sharded.then(|| reducer(tmp.path(), &url, "probe-reducer", &[]));
    rt.block_on(async {
        let mut j = join(&url, "probe", Some(0)).await;
        let mut target = Target { reducer: None };
        if sharded {
            // The layout of round 0's order names the reducer.
            let (grid, place) = j.settings.grids();
            let mut params = vec![0.0f32; j.total as usize];
            let mut reducers = capsnet_worker::Reducers::new(TOKEN, None, None, None);
            let want = capsnet_worker::Want {
                id: &j.id,
                after: None,
                enc: Encoding::F32,
                grid: &grid,
                place: &place,
                holds: false,
            };
            let (_, layout) =
                capsnet_worker::fetch(&mut j.client, &mut reducers, want, None, &mut params)
                    .await
                    .unwrap();
            let layout = layout.unwrap();
            let client = reducers.clients(&layout).await.unwrap().remove(0);
            target.reducer = Some((client, layout, reducers));
        }
        let before = target.pull(&mut j, None).await;
        assert!(before.order.participate);
        let total = j.total;
        let samples = before.order.end - before.order.start;
        let good = vec![1e-3f32; total as usize];
        let chunk_floats = (j.settings.chunk_bytes / 4) as u64;
        // The last chunk sent is the grid's last (a sharded grid is striped: not the vector's).
        let last_offset = j.settings.grid().last().map_or(0, |r| r.start) as u64;
        assert!(
            last_offset > chunk_floats,
            "the update needs 3 chunks or more"
        );

        let cases = [
            Case {
                name: "a round that is not open",
                update: |v| v.chunks(7, v.values),
                code: Code::FailedPrecondition,
                message: "update for round 7, the current round is 0".into(),
            },
            Case {
                name: "one float short",
                update: |v| v.chunks(0, &v.values[1..]),
                code: Code::InvalidArgument,
                message: format!("tensor has {} floats, the model has {total}", total - 1),
            },
            Case {
                name: "another model's layout",
                update: |v| {
                    let mut msgs = v.chunks(0, v.values);
                    msgs.iter_mut().for_each(|m| m.layout_hash ^= 1);
                    msgs
                },
                code: Code::InvalidArgument,
                message: "layout hash differs".into(),
            },
            Case {
                name: "a NaN",
                update: |v| {
                    let mut nan = v.values.to_vec();
                    let at = v.j.settings.layout().get("digit.weight").unwrap().offset + 5;
                    nan[at] = f32::NAN;
                    v.chunks(0, &nan)
                },
                code: Code::InvalidArgument,
                message: "non-finite value (NaN) at digit.weight[5]".into(),
            },
            Case {
                // Finite, but its square overflows Adam's f32 second moment to infinity,
                // which would freeze that parameter for good.
                name: "a gradient of 1e30",
                update: |v| {
                    let mut big = v.values.to_vec();
                    let at = v.j.settings.layout().get("digit.weight").unwrap().offset + 5;
                    big[at] = 1e30;
                    v.chunks(0, &big)
                },
                code: Code::InvalidArgument,
                message: "a value beyond ±1e15 (1e30) at digit.weight[5]".into(),
            },
            Case {
                name: "a NaN loss",
                update: |v| {
                    let mut msgs = v.chunks(0, v.values);
                    msgs.iter_mut().for_each(|m| m.loss = f64::NAN);
                    msgs
                },
                code: Code::InvalidArgument,
                message: "loss NaN is not a finite non-negative number".into(),
            },
            Case {
                name: "a negative loss",
                update: |v| {
                    let mut msgs = v.chunks(0, v.values);
                    msgs.iter_mut().for_each(|m| m.loss = -3.0);
                    msgs
                },
                code: Code::InvalidArgument,
                message: "loss -3 is not a finite non-negative number".into(),
            },
            Case {
                name: "chunks off the run's grid (half its chunk size)",
                update: |v| {
                    let s = &v.j.settings;
                    let mut msgs =
                        chunks_sized(&v.j.id, 0, s, v.samples, v.values, s.chunk_bytes / 2);
                    msgs.iter_mut().for_each(|m| m.layout = v.layout);
                    msgs
                },
                code: Code::InvalidArgument,
                message: "chunk at offset 0: payload of 2048 bytes; this run's chunk there holds 1024 floats".into(),
            },
            Case {
                name: "an update in another encoding than the run's wire",
                update: |v| {
                    let mut msgs = v.chunks(0, v.values);
                    msgs.iter_mut()
                        .for_each(|m| m.encoding = Encoding::Bf16 as i32);
                    msgs
                },
                code: Code::InvalidArgument,
                message: "update encoded as Bf16; this run's wire is F32".into(),
            },
            Case {
                name: "a chunk sent twice",
                update: |v| {
                    let mut msgs = v.chunks(0, v.values);
                    let first = msgs[0].clone();
                    msgs.insert(1, first);
                    msgs
                },
                code: Code::InvalidArgument,
                message: "chunk at offset 0: sent twice".into(),
            },
            Case {
                // Chunks may come in any order, but the one that completes the update must
                // carry the checksum of the whole.
                name: "chunks reordered without the total checksum on the last one sent",
                update: |v| {
                    let mut msgs = v.chunks(0, v.values);
                    msgs.reverse();
                    msgs
                },
                code: Code::InvalidArgument,
                message: "total checksum on a chunk that is not the last".into(),
            },
            Case {
                // After the others were reduced, and with the opposite sign, so a trace of
                // them in the result would show.
                name: "a corrupt last chunk",
                update: |v| {
                    let msgs = v.chunks(0, &vec![-1e-3f32; v.values.len()]);
                    let last = msgs.len() - 1;
                    corrupt(msgs, last)
                },
                code: Code::DataLoss,
                message: format!("checksum mismatch in the chunk at offset {last_offset}"),
            },
            Case {
                name: "a corrupt second chunk",
                update: |v| corrupt(v.chunks(0, v.values), 1),
                code: Code::DataLoss,
                message: format!("checksum mismatch in the chunk at offset {chunk_floats}"),
            },
        ];
        let layout = target.layout();
        let sharded_cases = [
            Case {
                // (A newer one than the reducer knows is waited for, up to --stall-timeout:
                // its assignment may be on its way.)
                name: "an older layout than the reducer's",
                update: |v| {
                    let mut msgs = v.chunks(0, v.values);
                    msgs.iter_mut().for_each(|m| m.layout -= 1);
                    msgs
                },
                code: Code::FailedPrecondition,
                message: "dropped by this reducer".into(),
            },
            Case {
                name: "a stranger's update",
                update: |v| {
                    let mut msgs = v.chunks(0, v.values);
                    msgs.iter_mut().for_each(|m| m.worker_id = "stranger".into());
                    msgs
                },
                // (After waiting once for an order that might name a member that joined
                // again: REJOIN_WAIT.)
                code: Code::FailedPrecondition,
                message: "worker stranger is not a member of this epoch".into(),
            },
        ];
        let extra: &[Case] = if sharded { &sharded_cases } else { &[] };
        for case in cases.iter().chain(extra) {
            let name = case.name;
            let valid = Valid {
                j: &j,
                samples,
                values: &good,
                layout,
            };
            let msgs = (case.update)(&valid);
            let Err(e) = push(target.client(&mut j), msgs).await else {
                panic!("{name}: the update was accepted");
            };
            assert_eq!(e.code(), case.code, "{name}: {e}");
            assert!(
                e.message().contains(&case.message),
                "{name}: expected {:?} in {e}",
                case.message
            );

            let st = coordinator_status(&mut j.client).await;
            assert_eq!(st.round, 0, "{name} changed the round");
            let now = target.pull(&mut j, None).await;
            assert_eq!(now.order, before.order, "{name} changed the work order");
            assert!(now.params == before.params, "{name} changed the parameters");
        }

        // The slot is still free: the valid update is accepted and closes round 0.
        let valid = Valid {
            j: &j,
            samples,
            values: &good,
            layout,
        };
        let msgs = valid.chunks(0, &good);
        push(target.client(&mut j), msgs).await.unwrap();
        let next = target.pull(&mut j, Some(0)).await;
        assert_eq!(next.order.round, 1);
        // Adam's first step moves every parameter by lr against the gradient's sign: only the
        // valid update was used.
        for (i, (a, b)) in before.params.iter().zip(&next.params).enumerate() {
            assert!((b - a + 1e-3).abs() < 1e-6, "float {i}: {a} -> {b}");
        }
        // Now round 0 is stale.
        let stale = Valid {
            j: &j,
            samples,
            values: &good,
            layout,
        }
        .chunks(0, &good);
        let e = push(target.client(&mut j), stale).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("current round is 1"), "{e}");
        let o = next.order;
        let last = Valid {
            j: &j,
            samples: o.end - o.start,
            values: &good,
            layout,
        }
        .chunks(1, &good);
        push(target.client(&mut j), last).await.unwrap();
        let end = target.pull(&mut j, Some(1)).await;
        assert!(end.order.finished, "{:?}", end.order);
        coord.signal(libc::SIGTERM);
    });
    coord.expect_success(Duration::from_secs(60));
    if let Some(r) = red.as_mut() {
        r.expect_success(Duration::from_secs(30));
    }
}

/// Full duplex: a pull for the next round, made while the round is still being reduced, gets
/// ranges early. When a range it got is reduced again (a worker's update failed after taking
/// part, and its retry carries other values), the stream ends with ABORTED, and pulling again
/// gives the final parameters.
#[test]
fn an_early_pull_is_aborted_when_a_range_it_got_is_redone() {
    let args = [&PROBE[..], &["--expect-workers", "2", "--min-workers", "2"]].concat();
    let Setup {
        tmp: _tmp,
        mut coord,
        url,
        ..
    } = Setup::start(64, &args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut a = join(&url, "a", Some(0)).await;
        let mut b = join(&url, "b", Some(1)).await;
        let (s, total) = (a.settings.clone(), a.total);
        let oa = pull(&mut a, None).await.order;
        let ob = pull(&mut b, None).await.order;
        let (sa, sb) = (oa.end - oa.start, ob.end - ob.start);
        let one = vec![1e-3f32; total as usize];
        push(&mut a.client, chunks_msg(&a.id, 0, &s, sa, &one))
            .await
            .unwrap();

        // a pulls round 1 while b is still sending.
        let mut early = pull_stream(&mut a.client, &a.id, 0).await;
        // b sends all but its last chunk, waits until a got range 0, then sends a corrupt last
        // chunk.
        let mut msgs = chunks_msg(&b.id, 0, &s, sb, &one);
        assert!(msgs.len() > 2);
        let last = msgs.pop().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(msgs.len() + 1);
        for m in msgs {
            tx.send(m).await.unwrap();
        }
        let mut b2 = b.client.clone();
        let failing = tokio::spawn(async move {
            b2.rpc()
                .push_update(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let first = early.message().await.unwrap().unwrap();
        assert_eq!((first.round, first.offset), (1, 0));
        assert!(first.work.is_none(), "the work order comes last");
        let last = corrupt(vec![last], 0).pop().unwrap();
        tx.send(last).await.unwrap();
        drop(tx);
        let e = failing.await.unwrap().unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{e}");

        // b's retry carries other values: every range is reduced again.
        let two = vec![2e-3f32; total as usize];
        push(&mut b.client, chunks_msg(&b.id, 0, &s, sb, &two))
            .await
            .unwrap();
        let e = loop {
            match early.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the early stream ended normally"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code(), Code::Aborted, "{e}");

        // Pulling again gives round 1 as it closed, with range 0 unlike the early copy.
        let fin = capsnet_worker::pull_into(
            &mut a.client,
            &a.id,
            Some(0),
            Encoding::F32,
            &a.settings.grid(),
            &mut vec![0.0; total as usize],
        )
        .await
        .unwrap();
        assert_eq!(fin.round, 1);
        let again = pull(&mut a, Some(0)).await;
        let mut early0 = vec![0.0f32; first.payload.len() / 4];
        capsnet_proto::wire::decode_into(&first.payload, Encoding::F32, &mut early0).unwrap();
        assert_ne!(
            early0[..],
            again.params[..early0.len()],
            "range 0 was not redone"
        );

        // Finish the run.
        let fb = pull(&mut b, Some(0)).await.order;
        for (j, o) in [(&mut a, &fin), (&mut b, &fb)] {
            let msgs = chunks_msg(&j.id, 1, &s, o.end - o.start, &one);
            push(&mut j.client, msgs).await.unwrap();
        }
        finish(&mut a, 1, &mut coord).await;
    });
    coord.expect_success(Duration::from_secs(60));
}

/// A worker that joins and pulls before the plan exists (the fleet is still joining) waits,
/// and gets its work as soon as the last expected worker joins: no pull is left behind.
#[test]
fn a_pull_before_the_epoch_is_planned_is_answered_when_it_starts() {
    let Setup {
        tmp: _tmp,
        mut coord,
        url,
        ..
    } = Setup::start(
        64,
        &[
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--expect-workers",
            "2",
            "--start-timeout",
            "600s",
            "--heartbeat",
            "10s",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut early = join(&url, "early", None).await;
        // The coordinator sends a pull's response headers only after its actor has answered
        // the pull (with parameters, or with "not yet"): once this returns, the coordinator has
        // seen the pull, so the wait below cannot pass merely because it was not sent yet.
        let mut stream = early
            .client
            .rpc()
            .pull_params(pb::PullRequest {
                worker_id: early.id.clone(),
                after_round: None,
                encoding: Encoding::F32 as i32,
                layout: None,
                cannot_reach: None,
                delta: false,
                shm: false,
            })
            .await
            .unwrap()
            .into_inner();
        let st = coordinator_status(&mut early.client).await;
        assert_eq!(
            st.workers
                .iter()
                .map(|w| pb::WorkerState::try_from(w.state).unwrap())
                .collect::<Vec<_>>(),
            [pb::WorkerState::Joining],
            "{st:?}"
        );
        // Nothing comes while the fleet is joining.
        let waiting = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
        assert!(waiting.is_err(), "a pull was answered before the plan");

        let _late = join(&url, "late", None).await;
        let read = async {
            let mut asm =
                Assembler::new(early.settings.grid(), early.total, Encoding::F32).unwrap();
            let mut params = vec![0.0f32; early.total as usize];
            let mut work = None;
            while let Some(m) = stream.message().await.unwrap() {
                work = work.or(m.work.clone());
                asm.accept((&m).into(), &mut params).unwrap();
            }
            asm.finish().unwrap();
            work
        };
        let order = tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("the early pull was never answered")
            .expect("no work order");
        assert!(order.participate && order.round == 0, "{order:?}");
    });
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
}

/// Rounds of one worker that pushes `values(round)` as its update, with the check that the
/// coordinator answers as `expect(round, result)` says; `None` from `values` stops.
async fn drive(
    j: &mut Joined,
    rounds: u64,
    mut update: impl FnMut(u64, &Pulled) -> Vec<f32>,
    mut expect: impl FnMut(u64, Result<(), tonic::Status>) -> bool,
) {
    let mut after = None;
    let mut round = 0;
    while round < rounds {
        let p = pull(j, after).await;
        let o = p.order.clone();
        let msgs = chunks_msg(
            &j.id,
            o.round,
            &j.settings,
            o.end - o.start,
            &update(round, &p),
        );
        if expect(round, push(&mut j.client, msgs).await) {
            after = Some(o.round);
        }
        round += 1;
    }
}

/// An update whose norm is far beyond the recent ones (1000x the 9 accepted before it) is
/// rejected with a message that says so, and the round goes on with a normal update; with
/// --clip-updates it is accepted, scaled down. Both are counted in the metrics.
#[test]
fn updates_far_beyond_the_recent_norms_are_rejected_or_clipped() {
    for clip in [false, true] {
        let mut args = STEADY.to_vec();
        if clip {
            args.push("--clip-updates");
        }
        let log = with_coordinator(&args, |url| async move {
            let mut j = join(&url, "probe", Some(0)).await;
            let n = j.total as usize;
            // Rounds 0-8 normal; round 9 a thousand times larger (then normal again, once it
            // was refused); round 10 normal.
            let mut refused = false;
            drive(
                &mut j,
                12,
                |round, _| vec![if round == 9 { 1.0 } else { 1e-3 }; n],
                |round, r| match (round, clip, r) {
                    (9, false, Err(e)) => {
                        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
                        assert!(
                            e.message()
                                .contains("over 100 x the median of the last 9 accepted"),
                            "{e}"
                        );
                        refused = true;
                        false
                    }
                    (_, _, r) => {
                        r.unwrap();
                        true
                    }
                },
            )
            .await;
            assert_eq!(refused, !clip);
            let st = coordinator_status(&mut j.client).await;
            // Every push but the refused one closed a round.
            assert_eq!(st.round, if clip { 12 } else { 11 }, "{st:?}");
        });
        let want = if clip {
            "update clipped"
        } else {
            "update rejected"
        };
        assert!(log.contains(want), "{want}:\n{log}");
    }
}

/// In --sync params an update is parameters: one that moved a parameter further than the
/// round's local Adam steps can (here by 1.0, with lr 1e-3) is rejected, while the model's own
/// parameters plus a small step are accepted. (Any finite parameters used to be accepted, and
/// a model of huge values turns NaN at the next step.)
#[test]
fn params_too_far_from_the_rounds_are_rejected() {
    let mut args = STEADY.to_vec();
    args.extend(["--sync", "params"]);
    with_coordinator(&args, |url| async move {
        let mut j = join(&url, "probe", Some(0)).await;
        let p = pull(&mut j, None).await;
        let o = p.order.clone();
        let samples = o.end - o.start;
        let mut far = p.params.clone();
        let at = j.settings.layout().get("digit.weight").unwrap().offset + 2;
        far[at] += 1.0;
        let e = push(
            &mut j.client,
            chunks_msg(&j.id, 0, &j.settings, samples, &far),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(
            e.message()
                .contains("moved further than local Adam steps can")
                && e.message().contains("digit.weight[2]"),
            "{e}"
        );
        let near: Vec<f32> = p.params.iter().map(|x| x + 1e-4).collect();
        push(
            &mut j.client,
            chunks_msg(&j.id, 0, &j.settings, samples, &near),
        )
        .await
        .unwrap();
        let next = pull(&mut j, Some(0)).await;
        assert_eq!(next.order.round, 1);
        assert!(next.params.iter().zip(&near).all(|(a, b)| a == b));
    });
}

/// `after_round` is the client's word: one past the open round (u64::MAX, where `+ 1` would
/// overflow) is refused with INVALID_ARGUMENT, and the coordinator goes on serving.
#[test]
fn an_after_round_past_the_open_round_is_refused() {
    with_coordinator(&PROBE, |url| async move {
        let mut j = join(&url, "probe", Some(0)).await;
        for after in [u64::MAX, 5] {
            let e = capsnet_worker::pull(
                &mut j.client,
                &j.id,
                Some(after),
                Encoding::F32,
                &j.settings.grid(),
            )
            .await
            .err()
            .expect("a pull after a round that does not exist was answered");
            let WorkerError::Rpc(s) = e else {
                panic!("{e}")
            };
            assert_eq!(s.code(), Code::InvalidArgument, "{s}");
            assert!(s.message().contains("past the open round 0"), "{s}");
        }
        let p = pull(&mut j, None).await;
        assert!(p.order.participate);
    });
}

/// A push that stops after its first chunk is dropped after --stall-timeout with
/// DEADLINE_EXCEEDED, and its slot in the round is free again: the worker's whole update is
/// then accepted. (Without the timeout the stalled push held the slot for good.)
#[test]
fn a_stalled_push_is_dropped_and_frees_its_slot() {
    let mut args = PROBE.to_vec();
    args.extend(["--stall-timeout", "1s"]);
    with_coordinator(&args, |url| async move {
        let mut j = join(&url, "probe", Some(0)).await;
        let p = pull(&mut j, None).await;
        let samples = p.order.end - p.order.start;
        let good = vec![1e-3f32; j.total as usize];
        let msgs = chunks_msg(&j.id, 0, &j.settings, samples, &good);
        assert!(msgs.len() > 2);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(msgs[0].clone()).await.unwrap();
        let mut c = j.client.clone();
        let stalled = tokio::spawn(async move {
            c.rpc()
                .push_update(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let e = tokio::time::timeout(Duration::from_secs(15), stalled)
            .await
            .expect("the stalled push was never dropped")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
        assert!(
            e.message().contains("no chunk for 1s after 1 chunks"),
            "{e}"
        );
        drop(tx);
        push(&mut j.client, msgs).await.unwrap();
        let next = pull(&mut j, Some(0)).await;
        assert_eq!(next.order.round, 1);
    });
}

/// A reducer's early pull carries no work order, so nothing is held back: every range of its
/// span comes as soon as it is reduced (the last one sent with the checksum over the span),
/// while the round is still open, and the stream ends OK once the round commits. Here the last
/// member's update has all its chunks in but its stream still open, so the round cannot close:
/// the early pull already has every range, and the values are those the round commits. Then
/// the coordinator stops on SIGTERM with its reducer's session still open.
#[test]
fn a_reducer_streams_every_range_before_the_round_commits() {
    let args = [
        &PROBE[..],
        &[
            "--expect-workers",
            "2",
            "--min-workers",
            "2",
            "--reducers",
            "1",
        ],
    ]
    .concat();
    let Setup {
        tmp,
        mut coord,
        url,
        ..
    } = Setup::start(64, &args);
    let mut red = reducer(tmp.path(), &url, "reducer", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut a = join(&url, "a", Some(0)).await;
        let mut b = join(&url, "b", Some(1)).await;
        let (s, total) = (a.settings.clone(), a.total);
        let grid = s.grid();
        let mut orders = vec![];
        for j in [&mut a, &mut b] {
            let ask = pb::PullRequest {
                worker_id: j.id.clone(),
                after_round: None,
                encoding: Encoding::F32 as i32,
                layout: None,
                cannot_reach: None,
                delta: false,
                shm: false,
            };
            let o = tokio::time::timeout(Duration::from_secs(30), j.client.rpc().get_work(ask))
                .await
                .expect("no work order for round 0")
                .unwrap()
                .into_inner();
            assert_eq!(o.round, 0);
            assert_eq!(o.reducers.len(), 1, "{o:?}");
            orders.push(o);
        }
        let at = orders[0].reducers[0].address.clone();
        let mut ra = Client::connect(&at, TOKEN, None).await.unwrap();
        let mut rb = ra.clone();
        let samples = |o: &pb::WorkOrder| o.end - o.start;
        let one = vec![1e-3f32; total as usize];
        // The reducer may still be taking its span when the first update comes: retry.
        // Pushes to a reducer name the layout of the work order they follow.
        let layout = orders[0].layout;
        let of_layout = |mut msgs: Vec<pb::UpdateChunk>| {
            for m in &mut msgs {
                m.layout = layout;
            }
            msgs
        };
        let whole = of_layout(chunks_msg(&a.id, 0, &s, samples(&orders[0]), &one));
        let mut tries = 0;
        while let Err(e) = push(&mut ra, whole.clone()).await {
            tries += 1;
            assert!(tries < 100, "a's update was not taken: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // An update under an older layout went to the spans' former owners: refused by name,
        // and not as a bad update (the worker asks for its work order again).
        assert!(layout > 0);
        let stale = chunks_msg(&b.id, 0, &s, samples(&orders[1]), &one);
        let e = push(&mut rb, stale).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("assigned anew"), "{e}");
        // So is a pull under an older layout, named as such.
        let stale_pull = pb::PullRequest {
            worker_id: b.id.clone(),
            after_round: None,
            encoding: Encoding::F32 as i32,
            layout: Some(layout - 1),
            cannot_reach: None,
            delta: false,
            shm: false,
        };
        let e = match rb.rpc().pull_params(stale_pull).await {
            Err(e) => e,
            Ok(r) => r.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("ask for the work order again"), "{e}");

        // b sends every chunk of its update but keeps its stream open.
        let msgs = of_layout(chunks_msg(&b.id, 0, &s, samples(&orders[1]), &one));
        let (tx, rx) = tokio::sync::mpsc::channel(msgs.len());
        for m in msgs {
            tx.send(m).await.unwrap();
        }
        let pushing = tokio::spawn(async move {
            rb.rpc()
                .push_update(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });

        let mut early = pull_stream(&mut ra, &a.id, 0).await;
        let mut asm = Assembler::new(grid.clone(), total, Encoding::F32).unwrap();
        let mut got = vec![0.0f32; total as usize];
        for k in 0..grid.len() {
            let c = tokio::time::timeout(Duration::from_secs(30), early.message())
                .await
                .unwrap_or_else(|_| panic!("range {k} of {} did not come early", grid.len()))
                .unwrap()
                .expect("the early stream ended before every range came");
            assert_eq!(c.round, 1);
            assert!(c.work.is_none(), "a reducer's stream carries no work order");
            assert_eq!(c.total_crc32.is_some(), k + 1 == grid.len(), "chunk {k}");
            asm.accept(capsnet_proto::wire::ChunkIn::from(&c), &mut got)
                .unwrap();
        }
        asm.finish().unwrap();
        // The round cannot commit while b's update is open: the stream is not over yet.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), early.message())
                .await
                .is_err(),
            "the early stream ended before the round could commit"
        );
        drop(tx);
        pushing.await.unwrap().unwrap();
        let end = tokio::time::timeout(Duration::from_secs(30), early.message())
            .await
            .expect("the early stream did not end after the commit");
        assert!(matches!(end, Ok(None)), "{end:?}");

        // Pulling round 1 again (now published) gives the same values.
        let mut again = vec![0.0f32; total as usize];
        let o =
            capsnet_worker::pull_into(&mut ra, &a.id, Some(0), Encoding::F32, &grid, &mut again)
                .await
                .unwrap();
        assert_eq!(o.round, 1);
        assert!(
            got.iter()
                .map(|x| x.to_bits())
                .eq(again.iter().map(|x| x.to_bits())),
            "the ranges sent early are not the ones committed"
        );
        assert!(got != vec![0.0; total as usize]);
    });
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
    // Stopped before training finished: 143, as a worker.
    red.signal(libc::SIGTERM);
    assert_eq!(red.wait(Duration::from_secs(30)).code(), Some(143));
}

/// A member that joins again under its name while its former process's update is half-sent
/// (that stream still open, as a dead machine's connection stays until --stall-timeout): the
/// half-sent update is forgotten and the new id's is taken, not refused as a duplicate; when
/// the former stream finally ends, its abort (under the former id) leaves the new id's update,
/// then under way, alone; and the round closes with both members.
#[test]
fn a_member_that_joins_again_replaces_its_half_sent_update() {
    let mut args = PROBE.to_vec();
    args.extend(["--expect-workers", "2", "--min-workers", "2"]);
    let log = with_coordinator(&args, |url| async move {
        let mut a = join(&url, "probe", Some(0)).await;
        let mut other = join(&url, "other", Some(1)).await;
        let (pa, po) = (pull(&mut a, None).await, pull(&mut other, None).await);
        assert!(pa.order.participate && po.order.participate);
        let update = |j: &Joined, p: &Pulled| {
            let data = vec![1e-3f32; j.total as usize];
            chunks_msg(&j.id, 0, &j.settings, p.order.end - p.order.start, &data)
        };
        // The former process: its first chunk, then silence with the stream open.
        let msgs = update(&a, &pa);
        assert!(msgs.len() >= 4, "{} chunks", msgs.len());
        let (a_tx, a_rx) = tokio::sync::mpsc::channel(msgs.len());
        a_tx.send(msgs[0].clone()).await.unwrap();
        let mut c = a.client.clone();
        let former = tokio::spawn(async move {
            c.rpc()
                .push_update(tokio_stream::wrappers::ReceiverStream::new(a_rx))
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The same name joins again: a new id, the same member of the open round.
        let mut b = join(&url, "probe", Some(0)).await;
        assert_ne!(a.id, b.id);
        let pb_ = pull(&mut b, None).await;
        assert_eq!(pb_.order.round, 0);
        assert!(pb_.order.participate);
        // Its update, half of it, then the former stream ends (its abort comes now), then the
        // rest.
        let msgs = update(&b, &pb_);
        let half = msgs.len() / 2;
        let (b_tx, b_rx) = tokio::sync::mpsc::channel(msgs.len());
        let mut c = b.client.clone();
        let new = tokio::spawn(async move {
            c.rpc()
                .push_update(tokio_stream::wrappers::ReceiverStream::new(b_rx))
                .await
        });
        for m in &msgs[..half] {
            b_tx.send(m.clone())
                .await
                .expect("the new id's update was refused");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(a_tx);
        let e = former.await.unwrap().unwrap_err();
        assert_ne!(e.code(), Code::Ok);
        tokio::time::sleep(Duration::from_millis(300)).await;
        for m in &msgs[half..] {
            b_tx.send(m.clone())
                .await
                .expect("the new id's update was dropped");
        }
        drop(b_tx);
        new.await
            .unwrap()
            .expect("the new id's update was refused or dropped");
        let msgs = update(&other, &po);
        push(&mut other.client, msgs).await.unwrap();
        // The round closed with both members' updates (well before any timeout).
        let next = tokio::time::timeout(Duration::from_secs(10), pull(&mut b, Some(0)))
            .await
            .expect("round 0 did not close");
        assert_eq!(next.order.round, 1);
    });
    assert!(!log.contains("round timed out"), "{log}");
}

/// An update whose payload is said to lie in shared memory goes only to a reducer on a unix
/// socket: the coordinator refuses it by name (INVALID_ARGUMENT), nothing of it is applied,
/// and the round closes on the worker's valid update.
#[test]
fn the_coordinator_takes_no_payloads_in_shared_memory() {
    let Setup {
        tmp: _tmp,
        mut coord,
        url,
        ..
    } = Setup::start(64, &PROBE);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut j = join(&url, "probe", Some(0)).await;
        let s = j.settings.clone();
        let (enc, grid, n) = (s.wire, s.grid(), j.total as usize);
        let id = j.id.clone();
        let mut held = vec![0.0f32; n];
        let o = capsnet_worker::pull_into(&mut j.client, &id, None, enc, &grid, &mut held)
            .await
            .unwrap();
        // The first chunk of a valid update, its payload moved to a "region" instead.
        let mut chunk = encode_chunks(&vec![1e-3f32; n], enc, s.chunk_bytes)
            .into_iter()
            .next()
            .unwrap();
        chunk.payload = bytes::Bytes::new();
        chunk.shared = Some(capsnet_shm::At {
            region: std::sync::Arc::new(capsnet_shm::Desc {
                path: format!("/proc/{}/fd/0", std::process::id()),
                id: [7; 16],
                len: 4096,
            }),
            offset: 0,
        });
        let e = capsnet_worker::push_chunks(
            &mut j.client,
            &id,
            &s,
            (0, o.end - o.start, 0.5),
            0,
            tokio_stream::iter([chunk]),
        )
        .await
        .unwrap_err();
        let WorkerError::Rpc(st) = &e else {
            panic!("{e}")
        };
        assert_eq!(st.code(), Code::InvalidArgument, "{e}");
        assert!(st.message().contains("no payloads in shared memory"), "{e}");
        // The valid update closes round 0: round 1's parameters differ from round 0's.
        let update = capsnet_worker::Update {
            round: 0,
            samples: o.end - o.start,
            loss: 0.5,
            data: vec![1e-3f32; n],
        };
        let pool = capsnet_proto::wire::BufPool::new(0);
        capsnet_worker::push(&mut j.client, &id, &s, update, &pool)
            .await
            .unwrap();
        let mut next = held.clone();
        let o = capsnet_worker::pull_into(&mut j.client, &id, Some(0), enc, &grid, &mut next)
            .await
            .unwrap();
        assert_eq!(o.round, 1);
        assert_ne!(next, held, "round 0 changed nothing");
    });
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
}
