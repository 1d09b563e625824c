//! What anyone who can reach the coordinator's port can do without the token, bounded: many
//! connections, connections that never speak, and many half-sent requests to the health
//! service (which needs no token). Memory stays bounded and a real worker still joins and
//! trains. Loopback only; the flood comes from 127.0.0.2, the worker from 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capsnet_proto::pb;
use common::*;

/// The coordinator's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

/// A TCP connection to `addr` from 127.0.0.2 (another loopback address than the worker's).
async fn connect_from_elsewhere(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind("127.0.0.2:0".parse().unwrap())?;
    s.connect(addr).await
}

/// The head of a gRPC request to `path` at `addr`, with the test token when `token`.
fn grpc_request(addr: SocketAddr, path: &str, token: bool) -> http::Request<()> {
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if token {
        req = req.header("authorization", format!("Bearer {TOKEN}"));
    }
    req.body(()).unwrap()
}

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// Opens `streams` requests to `path` (without the token) on one HTTP/2 connection, each announcing a 4 MiB
/// message and sending only `sent` bytes of it, and keeps them open. Returns what must stay
/// alive for the streams to stay open.
async fn half_sent_requests(
    addr: SocketAddr,
    path: &str,
    streams: usize,
    sent: usize,
) -> Option<(h2::client::SendRequest<Bytes>, Vec<h2::SendStream<Bytes>>)> {
    let tcp = connect_from_elsewhere(addr).await.ok()?;
    let (client, conn) = h2::client::handshake(tcp).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut held = vec![];
    let mut client = client;
    for _ in 0..streams {
        let Ok(ready) =
            tokio::time::timeout(Duration::from_millis(500), client.clone().ready()).await
        else {
            break; // the server's stream limit: no more at once
        };
        let Ok(mut c) = ready else { break };
        let req = grpc_request(addr, path, false);
        let Ok((_resp, mut body)) = c.send_request(req, false) else {
            break;
        };
        // The gRPC message prefix: uncompressed, 4 MiB long; then part of it.
        let mut data = vec![0u8, 0, 0x40, 0, 0];
        data.resize(5 + sent, 7);
        body.reserve_capacity(data.len());
        let _ = body.send_data(Bytes::from(data), false);
        held.push(body);
        client = c;
    }
    Some((client, held))
}

/// The run a flood test's worker trains to its end meanwhile: 20 rounds of batch 4.
const FLOODED_RUN: &[&str] = &["--batch-size", "4", "--max-steps", "20"];

/// A flood without the token: 8 connections of half-sent health requests (each announcing a
/// 4 MiB message and sending 3 MiB of it, 64 per connection, at most 32 at once), then 100
/// silent connections (the server keeps 32 from one address in all, and drops each that says
/// nothing for 10 s). The coordinator's memory grows by less than the flooding connections'
/// flow-control windows (8 x 32 MiB; 50-110 MiB seen): each request is refused at its length
/// prefix (1 KiB limit), so only what is in flight counts (with the 4 MiB limit of before, the
/// same flood grew it by 1.1 GiB). A worker that comes meanwhile
/// joins and trains the run to its end.
#[test]
fn a_flood_without_the_token_costs_bounded_memory_and_a_worker_still_trains() {
    let mut s = Setup::start(
        64,
        &[FLOODED_RUN, &["--max-connections-per-ip", "32"]].concat(),
    );
    let addr: SocketAddr = s.url.trim_start_matches("http://").parse().unwrap();
    let flood = Flood::at(addr, HEALTH_CHECK, s.coord.pid());
    // The worker comes from another address than the flood, joins and trains to the end.
    let mut w = s.worker(0, &[]);
    w.expect_success(Duration::from_secs(60));
    s.coord.expect_success(Duration::from_secs(30));
    let log = s.coord.log_text();
    assert!(log.contains("connection refused"), "{log}");
    drop(flood);
}

/// What a flood holds open, and the flooded process's memory before and under it.
struct Flood {
    _silent: Vec<tokio::net::TcpStream>,
    _half_sent: Vec<(h2::client::SendRequest<Bytes>, Vec<h2::SendStream<Bytes>>)>,
    _rt: tokio::runtime::Runtime,
}

impl Flood {
    /// Floods `addr` without the token from 127.0.0.2: 8 connections of up to 64 half-sent
    /// requests to `path` (each announcing a 4 MiB message and sending 3 MiB of it), then 100
    /// silent connections; checks that the server took at least 32 streams on each flooding
    /// connection and that the memory of process `pid` grew by less than the flooding
    /// connections' flow-control windows (8 x 32 MiB).
    fn at(addr: SocketAddr, path: &str, pid: u32) -> Flood {
        let before = rss_bytes(pid);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (silent, half_sent, peak) = rt.block_on(async {
            let mut half_sent = vec![];
            for _ in 0..8 {
                if let Some(h) = half_sent_requests(addr, path, 64, 3 << 20).await {
                    half_sent.push(h);
                }
            }
            // Silent connections: up to the per-address limit of 32 (the 8 above count) are
            // kept until 10 s pass; the rest are closed at once.
            let mut silent = vec![];
            for _ in 0..100 {
                if let Ok(c) = connect_from_elsewhere(addr).await {
                    silent.push(c);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            (silent, half_sent, rss_bytes(pid))
        });
        let streams: usize = half_sent.iter().map(|(_, h)| h.len()).sum();
        eprintln!(
            "{path}: silent connections {}, half-sent streams {streams}, memory {} -> {} MiB",
            silent.len(),
            before >> 20,
            peak >> 20
        );
        assert!(streams >= 8 * 32, "the flood opened only {streams} streams");
        // Each of the 8 flooding connections can have at most its flow-control window in
        // flight (a loaded machine reads the refused streams' data later, so more of it
        // waits); a length limit that let a 4 MiB message in grew the process by 1.1 GiB here.
        let bound = 8 * u64::from(capsnet_coordinator::CONNECTION_WINDOW);
        assert!(
            peak < before + bound,
            "memory grew from {} MiB to {} MiB under the flood (bound: {} MiB more)",
            before >> 20,
            peak >> 20,
            bound >> 20
        );
        Flood {
            _silent: silent,
            _half_sent: half_sent,
            _rt: rt,
        }
    }
}

/// The same flood at a reducer (`capsnet reducer`), on its bulk path: half-sent pushes without
/// the token, refused at their headers, and silent connections. Its memory grows by less than
/// the flooding connections' windows, and a worker from another address trains the run to its
/// end through that reducer meanwhile.
#[test]
fn a_flood_at_a_reducer_costs_bounded_memory_and_the_run_trains() {
    let mut s = Setup::start(
        64,
        &[FLOODED_RUN, &["--reducers", "1", "--chunk-bytes", "4096"]].concat(),
    );
    let listen = free_addr();
    let mut cmd = capsnet();
    cmd.args([
        "reducer",
        "--coordinator",
        &s.url,
        "--listen",
        &listen,
        "--threads",
        "1",
        "--name",
        "flooded",
        "--max-connections-per-ip",
        "32",
    ]);
    let mut r = Proc::spawn("flooded", cmd, s.tmp.path());
    wait_for_or_log("the reducer's span", Duration::from_secs(30), &[&r], || {
        r.log_text().contains("span assigned").then_some(())
    });
    let addr: SocketAddr = listen.parse().unwrap();
    let flood = Flood::at(addr, capsnet_proto::frame::PUSH_PATH, r.pid());
    let mut w = s.worker(0, &[]);
    w.expect_success(Duration::from_secs(60));
    s.coord.expect_success(Duration::from_secs(30));
    r.expect_success(Duration::from_secs(30));
    let log = r.log_text();
    assert!(log.contains("connection refused"), "{log}");
    drop(flood);
}

/// A connection that never sends a request is closed after 10 s; one that does is not.
#[test]
fn a_connection_that_never_speaks_is_closed() {
    let mut s = Setup::start(64, &["--batch-size", "4", "--max-steps", "1000"]);
    let addr: SocketAddr = s.url.trim_start_matches("http://").parse().unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    // The server's SETTINGS may come first; then the close.
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        assert!(start.elapsed() < Duration::from_secs(25), "never closed");
    }
    let took = start.elapsed();
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(25)).contains(&took),
        "closed after {took:?}"
    );
    // A client that speaks keeps its connection past that: two health checks 12 s apart on
    // one HTTP/2 connection (no reconnecting in between).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let check = |client: h2::client::SendRequest<Bytes>| async move {
            let mut c = client.ready().await.unwrap();
            let req = grpc_request(addr, HEALTH_CHECK, false);
            let (resp, mut body) = c.send_request(req, false).unwrap();
            body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
                .unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200);
            c
        };
        let client = check(client).await;
        tokio::time::sleep(Duration::from_secs(12)).await;
        check(client).await;
    });
    s.coord.signal(libc::SIGTERM);
    s.coord.expect_success(Duration::from_secs(30));
}

/// A worker that asks for the parameters and then reads nothing (its HTTP/2 window stays
/// full) does not hold them: after --stall-timeout the coordinator lets go of the stream's
/// frames, and what the worker reads later ends with an error, not with the parameters.
#[test]
fn a_pull_that_is_never_read_is_let_go() {
    let mut args = STEADY.to_vec();
    args.extend(["--stall-timeout", "1s"]);
    with_coordinator(&args, |url| async move {
        let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
        let j = join(&url, "reader", Some(0)).await;
        let total_bytes = 4 * j.total as usize;
        // A client whose stream window holds 8 KiB: the server can send that much ahead.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(8 << 10)
            .handshake::<_, Bytes>(tcp)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut c = client.ready().await.unwrap();
        let req = grpc_request(addr, capsnet_proto::frame::PULL_PATH, true);
        let (resp, mut body) = c.send_request(req, false).unwrap();
        let pull = capsnet_proto::pb::PullRequest {
            worker_id: j.id.clone(),
            after_round: None,
            encoding: capsnet_proto::Encoding::F32 as i32,
            layout: None,
            cannot_reach: None,
            delta: false,
            shm: false,
        };
        body.send_data(capsnet_proto::frame::frame(&pull), true)
            .unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut data = resp.into_body();
        // Read nothing for three stall periods, then everything there is.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut got = 0usize;
        let mut failed = false;
        while let Some(d) = data.data().await {
            match d {
                Ok(b) => {
                    got += b.len();
                    let _ = data.flow_control().release_capacity(b.len());
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let status = if failed {
            None
        } else {
            data.trailers().await.ok().flatten()
        };
        let ok = status
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .is_some_and(|v| v == "0");
        assert!(
            !ok && got < total_bytes,
            "the stalled pull was served whole ({got} of {total_bytes} bytes, trailers {status:?})"
        );
        // The coordinator goes on: the same worker pulls normally.
        let mut j = j;
        let p = capsnet_worker::pull(
            &mut j.client,
            &j.id,
            None,
            capsnet_proto::Encoding::F32,
            &j.settings.grid(),
        )
        .await
        .unwrap();
        assert!(p.order.participate);
    });
}

/// A flood from a peer that has the token, while a real worker trains: 320 joins under new
/// names (8 at a time) into a registry bounded to 256 (`--max-workers`), and status calls 512
/// at a time for at least 3 s. Joins past the bound are refused with RESOURCE_EXHAUSTED while
/// every name is live, the control lane sheds what it cannot queue, the real worker is never
/// marked unhealthy, and once the flood's names stop heartbeating the run goes on and a new
/// name takes the place of the longest-gone one.
#[test]
fn a_flood_of_joins_and_status_calls_is_shed_and_a_worker_keeps_training() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    const BOUND: usize = 256;
    const JOINERS: usize = 8;
    const JOINS_EACH: usize = 40;
    let bound = BOUND.to_string();
    let args = [
        "--batch-size",
        "4",
        "--epochs",
        "10000",
        "--max-steps",
        "100000",
        "--heartbeat",
        "5s",
        "--max-workers",
        &bound,
    ];
    let mut s = Setup::start(64, &args);
    let _w = s.worker(0, &[]);
    let url = s.url.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let real = rt.block_on(async move {
        let mut c = capsnet_worker::Client::connect(&url, TOKEN, None)
            .await
            .unwrap();
        let real = wait_status(&mut c, "training", |st| st.round >= 2)
            .await
            .workers
            .iter()
            .map(|w| w.name.clone())
            .collect::<Vec<_>>();
        let count = || Arc::new(AtomicUsize::new(0));
        let (joined, refused, shed, answered) = (count(), count(), count(), count());
        let mut joiners = vec![];
        for t in 0..JOINERS {
            let (url, joined, refused) = (url.clone(), joined.clone(), refused.clone());
            joiners.push(tokio::spawn(async move {
                let mut c = capsnet_worker::Client::connect(&url, TOKEN, None)
                    .await
                    .unwrap();
                for i in 0..JOINS_EACH {
                    let req = pb::JoinRequest {
                        name: format!("flood-{t}-{i}"),
                        rank_hint: None,
                    };
                    match c.rpc().join(req).await {
                        Ok(_) => joined.fetch_add(1, Relaxed),
                        Err(e) => {
                            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                            refused.fetch_add(1, Relaxed)
                        }
                    };
                }
                // Its connection stays open until every joiner is done (a closed connection
                // marks the names that joined over it unhealthy at once).
                c
            }));
        }
        let flood_start = Instant::now();
        let mut askers = vec![];
        for _ in 0..16 {
            let (url, shed, answered) = (url.clone(), shed.clone(), answered.clone());
            askers.push(tokio::spawn(async move {
                let c = capsnet_worker::Client::connect(&url, TOKEN, None)
                    .await
                    .unwrap();
                // Bursts of 32 calls for 3 s, at most 200 bursts.
                for _ in 0..200 {
                    if flood_start.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                    let calls = (0..32).map(|_| {
                        let mut c = c.clone();
                        async move { c.rpc().status(pb::StatusRequest {}).await }
                    });
                    for r in futures_util::future::join_all(calls).await {
                        match r {
                            Ok(_) => answered.fetch_add(1, Relaxed),
                            Err(e) => {
                                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                                shed.fetch_add(1, Relaxed)
                            }
                        };
                    }
                }
            }));
        }
        let limit = Duration::from_secs(60);
        let mut open = vec![];
        for j in joiners {
            open.push(
                tokio::time::timeout(limit, j)
                    .await
                    .expect("over 60 s")
                    .unwrap(),
            );
        }
        for a in askers {
            tokio::time::timeout(limit, a)
                .await
                .expect("over 60 s")
                .unwrap();
        }
        let (joined, refused) = (joined.load(Relaxed), refused.load(Relaxed));
        eprintln!(
            "{:.1} s: joins {joined} taken, {refused} refused; status calls {} answered, {} shed",
            flood_start.elapsed().as_secs_f64(),
            answered.load(Relaxed),
            shed.load(Relaxed)
        );
        assert_eq!(joined + refused, JOINERS * JOINS_EACH);
        assert_eq!(
            joined,
            BOUND - real.len(),
            "the registry took {joined} of the flood's names besides {real:?}"
        );
        assert!(answered.load(Relaxed) > 0);
        drop(open);
        // The flood's names miss their heartbeats (3 x 5 s) and are marked unhealthy; the
        // real worker is not, and training goes on.
        let st = wait_status(&mut c, "the flood's names to be unhealthy", |st| {
            st.workers
                .iter()
                .filter(|w| w.name.starts_with("flood-"))
                .all(|w| w.state == pb::WorkerState::Unhealthy as i32)
        })
        .await;
        assert!(st.workers.len() <= BOUND, "{} workers", st.workers.len());
        for w in st.workers.iter().filter(|w| real.contains(&w.name)) {
            assert_eq!(w.state, pb::WorkerState::Healthy as i32, "{w:?}");
        }
        let round = st.round;
        wait_status(&mut c, "training after the flood", |st| {
            st.round >= round + 3
        })
        .await;
        // A new name takes the place of the longest-gone one.
        let late = join(&url, "late-comer", None).await;
        let st = coordinator_status(&mut c).await;
        assert_eq!(st.workers.len(), BOUND);
        assert!(st.workers.iter().any(|w| w.worker_id == late.id));
        real
    });
    s.coord.signal(libc::SIGTERM);
    s.coord.expect_success(Duration::from_secs(30));
    let log = s.coord.log_text();
    for name in &real {
        assert!(
            !log.lines()
                .any(|l| l.contains("unhealthy") && l.contains(&format!("name={name} "))),
            "the real worker {name} was marked unhealthy under the flood:\n{log}"
        );
    }
}

/// Polls the coordinator's status until `done` holds (at most 60 s, else fails naming `what`).
async fn wait_status(
    c: &mut capsnet_worker::Client,
    what: &str,
    done: impl Fn(&pb::StatusResponse) -> bool,
) -> pb::StatusResponse {
    let start = Instant::now();
    loop {
        let st = coordinator_status(c).await;
        if done(&st) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "waited 60 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `capsnet health`, the probe for command-based checks: exit 0 and SERVING for the live
/// process, exit 1 and NOT_SERVING for readiness while no worker has joined, exit 1 naming the
/// address when nothing listens there.
#[test]
fn capsnet_health_exits_by_the_answer() {
    with_coordinator(&STEADY, |url| async move {
        let addr = url.trim_start_matches("http://").to_string();
        let health = |extra: &[&str]| {
            let mut c = capsnet();
            c.args(["health", "--address", &addr]).args(extra);
            c.output().unwrap()
        };
        let o = health(&[]);
        assert!(o.status.success(), "{}", output_text(&o));
        assert!(output_text(&o).contains("SERVING"), "{}", output_text(&o));
        let o = health(&["--service", "capsnet.v1.Coordinator"]);
        assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
        assert!(
            output_text(&o).contains("NOT_SERVING"),
            "{}",
            output_text(&o)
        );
        let o = capsnet()
            .args(["health", "--address", "127.0.0.1:1", "--timeout", "1s"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
        assert!(
            output_text(&o).contains("127.0.0.1:1"),
            "{}",
            output_text(&o)
        );
    });
}
