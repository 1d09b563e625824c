//! Certificates for TLS tests, made by the openssl command line.

use std::path::Path;
use std::process::Command;

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

/// In `dir`: a CA (`ca.pem`, `ca.key`), a server certificate for localhost, 127.0.0.1 and
/// capsnet-coordinator (the name of the coordinator's Service in deploy/k8s), a client
/// certificate, one for reducers that names only capsnet-reducer and one (`reducer-b`) that
/// names only capsnet-reducer-b; `NAME.pem`/`NAME.key`.
pub fn certificates(dir: &Path) {
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
            "serverAuth\nsubjectAltName=DNS:localhost,DNS:capsnet-coordinator,IP:127.0.0.1",
        ),
        ("client", "worker", "clientAuth"),
        // One certificate for every reducer of a fleet, naming no address; a reducer also
        // presents it to the coordinator as its client certificate.
        (
            "reducer",
            "capsnet-reducer",
            "serverAuth,clientAuth\nsubjectAltName=DNS:capsnet-reducer",
        ),
        // A reducer of another name: a worker that checks one name cannot verify it.
        (
            "reducer-b",
            "capsnet-reducer-b",
            "serverAuth,clientAuth\nsubjectAltName=DNS:capsnet-reducer-b",
        ),
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
