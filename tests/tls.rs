//! TLS and mutual TLS between coordinator and workers (rustls), with certificates made by the
//! openssl command line for the test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails on its first panic

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use capsnet_core::data::write_synthetic;
use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect(
        "the openssl command is needed for this test (scripts/setup installs it: apt-get install openssl)",
    );
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=capsnet test CA",
    ]);
    openssl(dir, &ca);
    for (name, cn, usage) in [
        (
            "server",
            "localhost",
            "serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1",
        ),
        ("client", "worker", "clientAuth"),
    ] {
        let mut req = vec!["req"];
        req.extend(ec);
        let (key, csr, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("/CN={cn}"),
        );
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
            ),
        )
        .unwrap();
        let pem = format!("{name}.pem");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

#[test]
fn mutual_tls_trains_and_refuses_clients_without_a_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    certificates(t);
    let d = t.join("data");
    write_synthetic(&d, 32, 8, 28, 10, 1).unwrap();
    let run = t.join("run");
    let p = |f: &str| t.join(f).display().to_string();
    let (mut coord, url) = tiny_coordinator(
        t,
        "coordinator",
        &d,
        &run,
        &[
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--expect-workers",
            "1",
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
            "--tls-client-ca",
            &p("ca.pem"),
        ],
    );
    let https = url.replace("http://", "https://");

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
    let mut plain = worker(t, &url, 6, &d, &["--give-up-after", "2s"]);
    plain.expect_failure(Duration::from_secs(30));
    assert!(
        plain.log_text().contains("cannot reach the coordinator"),
        "{}",
        plain.log_text()
    );

    let mut w = worker(
        t,
        &https,
        0,
        &d,
        &[
            "--tls-ca",
            &p("ca.pem"),
            "--tls-domain",
            "localhost",
            "--tls-cert",
            &p("client.pem"),
            "--tls-key",
            &p("client.key"),
        ],
    );
    coord.expect_success(Duration::from_secs(60));
    w.expect_success(Duration::from_secs(30));
    assert!(run.join("checkpoint-3.safetensors").exists());
}
