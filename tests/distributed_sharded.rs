//! Sharded reduction (`coordinator --reducers R`): reducer processes own spans of the grid and
//! their optimizer state; workers push each span to its owner and pull it from there. Real
//! coordinator, reducer and worker processes on loopback, a tiny network, synthetic data. The
//! bits do not depend on the layout: R reducers give the checkpoint one coordinator gives, and
//! so does a run that lost a reducer and rolled back to the state last gathered from them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsnet_core::checkpoint::Checkpoint;
use capsnet_proto::{Encoding, pb};
use common::*;

/// How the reducers of a run are laid out.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// One coordinator reduces everything.
    None,
    /// R `capsnet reducer` processes.
    Separate(usize),
    /// A reducer in each worker process (`worker --serve-reducer`).
    Colocated,
}

/// A 2-worker run of the tiny network for `steps` rounds of batch 4 on `data` with `extra`
/// coordinator flags, in `layout`; returns its run dir. `during` runs while it trains, with
/// the run dir, the reducers and the workers (to kill one) and the coordinator's URL.
fn run(
    tmp: &Path,
    data: &Path,
    name: &str,
    steps: u64,
    extra: &[&str],
    layout: Layout,
    during: impl FnOnce(&Path, &mut Vec<Proc>, &mut Vec<Proc>, &str),
) -> PathBuf {
    let run = tmp.join(name);
    let steps = steps.to_string();
    let reducers = match layout {
        Layout::None => 0,
        Layout::Separate(r) => r,
        Layout::Colocated => 2,
    }
    .to_string();
    let mut args = vec![
        "--batch-size",
        "4",
        "--max-steps",
        &steps,
        "--max-shift",
        "0",
        "--seed",
        "11",
        "--expect-workers",
        "2",
        "--min-workers",
        "2",
        "--round-timeout",
        "30s",
        // Many chunks, so that spans hold several and workers send them out of order.
        "--chunk-bytes",
        "4096",
        "--reducers",
        &reducers,
    ];
    args.extend_from_slice(extra);
    let (mut coord, url) = tiny_coordinator(tmp, name, data, &run, &args);
    let mut reducers = vec![];
    if let Layout::Separate(r) = layout {
        for i in 0..r {
            // Each serves its metrics at the address in `<its name>.metrics`.
            let (who, at) = (format!("{name}-reducer-{i}"), free_addr());
            std::fs::write(tmp.join(format!("{who}.metrics")), &at).unwrap();
            reducers.push(reducer(tmp, &url, &who, &["--metrics-listen", &at]));
        }
    }
    let serve: &[&str] = if layout == Layout::Colocated {
        &["--serve-reducer", "127.0.0.1:0"]
    } else {
        &[]
    };
    let mut workers = vec![
        worker(tmp, &url, 0, data, serve),
        worker(tmp, &url, 1, data, serve),
    ];
    during(&run, &mut reducers, &mut workers, &url);
    coord.expect_success(Duration::from_secs(120));
    for w in &mut workers {
        w.expect_success(Duration::from_secs(30));
    }
    for r in &mut reducers {
        if r.exited().is_none() {
            r.expect_success(Duration::from_secs(30));
        }
    }
    run
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The checkpoint of round `round` in `a` and `b` holds the same parameters and optimizer
/// state, bit for bit.
fn same_checkpoints(a: &Path, b: &Path, round: u64, what: &str) {
    let file = format!("checkpoint-{round}.safetensors");
    let x = Checkpoint::load(&a.join(&file), None).unwrap();
    let y = Checkpoint::load(&b.join(&file), None).unwrap();
    assert_eq!(x.step, round);
    assert_eq!(y.step, round);
    assert!(
        bits(&x.params.data) == bits(&y.params.data),
        "{what}: the parameters differ"
    );
    match (&x.adam, &y.adam) {
        (Some(p), Some(q)) => {
            assert_eq!(p.step, q.step, "{what}: Adam's steps differ");
            assert!(bits(&p.m) == bits(&q.m), "{what}: the first moments differ");
            assert!(
                bits(&p.v) == bits(&q.v),
                "{what}: the second moments differ"
            );
        }
        (None, None) => {}
        _ => panic!("{what}: one checkpoint has Adam's state, the other not"),
    }
    assert_eq!(x.outer, y.outer, "{what}: the outer momenta differ");
    assert_eq!(x.position, y.position, "{what}: the data positions differ");
}

/// Grad mode: 1, 2 and 3 reducers give, after 8 rounds, the parameters and Adam moments of one
/// coordinator, bit for bit; the 3 with the parameters pulled as their changes
/// (`--delta-pulls`).
#[test]
fn any_number_of_reducers_gives_the_bits_of_one_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let one = run(tmp.path(), &d, "one", 8, &[], Layout::None, |_, _, _, _| {});
    for r in 1..=3 {
        let name = format!("sharded-{r}");
        let extra: &[&str] = if r == 3 {
            &["--delta-pulls", "true"]
        } else {
            &[]
        };
        let sharded = run(
            tmp.path(),
            &d,
            &name,
            8,
            extra,
            Layout::Separate(r),
            |_, _, _, _| {},
        );
        same_checkpoints(&one, &sharded, 8, &name);
        let metrics = std::fs::read_to_string(sharded.join("metrics.jsonl")).unwrap();
        assert!(
            metrics.contains("\"kind\":\"eval\""),
            "no evaluation of the gathered state:\n{metrics}"
        );
    }
}

/// The bf16 wire with a reducer in each worker process (and the parameters pulled as their
/// changes), and params mode with the outer optimizer over two reducer processes, give the
/// bits of one coordinator too.
#[test]
fn bf16_colocated_and_params_mode_shard_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let bf16 = ["--wire", "bf16"];
    let one = run(
        tmp.path(),
        &d,
        "bf16-one",
        6,
        &bf16,
        Layout::None,
        |_, _, _, _| {},
    );
    let co = run(
        tmp.path(),
        &d,
        "bf16-co",
        6,
        &["--wire", "bf16", "--delta-pulls", "true"],
        Layout::Colocated,
        |_, _, _, _| {},
    );
    same_checkpoints(&one, &co, 6, "bf16, co-located reducers");

    let params = [
        "--sync",
        "params",
        "--sync-every",
        "2",
        "--outer-optimizer",
        "nesterov",
    ];
    let one = run(
        tmp.path(),
        &d,
        "params-one",
        3,
        &params,
        Layout::None,
        |_, _, _, _| {},
    );
    let two = run(
        tmp.path(),
        &d,
        "params-two",
        3,
        &params,
        Layout::Separate(2),
        |_, _, _, _| {},
    );
    same_checkpoints(&one, &two, 3, "params mode, outer optimizer");
}

/// A reducer killed with SIGKILL mid-run: its span moves to the live reducers, the run rolls
/// back to the state last gathered from them (here after every round: `--gather-every 1ms`;
/// no checkpoint is taken before the end) and goes on; it finishes with the bits of an
/// uninterrupted run of one coordinator (the rounds redone train on the same samples from the
/// same state). A survivor's metrics show the loss: a second assignment, of a larger span.
#[test]
fn a_reducer_killed_mid_run_costs_the_rounds_since_the_last_gather_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    // The parameters are pulled as their changes, also across the rollbacks.
    let lost = killed_and_joined(
        tmp.path(),
        &["--gather-every", "1ms", "--delta-pulls", "true"],
    );
    // Each time the spans moved, the run went back to a recent gather: a round or two, not
    // to the start.
    let moves = reassignments(&lost);
    assert!(moves.len() >= 2, "expected two reassignments: {moves:?}");
    for &(from, to) in &moves {
        assert!(
            to >= 20 && from - to <= 5,
            "rolled back from round {from} to {to}"
        );
    }
}

/// The same with the state gathered only at the default `--gather-every` (60 s, so not in
/// this run before its end): the reducer's death sends the run back to its start, but the
/// reducer that joins later takes a span from a gather made for it, so its join costs no
/// round; the bits are still those of one process.
#[test]
fn a_reducer_that_joins_takes_a_span_without_a_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let lost = killed_and_joined(tmp.path(), &[]);
    let moves = reassignments(&lost);
    assert_eq!(moves.len(), 2, "{moves:?}");
    assert_eq!(moves[0].1, 0, "the death goes back to the start: {moves:?}");
    let (from, to) = moves[1];
    assert!(
        from == to && to >= 10,
        "the join rolled back from {from} to {to}"
    );
}

/// One epoch of 300 rounds (2400 samples, so the only checkpoint is the last one) with
/// `extra` flags, by one coordinator and by 3 reducers of which one is killed and another
/// joins ([`kill_one_then_add_one`]): both end with the same bits, and neither worker had to
/// join again. Returns the second's run.
fn killed_and_joined(tmp: &Path, extra: &[&str]) -> PathBuf {
    let d = synthetic(tmp, 2400);
    let one = run(tmp, &d, "one", 300, extra, Layout::None, |_, _, _, _| {});
    let lost = run(
        tmp,
        &d,
        "lost",
        300,
        extra,
        Layout::Separate(3),
        kill_one_then_add_one,
    );
    same_checkpoints(
        &one,
        &lost,
        300,
        "after a reducer was killed and another joined",
    );
    // A worker whose push or pull the death cut short keeps its session (and its place in
    // the rounds): it asks for the round's order again instead of joining again.
    for k in 0..2 {
        let w = std::fs::read_to_string(tmp.join(format!("worker-{k}.log"))).unwrap();
        assert!(!w.contains("joining again"), "{w}");
    }
    lost
}

/// Fails the test for a run that stalled, with the logs of its coordinator (`run`'s name in
/// its folder), reducers and workers.
fn stalled(run: &Path, reducers: &[Proc], workers: &[Proc], what: &str) -> ! {
    let name = run.file_name().unwrap().to_string_lossy();
    let coordinator = run.parent().unwrap().join(format!("{name}.log"));
    eprintln!(
        "--- coordinator ---\n{}",
        std::fs::read_to_string(&coordinator).unwrap_or_default()
    );
    for p in reducers.iter().chain(workers) {
        eprintln!("--- {} ---\n{}", p.name, p.log_text());
    }
    panic!("timed out waiting for {what}");
}

/// Kills the reducer that owns the first span after 30 rounds (--reducers 3 with 3
/// processes: none is spare, so the other two take the whole grid), checks that a survivor
/// took more, and after 10 more rounds starts a new one, which gets a span back.
#[allow(clippy::ptr_arg)] // the signature of every hook run during a run
fn kill_one_then_add_one(run: &Path, reducers: &mut Vec<Proc>, workers: &mut Vec<Proc>, _: &str) {
    let rounds = wait_for("30 rounds", Duration::from_secs(60), || {
        let n = common::rounds(run).len();
        (n >= 30).then_some(n)
    });
    let tmp = run.parent().unwrap();
    let survivor = std::fs::read_to_string(tmp.join("lost-reducer-1.metrics")).unwrap();
    let span_then = sample(
        &scrape(&survivor, "/metrics").1,
        "capsnet_reducer_span_floats",
    )
    .unwrap();
    reducers[0].signal(libc::SIGKILL);
    reducers[0].wait(Duration::from_secs(10));
    assert!(rounds < 300, "the run ended before the reducer was killed");
    // Seconds without a round mean a run that hangs; the bound leaves room for a round
    // timeout (30 s) on a loaded machine. A timeout prints every process's log.
    let after = common::poll_for(Duration::from_secs(120), || {
        let n = common::rounds(run).len();
        (n >= rounds + 10).then_some(n)
    })
    .unwrap_or_else(|| stalled(run, reducers, workers, "10 more rounds"));
    assert!(after < 300, "the run ended before a reducer came back");
    // A survivor's metrics show the loss: a second assignment, of a larger span.
    let (_, m) = scrape(&survivor, "/metrics");
    assert!(
        sample(&m, "capsnet_reducer_assignments_total").is_some_and(|n| n >= 2.0),
        "{m}"
    );
    assert!(
        sample(&m, "capsnet_reducer_span_floats").is_some_and(|n| n > span_then),
        "{span_then}: {m}"
    );
    let url = format!(
        "http://{}",
        std::fs::read_to_string(tmp.join("lost.addr")).unwrap()
    );
    reducers.push(reducer(tmp, &url, "lost-reducer-3", &[]));
}

/// Each time the coordinator of the run in `run` assigned the spans anew mid-run, the round
/// it was at and the round it went on from (the same when nothing was rolled back).
fn reassignments(run: &Path) -> Vec<(u64, u64)> {
    let log = std::fs::read_to_string(run.parent().unwrap().join("lost.log")).unwrap_or_default();
    let field = |line: &str, name: &str| -> u64 {
        let at = line
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            + name.len();
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    };
    log.lines()
        .filter_map(|l| {
            if l.contains("rolling back to the last gathered state") {
                Some((field(l, "from="), field(l, "to=")))
            } else if l.contains("the open round is planned again under the new layout") {
                let r = field(l, "round=");
                Some((r, r))
            } else {
                None
            }
        })
        .collect()
}

/// A reducer that no worker can reach (it advertises an address where nothing listens, while
/// its session with the coordinator is fine) is dropped once every worker said so, without
/// waiting for --round-timeout (600 s here, which would stall the test): its span moves to the
/// other reducer, the run rolls back to the state last gathered and trains to its end. A
/// reducer that joins again at that address waits as a spare instead of taking a span back.
#[test]
fn a_reducer_that_no_worker_can_reach_is_dropped_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    unreachable_reducer(tmp.path(), &format!("http://{}", free_addr()));
}

/// The same where a gRPC server at the advertised address accepts every connection and fails
/// every call (it serves only `grpc.health.v1`, so capsnet's calls are UNIMPLEMENTED): a
/// worker checks that a reducer answers a heartbeat, not only that it accepts a connection,
/// before it counts it as reachable again.
#[test]
fn a_reducer_address_that_accepts_connections_and_fails_every_call_is_unreachable() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let at = listener.local_addr().unwrap();
    let (_, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    unreachable_reducer(tmp.path(), &format!("http://{at}"));
    let _ = stop.send(());
    rt.block_on(server).unwrap().unwrap();
}

/// Trains one epoch (50 rounds) with two workers and two reducers, one of which advertises
/// `advertise` (where the workers cannot reach it) and is dropped; checks that no round
/// waited for its deadline.
fn unreachable_reducer(t: &Path, advertise: &str) {
    let d = synthetic(t, 400);
    let run = t.join("run");
    let args = [
        "--batch-size",
        "4",
        "--max-shift",
        "0",
        "--expect-workers",
        "2",
        "--round-timeout",
        "600s",
        "--chunk-bytes",
        "4096",
        "--reducers",
        "2",
    ];
    let (mut coord, url) = tiny_coordinator(t, "coordinator", &d, &run, &args);
    let mut reachable = reducer(t, &url, "reducer-0", &[]);
    let mut unreachable = reducer(t, &url, "reducer-1", &["--advertise", advertise]);
    let mut workers = [worker(t, &url, 0, &d, &[]), worker(t, &url, 1, &d, &[])];
    coord.expect_success(Duration::from_secs(120));
    for w in &mut workers {
        w.expect_success(Duration::from_secs(30));
    }
    reachable.expect_success(Duration::from_secs(30));
    let c = coord.log_text();
    assert!(
        c.contains("no live worker can reach this reducer") && c.contains(advertise),
        "{c}"
    );
    assert!(!c.contains("missed the round deadline"), "{c}");
    // One epoch: 400 samples, 8 a round.
    assert_eq!(common::rounds(&run).len(), 50, "{c}");
    // Dropped, it joined again and waited as a spare (or was still reconnecting at the end).
    if c.matches("reducer joined reducer=reducer-1").count() > 1 {
        assert!(c.contains("this one waits as a spare"), "{c}");
    }
    let span_moves = c.matches("span assigned reducer=reducer-0").count();
    assert_eq!(span_moves, 2, "{c}");
    unreachable.signal(libc::SIGTERM);
    unreachable.wait(Duration::from_secs(30));
}

/// A worker that joins again under its name while it is a member of the open round (its
/// session broke, the process did not) gets a new id: the coordinator tells the reducers, and
/// they take the round's update from that id instead of refusing it as a stranger's (which,
/// with the round waiting for that member, would stall the run).
#[test]
fn a_member_that_joins_again_pushes_to_the_reducers_under_its_new_id() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--reducers",
        "1",
        "--expect-workers",
        "1",
        "--min-workers",
        "1",
    ];
    let log = with_coordinator(&args, |url| async move {
        let mut r = reducer(dir.path(), &url, "rejoin-reducer", &[]);
        let first = join(&url, "w", Some(0)).await;
        let (grid, place) = first.settings.grids();
        let mut params = vec![0.0f32; first.total as usize];
        let mut reducers = capsnet_worker::Reducers::new(TOKEN, None, None, None);
        let want = |id, after| capsnet_worker::Want {
            id,
            after,
            enc: Encoding::F32,
            grid: &grid,
            place: &place,
            holds: false,
        };
        let mut c = first.client.clone();
        let (o, _) = capsnet_worker::fetch(
            &mut c,
            &mut reducers,
            want(&first.id, None),
            None,
            &mut params,
        )
        .await
        .unwrap();
        assert!(o.participate && !o.finished);
        // The same name again, while round o.round waits for it.
        let mut again = join(&url, "w", Some(0)).await;
        assert_ne!(again.id, first.id);
        let (o2, l2) = capsnet_worker::fetch(
            &mut again.client,
            &mut reducers,
            want(&again.id, None),
            None,
            &mut params,
        )
        .await
        .unwrap();
        assert_eq!(o2.round, o.round);
        assert!(o2.participate);
        let l2 = l2.unwrap();
        let update = capsnet_worker::Update {
            round: o2.round,
            samples: o2.end - o2.start,
            loss: 0.5,
            data: std::sync::Arc::from(vec![1e-3f32; first.total as usize]),
        };
        let pool = capsnet_proto::wire::BufPool::new(0);
        let clients = reducers.clients(&l2).await.unwrap();
        let used =
            capsnet_worker::push_spans(clients, &l2, &again.id, &again.settings, update, &pool)
                .await
                .unwrap();
        assert!(
            used,
            "the reducer refused the member's update under its new id"
        );
        // The round closed with it: the next order is the next round's.
        let (o3, _) = capsnet_worker::fetch(
            &mut again.client,
            &mut reducers,
            want(&again.id, Some(o2.round)),
            Some(&l2),
            &mut params,
        )
        .await
        .unwrap();
        assert_eq!(o3.round, o2.round + 1);
        r.signal(libc::SIGTERM);
        r.wait(Duration::from_secs(30));
    });
    assert!(!log.contains("panicked"), "{log}");
}

/// A sharded run's coordinator serves work orders, not parameters: a pull, a push and a
/// reducer with a bad address are refused by name; GetWork on an unsharded run is refused.
#[test]
fn a_sharded_coordinator_refuses_what_belongs_to_the_reducers() {
    let log = with_coordinator(
        &["--reducers", "1", "--expect-workers", "1"],
        |url| async move {
            let mut j = join(&url, "probe", Some(0)).await;
            let grid = j.settings.grid();
            assert!(j.settings.sharded);
            let e = capsnet_worker::pull(&mut j.client, &j.id, None, Encoding::F32, &grid)
                .await
                .err()
                .expect("a pull from the coordinator of a sharded run");
            assert!(e.to_string().contains("reducers"), "{e}");
            let update = capsnet_worker::Update {
                round: 0,
                samples: 4,
                loss: 0.5,
                data: vec![0.0f32; j.total as usize],
            };
            let pool = capsnet_proto::wire::BufPool::new(0);
            let e = capsnet_worker::push(&mut j.client, &j.id, &j.settings, update, &pool)
                .await
                .expect_err("a push to the coordinator of a sharded run");
            assert!(e.to_string().contains("reducers"), "{e}");
            // No reducer joined: the work order waits.
            let ask = pb::PullRequest {
                worker_id: j.id.clone(),
                after_round: None,
                encoding: Encoding::F32 as i32,
                layout: None,
                cannot_reach: None,
                delta: false,
                shm: false,
            };
            let waited =
                tokio::time::timeout(Duration::from_millis(500), j.client.rpc().get_work(ask))
                    .await;
            assert!(waited.is_err(), "a work order without reducers: {waited:?}");

            // A reducer session that advertises no URL workers can dial.
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let token: tonic::metadata::MetadataValue<_> =
                format!("Bearer {TOKEN}").parse().unwrap();
            let mut c = pb::reducers_client::ReducersClient::with_interceptor(
                channel,
                move |mut r: tonic::Request<()>| {
                    r.metadata_mut().insert("authorization", token.clone());
                    Ok(r)
                },
            );
            let hello = pb::ReducerReport {
                report: Some(pb::reducer_report::Report::Hello(pb::ReducerHello {
                    address: "ftp://10.0.0.1:1".into(),
                    name: "bad".into(),
                })),
            };
            let e = c
                .session(tokio_stream::iter(vec![hello]))
                .await
                .expect_err("a reducer with a bad address");
            assert!(e.message().contains("http://"), "{e}");
        },
    );
    assert!(!log.contains("panicked"), "{log}");

    // An unsharded run has no work orders without parameters.
    with_coordinator(&[], |url| async move {
        let mut j = join(&url, "probe", Some(0)).await;
        let ask = pb::PullRequest {
            worker_id: j.id.clone(),
            after_round: None,
            encoding: Encoding::F32 as i32,
            layout: None,
            cannot_reach: None,
            delta: false,
            shm: false,
        };
        let e = j.client.rpc().get_work(ask).await.unwrap_err();
        assert!(e.message().contains("no reducers"), "{e}");
    });
}

/// `capsnet launch --reducers 2` serves a reducer in each of its 2 workers and trains to the
/// bits `capsnet launch` gives without reducers; more reducers than workers is refused before
/// anything starts.
#[test]
fn launch_serves_reducers_in_its_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let launch = |name: &str, extra: &[&str]| {
        let run = tmp.path().join(name);
        let out = capsnet()
            .env_remove("CAPSNET_TOKEN")
            .args(["launch", "--workers", "2", "--model", "tiny"])
            .args(["--batch-size", "4", "--max-steps", "4", "--max-shift", "0"])
            .args(["--seed", "11", "--chunk-bytes", "4096"])
            .args(extra)
            .arg("--data-dir")
            .arg(&d)
            .arg("--run-dir")
            .arg(&run)
            .output()
            .unwrap();
        (run, out)
    };
    let (one, out) = launch("one", &[]);
    assert!(out.status.success(), "{}", output_text(&out));
    let (sharded, out) = launch("sharded", &["--reducers", "2"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("every reducer has its span"), "{text}");
    // On unix sockets by default, in a folder removed at the end.
    let socket = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("address=unix:"))
        .unwrap_or_else(|| panic!("no reducer on a unix socket:\n{text}"));
    let folder = Path::new(socket).parent().unwrap();
    assert!(!folder.exists(), "{} is left behind", folder.display());
    same_checkpoints(&one, &sharded, 4, "launch --reducers 2");
    let (tcp, out) = launch("tcp", &["--reducers", "2", "--transport", "tcp"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("address=http://127.0.0.1:"), "{text}");
    same_checkpoints(&one, &tcp, 4, "launch --reducers 2 --transport tcp");

    let (_, out) = launch("refused", &["--reducers", "3"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("--reducers 3 with --workers 2"), "{text}");
}

/// A worker reaches the reducer it serves in process, without a socket: one worker whose
/// reducer advertises an address where nothing listens still trains to the end, with the bits
/// of one coordinator (its whole update goes to, and its parameters come from, its own span).
#[test]
fn a_worker_pushes_to_and_pulls_from_its_own_reducer_in_process() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 32);
    // A port nothing listens on: taken, then let go.
    let nowhere = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let one_worker = |name: &str, reducers: &str, serve: &[&str]| {
        let run = tmp.path().join(name);
        let args = [
            "--batch-size",
            "4",
            "--max-steps",
            "4",
            "--max-shift",
            "0",
            "--seed",
            "11",
            "--expect-workers",
            "1",
            "--min-workers",
            "1",
            "--round-timeout",
            "30s",
            "--chunk-bytes",
            "4096",
            "--reducers",
            reducers,
        ];
        let (mut coord, url) = tiny_coordinator(tmp.path(), name, &d, &run, &args);
        let mut w = worker(tmp.path(), &url, 0, &d, serve);
        coord.expect_success(Duration::from_secs(120));
        w.expect_success(Duration::from_secs(30));
        run
    };
    let one = one_worker("one", "0", &[]);
    let serve = [
        "--serve-reducer",
        "127.0.0.1:0",
        "--reducer-advertise",
        nowhere.as_str(),
    ];
    let own = one_worker("own", "1", &serve);
    same_checkpoints(&one, &own, 4, "a worker and its own reducer, in process");
}

/// A reducer's metrics: `capsnet reducer --metrics-listen` serves its own (`capsnet_reducer_*`),
/// and a worker with `--serve-reducer` serves its reducer's beside its own at its
/// `--metrics-listen`, as one exposition. Both move during a run, and the two spans they report
/// cover the model.
#[test]
fn reducers_serve_their_metrics_alone_and_beside_their_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let d = synthetic(tmp.path(), 64);
    let run = tmp.path().join("run");
    let args = [
        "--batch-size",
        "4",
        "--epochs",
        "1000",
        "--expect-workers",
        "2",
        "--min-workers",
        "2",
        "--reducers",
        "2",
        "--chunk-bytes",
        "4096",
        "--log-every",
        "100000",
    ];
    let (mut coord, url) = tiny_coordinator(tmp.path(), "coordinator", &d, &run, &args);
    let (alone, beside) = (free_addr(), free_addr());
    let _reducer = reducer(tmp.path(), &url, "alone", &["--metrics-listen", &alone]);
    let _w0 = worker(
        tmp.path(),
        &url,
        0,
        &d,
        &[
            "--serve-reducer",
            "127.0.0.1:0",
            "--metrics-listen",
            &beside,
        ],
    );
    let _w1 = worker(tmp.path(), &url, 1, &d, &[]);
    wait_for("5 rounds", Duration::from_secs(60), || {
        (common::rounds(&run).len() >= 5).then_some(())
    });
    let (status, r) = scrape(&alone, "/metrics");
    assert!(status.contains("200"), "{status}");
    let committed = sample(&r, "capsnet_reducer_rounds_total").unwrap();
    assert!(committed >= 1.0, "{r}");
    assert_eq!(
        sample(&r, "capsnet_reducer_assignments_total"),
        Some(1.0),
        "{r}"
    );
    assert_eq!(
        sample(&r, "capsnet_reducer_coordinator_sessions_total"),
        Some(1.0),
        "{r}"
    );
    assert!(
        sample(&r, "capsnet_reducer_updates_total").is_some_and(|n| n >= committed),
        "{r}"
    );
    assert!(
        sample(&r, "capsnet_reducer_round_seconds_count").is_some_and(|n| n >= committed),
        "{r}"
    );
    assert!(sample(&r, "capsnet_reducer_last_round_timestamp_seconds").unwrap() > 1.7e9);
    assert!(
        sample(&r, "capsnet_reducer_connections").is_some_and(|n| n >= 1.0),
        "{r}"
    );
    for dir in ["in", "out"] {
        let name =
            format!(r#"capsnet_reducer_wire_bytes_total{{encoding="f32",direction="{dir}"}}"#);
        assert!(sample(&r, &name).is_some_and(|b| b > 0.0), "{name}: {r}");
    }
    // Nothing of the coordinator's (membership, evaluation) is claimed by a reducer.
    assert!(!r.contains("capsnet_members"), "{r}");
    assert!(!r.contains("capsnet_test_accuracy"), "{r}");
    // The worker's exposition: its own metrics, then its reducer's, one EOF at the end.
    let (status, w) = scrape(&beside, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(sample(&w, "capsnet_worker_joins_total").is_some(), "{w}");
    assert!(
        sample(&w, "capsnet_reducer_rounds_total").is_some_and(|n| n >= 1.0),
        "{w}"
    );
    assert_eq!(w.matches("# EOF").count(), 1, "{w}");
    assert!(w.ends_with("# EOF\n"), "{w}");
    // `--model tiny`: the tiny network on 28x28 images of 10 classes.
    let tiny = capsnet_core::CapsNetConfig {
        image_size: 28,
        conv1_kernel: 9,
        primary_kernel: 9,
        classes: 10,
        ..capsnet_core::CapsNetConfig::tiny()
    };
    let total = capsnet_core::ParamLayout::for_config(&tiny).total() as f64;
    let spans = [&r, &w].map(|b| sample(b, "capsnet_reducer_span_floats").unwrap());
    assert!(spans.iter().all(|&n| n > 0.0), "{spans:?}");
    assert_eq!(spans[0] + spans[1], total, "{spans:?}");
    // They move.
    wait_for("more rounds committed", Duration::from_secs(60), || {
        let (_, r) = scrape(&alone, "/metrics");
        (sample(&r, "capsnet_reducer_rounds_total").unwrap() >= committed + 5.0).then_some(())
    });
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
}

/// `capsnet coordinator --listen unix:/path`: a reducer process and worker processes of the
/// machine dial it at that URL and train the bits of the same run over TCP, and the socket file
/// is gone once the run ends; `capsnet health --address unix:/path` answers there, SIGTERM
/// removes the socket too; TLS on a unix socket is refused as a configuration error.
#[test]
fn a_coordinator_on_a_unix_socket_trains_the_bits_of_one_on_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = synthetic(t, 64);
    let tcp = run(t, &d, "tcp", 4, &[], Layout::Separate(1), |_, _, _, _| {});
    let socket = t.join("coordinator.sock");
    let listen = format!("unix:{}", socket.display());
    let extra = ["--listen", listen.as_str()];
    let unix = run(
        t,
        &d,
        "unix",
        4,
        &extra,
        Layout::Separate(1),
        |_, _, _, url| {
            assert_eq!(url, listen);
        },
    );
    same_checkpoints(&tcp, &unix, 4, "a coordinator on a unix socket");
    assert!(!socket.exists(), "the socket file was left behind");

    // Waiting for its workers: live, not ready, and gone with SIGTERM.
    let args = ["--batch-size", "4", "--max-steps", "4", "--listen", &listen];
    let (mut coord, url) = tiny_coordinator(t, "waiting", &d, &t.join("waiting"), &args);
    assert_eq!(url, listen);
    let health = |extra: &[&str]| {
        let o = capsnet()
            .args(["health", "--address", &listen])
            .args(extra)
            .output()
            .unwrap();
        (o.status.code(), output_text(&o))
    };
    let (code, text) = health(&[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("SERVING"), "{text}");
    let (code, text) = health(&["--service", "capsnet.v1.Coordinator"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("NOT_SERVING"), "{text}");
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
    assert!(!socket.exists(), "SIGTERM left the socket file behind");
    let (code, text) = health(&["--timeout", "1s"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&listen), "{text}");

    common::certs::certificates(t);
    let (cert, key) = (t.join("server.pem"), t.join("server.key"));
    let o = capsnet()
        .args(["coordinator", "--model", "tiny", "--listen", &listen])
        .arg("--data-dir")
        .arg(&d)
        .arg("--run-dir")
        .arg(t.join("tls"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains("without TLS"), "{text}");
    assert!(!socket.exists(), "a refused start left a socket file");
}

/// A worker that serves a reducer and fails (here: its data set is not the coordinator's)
/// exits with its error, its reducer stopped and its unix socket removed, instead of serving
/// on without its worker (before, the process waited for the end of a run it could no longer
/// take part in).
#[test]
fn a_worker_that_fails_stops_the_reducer_it_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = synthetic(t, 64);
    let other = t.join("other");
    capsnet_core::data::write_synthetic(&other, 32, 16, 28, 10, 3).unwrap();
    let args = ["--batch-size", "4", "--max-steps", "100", "--reducers", "1"];
    let (mut coord, url) = tiny_coordinator(t, "coordinator", &d, &t.join("run"), &args);
    let socket = t.join("reducer.sock");
    let serve = format!("unix:{}", socket.display());
    let mut w = worker(t, &url, 0, &other, &["--serve-reducer", &serve]);
    let status = w.wait(Duration::from_secs(60));
    let log = w.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("training images"), "{log}");
    assert!(!socket.exists(), "the socket file was left behind\n{log}");
    coord.signal(libc::SIGTERM);
    coord.wait(Duration::from_secs(30));
}

/// A reducer on a unix socket and a worker of its machine pass payloads through shared memory:
/// the reducer leaves each reduced range in a sealed memfd region the worker copies out of, and
/// once the worker has read there it leaves its update in a region of its own for the reducer
/// to reduce from. No payload byte crosses the socket (the reducer's counters), and the
/// parameters are the bits of a pull over the socket. A push that names something else than a
/// worker's region is refused by name and changes nothing: the round closes on the valid push
/// that follows.
#[test]
fn workers_of_the_reducers_machine_push_and_pull_through_shared_memory() {
    use capsnet_worker::{Reducers, Want};
    let args: Vec<&str> = STEADY
        .iter()
        .copied()
        .chain([
            "--reducers",
            "1",
            "--expect-workers",
            "1",
            "--min-workers",
            "1",
        ])
        .collect();
    let Setup {
        tmp,
        mut coord,
        url,
        ..
    } = Setup::start(64, &args);
    let socket = tmp.path().join("reducer.sock");
    let (listen, metrics) = (format!("unix:{}", socket.display()), free_addr());
    let mut cmd = capsnet();
    cmd.args(["reducer", "--coordinator", &url, "--listen", &listen])
        .args([
            "--threads",
            "1",
            "--name",
            "r0",
            "--metrics-listen",
            &metrics,
        ]);
    let mut red = Proc::spawn("reducer", cmd, tmp.path());
    let counter = |family: &str, dir: &str| {
        let (_, body) = scrape(&metrics, "/metrics");
        let name = format!(r#"capsnet_reducer_{family}_total{{encoding="f32",direction="{dir}"}}"#);
        sample(&body, &name).unwrap_or(0.0)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut j = join(&url, "probe", Some(0)).await;
        let s = j.settings.clone();
        let (grid, place) = s.grids();
        let n = j.total as usize;
        let id = j.id.clone();
        let want = |after| Want {
            id: &id,
            after,
            enc: s.wire,
            grid: &grid,
            place: &place,
            holds: false,
        };
        let mut reducers = Reducers::new(TOKEN, None, None, None);
        let mut params = vec![0.0f32; n];
        let (order, layout) =
            capsnet_worker::fetch(&mut j.client, &mut reducers, want(None), None, &mut params)
                .await
                .unwrap();
        let layout = layout.unwrap();
        assert_eq!((order.round, order.participate), (0, true));
        assert_eq!(layout.owners[0].0, listen);
        // Round 0's parameters are the ones the reducer was assigned, not reduced there: they
        // come over the socket.
        let bytes = (n * 4) as f64;
        assert_eq!(counter("wire_bytes", "out"), bytes);

        // A push whose payload is said to lie in a file that is no worker's region (over a
        // connection of its own: a refused push pauses shared memory for pushes over it).
        let clients = Reducers::new(TOKEN, None, None, None)
            .clients(&layout)
            .await
            .unwrap();
        let bogus = capsnet_proto::wire::EncodedChunk {
            offset: 0,
            payload: bytes::Bytes::new(),
            crc32: 0,
            total_crc32: None,
            delta: None,
            shared: Some(capsnet_shm::At {
                region: std::sync::Arc::new(capsnet_shm::Desc {
                    path: "/etc/passwd".into(),
                    id: [0; 16],
                    len: 4096,
                }),
                offset: 0,
            }),
        };
        let mut c = clients[0].clone();
        let head = (0, order.end - order.start, 0.5);
        let e = capsnet_worker::push_chunks(
            &mut c,
            &id,
            &s,
            head,
            layout.id,
            tokio_stream::iter([bogus]),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a /proc/<pid>/fd/<fd> path"), "{e}");
        // Pushes through shared memory pause for a round (round 0's goes again over the
        // socket), and for twice as long after each refusal in a row.
        let m = c.shm().unwrap();
        m.peer_reads
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(!m.pushes_in(0) && m.pushes_in(1));
        assert_eq!(m.push_refused(1), 2);
        assert!(!m.pushes_in(2) && m.pushes_in(3));
        // A second refusal of the same round (another stream) does not count again.
        assert_eq!(m.push_refused(1), 2);
        let pauses: Vec<u64> = (0..12).map(|i| m.push_refused(3 + i)).collect();
        assert_eq!(pauses[..3], [4, 8, 16]);
        assert_eq!(pauses[11], capsnet_worker::MAX_PUSH_PAUSE);
        let until = 14 + capsnet_worker::MAX_PUSH_PAUSE;
        assert!(!m.pushes_in(until - 1) && m.pushes_in(until));
        // One push it takes ends the run of refusals.
        m.push_taken();
        assert_eq!(m.push_refused(2000), 1);

        // The valid update of round 0 (over the socket: the worker has not read the
        // reducer's shared memory yet), then round 1's parameters from shared memory, and the
        // update of round 1 from the worker's.
        let pool = capsnet_proto::wire::BufPool::new(0);
        let push = async |reducers: &mut Reducers, round: u64| {
            let update = capsnet_worker::Update {
                round,
                samples: order.end - order.start,
                loss: 0.5,
                data: std::sync::Arc::from(vec![1e-3f32; n]),
            };
            let clients = reducers.clients(&layout).await.unwrap();
            assert!(
                capsnet_worker::push_spans(clients, &layout, &id, &s, update, &pool)
                    .await
                    .unwrap()
            );
        };
        // The parameters of the round after `after`, into a copy of `from`.
        let mut client = j.client.clone();
        let mut pull = async |reducers: &mut Reducers, after: u64, from: &[f32]| {
            let mut buf = from.to_vec();
            let known = Some(&layout);
            let w = want(Some(after));
            let (o, _) = capsnet_worker::fetch(&mut client, reducers, w, known, &mut buf)
                .await
                .unwrap();
            assert_eq!(o.round, after + 1);
            buf
        };
        push(&mut reducers, 0).await;
        assert_eq!(counter("wire_bytes", "in"), bytes);
        let next = pull(&mut reducers, 0, &params).await;
        assert_eq!(counter("shared_memory_bytes", "out"), bytes);
        assert_eq!(counter("wire_bytes", "out"), bytes);
        push(&mut reducers, 1).await;
        assert_eq!(counter("shared_memory_bytes", "in"), bytes);
        assert_eq!(counter("wire_bytes", "in"), bytes);

        // Round 2 from shared memory, and over the socket by a second connection whose shared
        // memory is off: the same bits.
        let shared = pull(&mut reducers, 1, &next).await;
        assert_eq!(counter("shared_memory_bytes", "out"), 2.0 * bytes);
        let mut socket = Reducers::new(TOKEN, None, None, None);
        for c in socket.clients(&layout).await.unwrap() {
            c.shm()
                .unwrap()
                .pull_off
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let inline = pull(&mut socket, 1, &next).await;
        assert_eq!(counter("wire_bytes", "out"), 2.0 * bytes);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&shared), bits(&inline));
        assert_ne!(bits(&shared), bits(&next), "round 1 changed nothing");
    });
    coord.signal(libc::SIGTERM);
    coord.expect_success(Duration::from_secs(30));
    // Stopped before training finished: it says so, and removes its socket.
    red.signal(libc::SIGTERM);
    red.expect_failure(Duration::from_secs(30));
    assert!(!socket.exists());
}
