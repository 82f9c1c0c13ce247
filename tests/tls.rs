//! TLS (docs/security.md): a cluster whose every internal hop runs over mutual TLS with the
//! certificates `pairdb cert` makes, HTTPS on the gateway, refusals of callers without a
//! certificate of the cluster CA, and the gateway's certificate reloaded on SIGHUP without
//! dropping an open connection. Real processes throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{RoleProcess, start_storage_with_env};
use common::coord::{Client, create_tenant, sqlite_url, wait_all_active};
use pairdb::rpc::auth::internal_channel;
use pairdb::rpc::common as cpb;
use pairdb::rpc::coordinator::coordinator_client::CoordinatorClient;
use pairdb::rpc::storage as spb;
use pairdb::rpc::storage::storage_node_client::StorageNodeClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// `pairdb cert --out-dir dir --node nodes --san 127.0.0.1,localhost`.
fn make_certs(dir: &Path, nodes: &str) {
    let out = common::pairdb_command()
        .args([
            "cert",
            &format!("--out-dir={}", dir.display()),
            &format!("--node={nodes}"),
            "--san=127.0.0.1,localhost",
        ])
        .output()
        .expect("pairdb cert");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pem(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// The env that gives a process the node certificate `name` of `certs`.
fn tls_env(certs: &Path, name: &str) -> Vec<(String, String)> {
    vec![
        (
            "PAIRDB_NODE_TLS_CA_FILE".to_owned(),
            pem(certs, "ca.pem").display().to_string(),
        ),
        (
            "PAIRDB_NODE_TLS_CERT_FILE".to_owned(),
            pem(certs, &format!("{name}.pem")).display().to_string(),
        ),
        (
            "PAIRDB_NODE_TLS_KEY_FILE".to_owned(),
            pem(certs, &format!("{name}.key")).display().to_string(),
        ),
    ]
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A TLS endpoint to `addr` trusting `ca_dir`'s CA, presenting `identity` (a name in
/// `identity_dir`) when given.
fn tls_endpoint(addr: SocketAddr, ca_dir: &Path, identity: Option<(&Path, &str)>) -> Endpoint {
    let ca = std::fs::read(pem(ca_dir, "ca.pem")).expect("ca");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(pairdb::rpc::tls::INTERNAL_NAME);
    if let Some((dir, name)) = identity {
        let cert = std::fs::read(pem(dir, &format!("{name}.pem"))).expect("cert");
        let key = std::fs::read(pem(dir, &format!("{name}.key"))).expect("key");
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
}

fn curl(args: &[&str]) -> std::process::Output {
    std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl")
}

/// Storage nodes, a coordinator and a gateway with mutual TLS on every internal hop and HTTPS
/// in front: a write at ALL reaches all three replicas and reads back over HTTPS; a storage
/// range streams to another node; callers in plain text, without a client certificate, or
/// with a certificate of another CA are refused and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    let rogue = dir.path().join("rogue");
    make_certs(&certs, "storage,c1,gw");
    make_certs(&rogue, "rogue");

    let storage = start_storage_with_env(3, dir.path(), &as_refs(&tls_env(&certs, "storage")));
    let c1 = RoleProcess::coordinator(
        "c1",
        &sqlite_url(dir.path()),
        "memory://",
        &storage,
        &as_refs(&tls_env(&certs, "c1")),
        dir.path(),
    );
    let https_cert = format!("--https-cert-file={}", pem(&certs, "gw.pem").display());
    let https_key = format!("--https-key-file={}", pem(&certs, "gw.key").display());
    let gw = RoleProcess::gateway(
        "gw",
        &[&c1],
        &["--auth=none", &https_cert, &https_key],
        &as_refs(&tls_env(&certs, "gw")),
        dir.path(),
    );

    let channel = tls_endpoint(c1.grpc, &certs, Some((&certs, "gw")))
        .connect()
        .await
        .expect("TLS to the coordinator");
    let mut c: Client = CoordinatorClient::new(common::authenticated(channel));
    wait_all_active(&c, 3).await;
    create_tenant(&mut c, "acme", 3).await;

    // HTTPS through the gateway: a write at ALL needs all three replicas, over mTLS.
    let ca = pem(&certs, "ca.pem").display().to_string();
    let base = format!("https://127.0.0.1:{}", gw.grpc.port());
    let put = curl(&[
        "--cacert",
        &ca,
        "-X",
        "POST",
        &format!("{base}/v1/key-value"),
        "-H",
        "Content-Type: application/json",
        "-H",
        "X-Tenant-ID: acme",
        "-d",
        r#"{"key":"k","value":"over tls","consistency":"all"}"#,
        "-w",
        "\n%{http_code}",
    ]);
    let body = String::from_utf8_lossy(&put.stdout).into_owned();
    assert!(
        body.ends_with("\n200") && body.contains(r#""replica_count":3"#),
        "{body} {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let got = curl(&[
        "--cacert",
        &ca,
        &format!("{base}/v1/key-value?key=k&consistency=all"),
        "-H",
        "X-Tenant-ID: acme",
    ]);
    assert!(
        String::from_utf8_lossy(&got.stdout).contains("over tls"),
        "{}",
        String::from_utf8_lossy(&got.stdout)
    );
    // The CLI over HTTPS, trusting the cluster CA with --cacert (and refusing without it).
    let kv = |extra: &[&str]| {
        common::pairdb_command()
            .args(["kv", "--url", &base, "--tenant", "acme"])
            .args(extra)
            .output()
            .expect("pairdb kv")
    };
    let put = kv(&["--cacert", &ca, "put", "cli", "via https"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let got = kv(&["--cacert", &ca, "get", "cli"]);
    assert!(
        String::from_utf8_lossy(&got.stdout).contains("via https"),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let untrusted = kv(&["get", "cli"]);
    assert!(
        !untrusted.status.success(),
        "a gateway certificate of an unknown CA was trusted"
    );

    // Plain HTTP to the HTTPS port gets no answer.
    let plain = curl(&[&format!("http://127.0.0.1:{}/healthz", gw.grpc.port())]);
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("ok"));

    // Storage to storage: s1 streams the whole ring to s2 over mTLS.
    let good = |addr| {
        let endpoint = tls_endpoint(addr, &certs, Some((&certs, "c1")));
        async move {
            StorageNodeClient::new(common::authenticated(
                endpoint.connect().await.expect("connect"),
            ))
        }
    };
    let mut s1 = good(storage[0].grpc).await;
    s1.start_streaming(spb::StartStreamingRequest {
        stream_id: "tls-stream".into(),
        target_node_id: storage[1].id.clone(),
        target_address: storage[1].grpc.to_string(),
        ranges: vec![cpb::HashRange { start: 0, end: 0 }],
        resume: None,
        dropped_tenants: Vec::new(),
        ring_digest: 0,
        ring_epoch: 0,
    })
    .await
    .expect("start streaming");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = s1
            .get_stream_status(spb::StreamStatusRequest {
                stream_id: "tls-stream".into(),
            })
            .await
            .expect("status")
            .into_inner();
        if status.state == spb::StreamState::Completed as i32 {
            assert!(status.keys_copied >= 1, "{status:?}");
            break;
        }
        assert_ne!(status.state, spb::StreamState::Failed as i32, "{status:?}");
        assert!(
            Instant::now() < deadline,
            "stream did not complete: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Refused: plain text (with the secret), TLS without a client certificate, and a
    // certificate of another CA. None of them writes.
    let attack = spb::WriteRequest {
        record: Some(spb::Record {
            tenant_id: "acme".into(),
            key: b"attack".to_vec().into(),
            version: Some(cpb::Version {
                clock: vec![cpb::ClockEntry {
                    coordinator_id: "evil".into(),
                    counter: 1,
                }],
                timestamp_ms: 0,
            }),
            payload: Some(spb::record::Payload::Value(b"\"x\"".to_vec().into())),
            ring_hash: 0,
            expires_at_ms: 0,
        }),
    };
    let target = storage[0].grpc;
    let plain = Endpoint::from_shared(format!("http://{target}"))
        .expect("uri")
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let no_cert = tls_endpoint(target, &certs, None).connect_lazy();
    let other_ca_client = {
        // Trusts the cluster CA (to get as far as possible) but presents the rogue identity.
        let ca = std::fs::read(pem(&certs, "ca.pem")).expect("ca");
        let cert = std::fs::read(pem(&rogue, "rogue.pem")).expect("cert");
        let key = std::fs::read(pem(&rogue, "rogue.key")).expect("key");
        Endpoint::from_shared(format!("https://{target}"))
            .expect("uri")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(cert, key))
                    .domain_name(pairdb::rpc::tls::INTERNAL_NAME),
            )
            .expect("tls")
            .timeout(Duration::from_secs(5))
            .connect_lazy()
    };
    for (what, channel) in [
        ("plain text", plain),
        ("no client certificate", no_cert),
        ("another CA's certificate", other_ca_client),
    ] {
        let mut client =
            StorageNodeClient::new(internal_channel(channel, &common::cluster_secret()));
        let refused = client.write(attack.clone()).await;
        assert!(refused.is_err(), "{what}: the write went through");
    }
    let read = s1
        .read(spb::ReadRequest {
            tenant_id: "acme".into(),
            key: b"attack".to_vec().into(),
        })
        .await
        .expect("read")
        .into_inner();
    assert_eq!(read.record, None, "a refused write changed nothing");
    drop(gw);
    drop(c1);
}

/// A TLS client session of the gateway trusting `ca_dir`'s CA.
async fn tls_connect(
    addr: SocketAddr,
    ca_dir: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pem(ca_dir, "ca.pem"))?;
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        let cert: rustls::pki_types::CertificateDer<'static> = cert.expect("pem");
        roots.add(cert).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
        .expect("name")
        .to_owned();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// One `GET /healthz` on an open HTTP/1.1 connection; the status line.
async fn healthz<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> String {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .expect("send");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// SIGHUP makes the gateway present the certificate now in its files to new connections,
/// while a connection opened before keeps working; a reload from broken files keeps the
/// certificate in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_certificate_reloads_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new, live) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("live"),
    );
    make_certs(&old, "gw");
    make_certs(&new, "gw");
    std::fs::create_dir_all(&live).expect("mkdir");
    let install = |from: &Path| {
        for file in ["gw.pem", "gw.key"] {
            std::fs::copy(from.join(file), live.join(file)).expect("copy");
        }
    };
    install(&old);
    let https_cert = format!("--https-cert-file={}", live.join("gw.pem").display());
    let https_key = format!("--https-key-file={}", live.join("gw.key").display());
    // No coordinator is needed to serve /healthz.
    let nobody = SocketAddr::from(([127, 0, 0, 1], common::free_tcp_port()));
    let listen = SocketAddr::from(([127, 0, 0, 1], common::free_tcp_port()));
    let args = [
        "--role=gateway".to_owned(),
        format!("--listen={listen}"),
        format!("--coordinators={nobody}"),
        "--auth=none".to_owned(),
        https_cert,
        https_key,
    ];
    let log = std::fs::File::create(dir.path().join("gw.log")).expect("log");
    let mut gw = common::pairdb_command()
        .args(&args)
        .stderr(log)
        .spawn()
        .expect("gateway");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut kept = loop {
        match tls_connect(listen, &old).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "gateway not up: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(healthz(&mut kept).await.contains("200"));

    install(&new);
    let pid = nix::unistd::Pid::from_raw(gw.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    // New connections get the new certificate (one the old CA did not sign).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = tls_connect(listen, &new).await {
            assert!(healthz(&mut s).await.contains("200"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tls_connect(listen, &old).await.is_err(),
        "the old certificate is still served"
    );
    // The connection opened before the reload still answers.
    assert!(healthz(&mut kept).await.contains("200"));

    // Broken files: the reload fails and the certificate in use stays.
    std::fs::write(live.join("gw.key"), "not a key").expect("break");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut after = tls_connect(listen, &new)
        .await
        .expect("still the new certificate");
    assert!(healthz(&mut after).await.contains("200"));
    assert_eq!(common::terminate(&mut gw).code(), Some(0));
    let log = std::fs::read_to_string(dir.path().join("gw.log")).expect("log");
    assert!(log.contains("not reloaded"), "{log}");
}
