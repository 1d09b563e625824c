//! TLS and mutual TLS between coordinator and workers (rustls), with certificates made by the
//! openssl command line for the test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::time::Duration;

use capsnet_core::data::write_synthetic;
use common::certs::certificates;
use common::*;

/// Certificates, 32 synthetic images and a tiny coordinator that serves mutual TLS (3 rounds of
/// batch 4 for one worker, plus `extra`).
struct Mtls {
    tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    run: std::path::PathBuf,
    coord: Proc,
    /// The coordinator's plaintext-looking URL, and the https:// one workers use.
    url: String,
    https: String,
}

impl Mtls {
    fn start(extra: &[&str]) -> Mtls {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        certificates(t);
        let data = t.join("data");
        write_synthetic(&data, 32, 8, 28, 10, 1).unwrap();
        let run = t.join("run");
        let (cert, key, ca) = (t.join("server.pem"), t.join("server.key"), t.join("ca.pem"));
        let files = [cert, key, ca].map(|f| f.display().to_string());
        // `extra` may set --max-steps and --expect-workers instead.
        let defaults = [("--max-steps", "3"), ("--expect-workers", "1")];
        let mut args = vec![
            "--batch-size",
            "4",
            "--tls-cert",
            &files[0],
            "--tls-key",
            &files[1],
            "--tls-client-ca",
            &files[2],
        ];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let (coord, url) = tiny_coordinator(t, "coordinator", &data, &run, &args);
        let https = url.replace("http://", "https://");
        Mtls {
            tmp,
            data,
            run,
            coord,
            url,
            https,
        }
    }

    /// A file of the test folder, as a flag value.
    fn file(&self, f: &str) -> String {
        self.tmp.path().join(f).display().to_string()
    }

    /// A run of 12 steps with `reducers` reducers and 2 workers that no round waits for
    /// beyond --round-timeout 600s (one that did would stall the test).
    fn sharded(reducers: &str) -> Mtls {
        Mtls::start(&[
            "--reducers",
            reducers,
            "--chunk-bytes",
            "4096",
            "--expect-workers",
            "2",
            "--round-timeout",
            "600s",
            "--max-steps",
            "12",
        ])
    }

    /// Starts reducer `name` serving TLS with the certificate `cert` (`cert.pem`, `cert.key`)
    /// and reaching the coordinator with it.
    fn reducer(&self, name: &str, cert: &str) -> Proc {
        let flags = [
            "--tls-cert".to_string(),
            self.file(&format!("{cert}.pem")),
            "--tls-key".into(),
            self.file(&format!("{cert}.key")),
            "--tls-ca".into(),
            self.file("ca.pem"),
        ];
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        reducer(self.tmp.path(), &self.https, name, &flags)
    }

    /// Starts worker `rank` over mutual TLS, checking `domain` in every reducer's certificate.
    fn worker_checking(&self, rank: u32, domain: &str) -> Proc {
        let mut flags = self.client_flags();
        flags.extend(["--reducer-tls-domain".to_string(), domain.into()]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        worker(self.tmp.path(), &self.https, rank, &self.data, &flags)
    }

    /// The flags of a worker that trusts the test CA and shows the client certificate.
    fn client_flags(&self) -> Vec<String> {
        let (ca, cert, key) = (
            self.file("ca.pem"),
            self.file("client.pem"),
            self.file("client.key"),
        );
        [
            "--tls-ca",
            &ca,
            "--tls-domain",
            "localhost",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ]
        .map(str::to_string)
        .to_vec()
    }
}

#[test]
fn mutual_tls_trains_and_refuses_clients_without_a_certificate() {
    let m = Mtls::start(&[]);
    let client = m.client_flags();
    let Mtls {
        tmp,
        data: d,
        run,
        mut coord,
        url,
        https,
    } = m;
    let t = tmp.path();
    let p = |f: &str| t.join(f).display().to_string();

    // Without a client certificate, or without TLS at all, the worker cannot join.
    let tls_only = [
        "--tls-ca",
        &p("ca.pem"),
        "--tls-domain",
        "localhost",
        "--give-up-after",
        "2s",
    ];
    let mut anon = worker(t, &https, 5, &d, &tls_only);
    anon.expect_failure(Duration::from_secs(30));
    // TLS 1.3 completes the client's side of the handshake before the server checks the
    // client's certificate, so the refusal reaches the worker as the connection ending after
    // the handshake: a hyper error under the transport error, of a kind that is a race (rustls'
    // CertificateRequired alert if the worker reads it in time, else a closed connection, a
    // broken pipe or a connection that was not ready). Failing for another reason reads
    // differently: a missing file names the file, and a failed connect (nothing listening, a
    // server the worker does not trust) is a bare "transport error" with no source.
    let log = anon.log_text();
    assert!(
        log.contains("cannot reach the coordinator at https://") && log.contains("hyper::Error("),
        "{log}"
    );
    // Plaintext to a TLS coordinator: found out before the token is sent, and a
    // configuration error (exit 2) that says what to do.
    let mut plain = worker(t, &url, 6, &d, &["--give-up-after", "2s"]);
    let status = plain.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", plain.log_text());
    assert!(
        plain.log_text().contains("answered with TLS") && plain.log_text().contains("use https://"),
        "{}",
        plain.log_text()
    );

    let client: Vec<&str> = client.iter().map(String::as_str).collect();
    let mut w = worker(t, &https, 0, &d, &client);
    coord.expect_success(Duration::from_secs(60));
    w.expect_success(Duration::from_secs(30));
    assert!(run.join("checkpoint-3.safetensors").exists());
}

/// A sharded run over mutual TLS: the coordinator and the reducer in the worker's process
/// both serve TLS and require client certificates; the worker reaches both, the reducer reaches
/// the coordinator with the worker's client certificate, and the run trains to its end.
#[test]
fn a_sharded_run_trains_over_mutual_tls() {
    sharded_tls_run("server", &[]);
}

/// One certificate for every reducer of a fleet, naming no address (as a Kubernetes Secret
/// would hold): with `--reducer-tls-domain` the worker checks that name instead of each
/// reducer's host, and the run trains to its end.
#[test]
fn reducers_may_share_one_certificate_that_names_no_address() {
    sharded_tls_run("reducer", &["--reducer-tls-domain", "capsnet-reducer"]);
}

/// A 1-worker run with one co-located reducer, all over mutual TLS; the reducer serves the
/// certificate `cert`.pem, and the worker gets `extra`.
fn sharded_tls_run(cert: &str, extra: &[&str]) {
    let m = Mtls::start(&["--reducers", "1"]);
    let reducer_url = m.tmp.path().join("reducer.url");
    let (pem, key, ca) = (
        m.file(&format!("{cert}.pem")),
        m.file(&format!("{cert}.key")),
        m.file("ca.pem"),
    );
    let mut args = m.client_flags();
    args.extend(
        [
            "--serve-reducer",
            "127.0.0.1:0",
            "--reducer-tls-cert",
            &pem,
            "--reducer-tls-key",
            &key,
            "--reducer-tls-client-ca",
            &ca,
            "--reducer-ready-file",
            &reducer_url.display().to_string(),
        ]
        .map(str::to_string),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Mtls {
        tmp,
        data: d,
        run,
        mut coord,
        https,
        ..
    } = m;
    let t = tmp.path();
    let mut w = worker(t, &https, 0, &d, &args);
    coord.expect_success(Duration::from_secs(60));
    w.expect_success(Duration::from_secs(30));
    assert!(run.join("checkpoint-3.safetensors").exists());
    let advertised = std::fs::read_to_string(&reducer_url).unwrap();
    assert!(advertised.starts_with("https://127.0.0.1:"), "{advertised}");
    assert!(
        coord.log_text().contains("every reducer has its span"),
        "{}",
        coord.log_text()
    );
}

/// A worker that cannot verify a reducer's certificate, while the other worker can, names the
/// reducer and why, tells the coordinator, and gets no work while the other trains on: no
/// round waits for it (with --round-timeout 600s, one that did would stall the test), and it
/// does not loop on the reducer (it tries it again before asking for work, at a pace that
/// doubles).
#[test]
fn a_worker_that_cannot_verify_a_reducer_is_named_and_left_out_while_the_others_train() {
    let m = Mtls::sharded("1");
    let mut red = m.reducer("reducer-0", "reducer");
    let mut bad = m.worker_checking(0, "wrong-name");
    let mut good = m.worker_checking(1, "capsnet-reducer");
    let Mtls { run, mut coord, .. } = m;
    good.expect_success(Duration::from_secs(90));
    coord.expect_success(Duration::from_secs(60));
    red.expect_success(Duration::from_secs(30));
    let c = coord.log_text();
    assert!(
        c.contains("training finished") && run.join("checkpoint-8.safetensors").exists(),
        "{c}"
    );
    // Told that training is over, the worker left out leaves too.
    bad.expect_success(Duration::from_secs(30));
    let log = bad.log_text();
    assert!(
        log.contains("https://127.0.0.1:") && log.contains("not valid for name"),
        "the log does not name the reducer and the reason:\n{log}"
    );
    let failed = log.matches("a reducer failed").count();
    assert!((1..=3).contains(&failed), "{failed} failed tries:\n{log}");
    assert!(!log.contains("lost the coordinator"), "{log}");
    assert!(c.contains("the worker cannot reach a reducer"), "{c}");
    assert!(!c.contains("missed the round deadline"), "{c}");
    assert!(!c.contains("no live worker can reach this reducer"), "{c}");
}

/// Two workers each cut off from a different reducer (each checks a name that only one of the
/// two reducers' certificates has): no round could complete, so once both said so the
/// coordinator drops one of the reducers (the other takes the whole grid), and the worker that
/// reaches it trains the run to its end while the other is left out. No round waits for the
/// deadline (600 s here: one that did would stall the test).
#[test]
fn workers_cut_off_from_different_reducers_make_the_coordinator_drop_one() {
    let m = Mtls::sharded("2");
    let mut reducers = [
        m.reducer("reducer-0", "reducer"),
        m.reducer("reducer-1", "reducer-b"),
    ];
    let mut workers = [
        m.worker_checking(0, "capsnet-reducer"),
        m.worker_checking(1, "capsnet-reducer-b"),
    ];
    let Mtls { mut coord, .. } = m;
    coord.expect_success(Duration::from_secs(90));
    for w in &mut workers {
        w.expect_success(Duration::from_secs(30));
    }
    let c = coord.log_text();
    assert!(c.contains("training finished"), "{c}");
    // Both claims, then the worker left out claims again under the new layout.
    assert!(
        c.matches("the worker cannot reach a reducer").count() >= 2,
        "{c}"
    );
    assert!(
        c.contains("every live worker is cut off from a reducer, the most of them from this one: dropping it"),
        "{c}"
    );
    assert!(!c.contains("missed the round deadline"), "{c}");
    // The dropped reducer may still be joining again when the run ends.
    for r in &mut reducers {
        if r.exited().is_none() {
            r.signal(libc::SIGTERM);
        }
        r.wait(Duration::from_secs(30));
    }
}

/// A server on loopback that answers whatever comes with a TLS alert, as a coordinator serving
/// TLS does to plaintext, and records every byte it was sent until `stop` is set (or 20 s).
fn fake_tls_server() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<Vec<u8>>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let recorder = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut seen = vec![];
        while !stopped.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
            let Ok((mut c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            c.set_nonblocking(false).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                // A TLS 1.2 record: fatal alert, protocol_version.
                let _ = c.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46]);
            }
        }
        seen
    });
    (format!("http://{addr}"), stop, recorder)
}

/// An http:// worker pointed at a server that answers with TLS stops with exit 2 and a message
/// that says to use https://, and the token never leaves it: the server saw the HTTP/2 preface
/// and nothing else. And http:// together with --tls-ca is refused before any connection.
#[test]
fn the_token_never_travels_in_clear_to_a_tls_server() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let d = t.join("data");
    write_synthetic(&d, 16, 8, 28, 10, 1).unwrap();
    let (url, stop, recorder) = fake_tls_server();
    let mut w = worker(t, &url, 0, &d, &["--give-up-after", "5s"]);
    let status = w.wait(Duration::from_secs(30));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = recorder.join().unwrap();
    assert_eq!(status.code(), Some(2), "{}", w.log_text());
    assert!(
        w.log_text().contains("answered with TLS") && w.log_text().contains("use https://"),
        "{}",
        w.log_text()
    );
    assert!(!seen.is_empty(), "the worker sent nothing at all");
    let text = String::from_utf8_lossy(&seen);
    assert!(
        !text.contains(TOKEN),
        "the token went out in clear: {text:?}"
    );
    assert!(
        seen.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        "{text:?}"
    );

    // --tls-ca with an http:// URL: a configuration error, before connecting anywhere.
    std::fs::write(t.join("ca.pem"), "not used").unwrap();
    let ca = t.join("ca.pem").display().to_string();
    let mut w = worker(t, "http://127.0.0.1:9", 1, &d, &["--tls-ca", &ca]);
    let status = w.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", w.log_text());
    assert!(
        w.log_text()
            .contains("is http://, which would not encrypt anything"),
        "{}",
        w.log_text()
    );
}
