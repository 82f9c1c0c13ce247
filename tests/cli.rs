//! The `pairdb` binary's command line and configuration, tested by running it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::io::Write;
use std::process::{Command, Output};

fn pairdb(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pairdb"));
    cmd.args(args);
    // Only the variables a test sets: the machine's own PAIRDB_* must not leak in.
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PAIRDB_")) {
        cmd.env_remove(key);
    }
    // Every role needs the cluster secret; a test that is about it sets its own.
    cmd.env("PAIRDB_NODE_CLUSTER_SECRET", "cli-tests-cluster-secret");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pairdb")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The effective value of `key` in section `section` as printed by --print-config.
fn effective(args: &[&str], env: &[(&str, &str)], section: &str, key: &str) -> String {
    let out = pairdb(&[args, &["--print-config"]].concat(), env);
    assert!(
        out.status.success(),
        "print-config failed: {}",
        stderr(&out)
    );
    let doc: toml::Table = stdout(&out).parse().expect("printed config is TOML");
    doc[section][key].to_string()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write config");
    f
}

#[test]
fn help_documents_roles_and_options() {
    let out = pairdb(&["--help"], &[]);
    assert!(out.status.success());
    let help = stdout(&out);
    for needle in [
        "--role",
        "gateway",
        "coordinator",
        "storage",
        "--node-id",
        "--listen",
        "--data-dir",
        "--metadata-url",
        "--idempotency-url",
        "--storage-nodes",
        "--coordinators",
        "--auth",
        "--write-rate-limit",
        "--read-rate-limit",
        "--seeds",
        "--sync",
        "--config",
        "PAIRDB_",
        "flag > env > file > default",
        "dev",
    ] {
        assert!(help.contains(needle), "--help does not mention {needle}");
    }
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let file = config_file("[storage]\ndata_dir = \"/from-file\"\n");
    let path = file.path().to_str().expect("utf-8 path");
    let base = ["--role=storage", "--node-id=s1"];
    assert_eq!(
        effective(&base, &[], "storage", "data_dir"),
        "\"data/storage\""
    );
    let with_file = [&base[..], &["--config", path]].concat();
    assert_eq!(
        effective(&with_file, &[], "storage", "data_dir"),
        "\"/from-file\""
    );
    let env = [("PAIRDB_STORAGE_DATA_DIR", "/from-env")];
    assert_eq!(
        effective(&with_file, &env, "storage", "data_dir"),
        "\"/from-env\""
    );
    let with_flag = [&with_file[..], &["--data-dir=/from-flag"]].concat();
    assert_eq!(
        effective(&with_flag, &env, "storage", "data_dir"),
        "\"/from-flag\""
    );
}

#[test]
fn env_vars_set_nested_sections_and_lists() {
    let env = [
        ("PAIRDB_NODE_ROLES", "coordinator,gateway"),
        ("PAIRDB_GATEWAY_AUTH_MODE", "none"),
        (
            "PAIRDB_GATEWAY_COORDINATORS",
            "127.0.0.1:7201,127.0.0.1:7202",
        ),
        ("PAIRDB_TOKEN", "ignored: not a config section"),
    ];
    assert_eq!(
        effective(&[], &env, "node", "roles"),
        "[\"coordinator\", \"gateway\"]"
    );
    assert_eq!(
        effective(&[], &env, "gateway", "coordinators"),
        "[\"127.0.0.1:7201\", \"127.0.0.1:7202\"]"
    );
    let out = pairdb(&["--print-config"], &env);
    let doc: toml::Table = stdout(&out).parse().expect("toml");
    assert_eq!(doc["gateway"]["auth"]["mode"].as_str(), Some("none"));
}

#[test]
fn listen_goes_to_the_single_role() {
    let args = [
        "--role=coordinator",
        "--node-id=c1",
        "--listen=127.0.0.1:9999",
    ];
    assert_eq!(
        effective(&args, &[], "coordinator", "listen"),
        "\"127.0.0.1:9999\""
    );
    assert_eq!(
        effective(&args, &[], "storage", "listen"),
        "\"127.0.0.1:7101\""
    );
}

/// Arguments, env vars, and the text the one-line error must contain.
type BadCase<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn bad_configuration_is_one_line_and_exit_2() {
    let unknown_key = config_file("[storage]\ndata_dri = \"/x\"\n");
    let bad_sync = config_file("[storage]\nsync = \"sometimes\"\n");
    let cases: Vec<BadCase> = vec![
        (vec![], vec![], "no role given"),
        (vec!["--role=storage"], vec![], "--node-id is required"),
        (
            vec!["--role=storage", "--node-id=bad id!"],
            vec![],
            "node id",
        ),
        (vec!["--role=gateway"], vec![], "needs a secret"),
        (
            vec!["--role=storage", "--node-id=s1", "--join"],
            vec![],
            "--join needs --join-coordinators",
        ),
        (
            vec![
                "--role=storage",
                "--node-id=s1",
                "--join",
                "--join-coordinators=c:7201",
                "--listen=0.0.0.0:7101",
            ],
            vec![],
            "--advertise must say",
        ),
        (
            vec!["--role=storage", "--node-id=s1"],
            vec![("PAIRDB_NODE_CLUSTER_SECRET", "")],
            "need a cluster secret",
        ),
        (
            vec!["--role=gateway", "--auth=none"],
            vec![("PAIRDB_NODE_CLUSTER_SECRET", "short")],
            "at least 16 characters",
        ),
        (
            vec![
                "--role=storage",
                "--node-id=s1",
                "--cluster-secret-file=/nonexistent/secret",
            ],
            vec![("PAIRDB_NODE_CLUSTER_SECRET", "")],
            "cannot read the cluster secret file",
        ),
        (
            vec!["--role=storage", "--node-id=s1", "--tls-ca-file=/x/ca.pem"],
            vec![],
            "needs all three",
        ),
        (
            vec![
                "--role=storage",
                "--node-id=s1",
                "--tls-ca-file=/nonexistent/ca.pem",
                "--tls-cert-file=/nonexistent/s1.pem",
                "--tls-key-file=/nonexistent/s1.key",
            ],
            vec![],
            "cannot read the cluster CA file /nonexistent/ca.pem",
        ),
        (
            vec![
                "--role=gateway",
                "--auth=none",
                "--https-cert-file=/x/gw.pem",
            ],
            vec![],
            "needs both https_cert_file and https_key_file",
        ),
        (
            vec![
                "--role=coordinator",
                "--node-id=c1",
                "--metadata-url=mysql://x",
            ],
            vec![],
            "--metadata-url",
        ),
        (
            vec![
                "--role=coordinator,gateway",
                "--node-id=c1",
                "--listen=127.0.0.1:1",
            ],
            vec![],
            "ambiguous",
        ),
        (
            vec![
                "--role=storage",
                "--node-id=s1",
                "--config",
                unknown_key.path().to_str().expect("path"),
            ],
            vec![],
            "data_dri",
        ),
        (
            vec![
                "--role=storage",
                "--node-id=s1",
                "--config",
                bad_sync.path().to_str().expect("path"),
            ],
            vec![],
            "sync must be",
        ),
        (
            vec!["--role=storage", "--node-id=s1"],
            vec![("PAIRDB_STORAGE_SYNC", "sometimes")],
            "sync must be",
        ),
        (
            vec![
                "--role=storage",
                "--node-id=s1",
                "--config",
                "/nonexistent/pairdb.toml",
            ],
            vec![],
            "no such file",
        ),
    ];
    for (args, env, expected) in cases {
        let out = pairdb(&args, &env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in {err:?}"
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err:?}"
        );
    }
    let out = pairdb(&["--role=nonsense"], &[]);
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("config/ exists") {
        let path = entry.expect("entry").path();
        let out = pairdb(
            &["--config", path.to_str().expect("utf-8"), "--check-config"],
            &[("PAIRDB_GATEWAY_AUTH_SECRET", "example-secret")],
        );
        assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
        seen += 1;
    }
    assert!(seen >= 3);
}

#[test]
fn coordinator_refuses_to_start_without_its_metadata_store() {
    let out = pairdb(
        &[
            "--role=coordinator",
            "--node-id=c1",
            "--listen=127.0.0.1:0",
            "--metadata-url=postgres://pairdb:secret@127.0.0.1:1/pairdb",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("metadata store"), "{err}");
    assert!(!err.contains("secret"), "password leaked: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn token_issue_mints_a_token_for_the_configured_secret() {
    let out = pairdb(
        &["token", "issue", "--tenant=acme", "--admin", "--ttl=2h"],
        &[("PAIRDB_GATEWAY_AUTH_SECRET", "s3cret")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token = String::from_utf8(out.stdout).expect("utf-8");
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
        &validation,
    )
    .expect("valid with the configured secret")
    .claims;
    assert_eq!(claims["sub"], "acme");
    assert_eq!(claims["role"], "admin");

    // The secret may also live in a file the config names (a mounted Kubernetes Secret).
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_path = dir.path().join("jwt-secret");
    std::fs::write(&secret_path, "from-a-file\n").expect("write secret");
    let config = config_file(&format!(
        "[gateway.auth]\nmode = \"token\"\nsecret_file = {:?}\n",
        secret_path.display().to_string()
    ));
    let path = config.path().display().to_string();
    let out = pairdb(
        &[
            &format!("--config={path}"),
            "token",
            "issue",
            "--tenant=acme",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token = String::from_utf8(out.stdout).expect("utf-8");
    jsonwebtoken::decode::<serde_json::Value>(
        token.trim(),
        &jsonwebtoken::DecodingKey::from_secret(b"from-a-file"),
        &validation,
    )
    .expect("valid with the file's secret");

    let out = pairdb(&["token", "issue", "--tenant=acme"], &[]);
    assert_eq!(out.status.code(), Some(2), "no secret configured");
    assert!(stderr(&out).contains("secret"));
}

#[test]
fn ring_simulate_measures_balance_and_moves() {
    let out = pairdb(
        &[
            "ring", "simulate", "--nodes", "12", "--rf", "1,3", "--add", "2", "--remove", "1",
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let steps: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let steps = steps.as_array().expect("steps");
    assert_eq!(steps.len(), 4, "grown, 2 additions, 1 removal");
    assert_eq!(steps[0]["nodes"], 12);
    assert_eq!(
        steps[0]["ranges"],
        12 * 16,
        "16 balanced tokens per node by default"
    );
    assert_eq!(steps[2]["nodes"], 14);
    assert_eq!(steps[3]["nodes"], 13);
    for step in &steps[1..] {
        for b in step["balance"].as_array().expect("per rf") {
            let moved = b["moved_fraction"].as_f64().expect("moved");
            assert!(moved > 0.0 && moved < 0.5, "{step}");
        }
    }
    let rf3 = &steps[0]["balance"][1];
    assert_eq!(rf3["rf"], 3);
    assert!(rf3["max_over_mean"].as_f64().expect("max") >= 1.0);

    let table = pairdb(
        &["ring", "simulate", "--nodes", "5", "--tokens", "random"],
        &[],
    );
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(
        text.contains("random tokens, 150 per node") && text.contains("max/mean"),
        "{text}"
    );
    for (args, flag) in [
        (&["--rf", "0"][..], "--rf"),
        (&["--rf", "11"][..], "--rf"),
        (&["--vnodes", "4097"][..], "--vnodes"),
        (&["--nodes", "10000", "--add", "1"][..], "--nodes"),
    ] {
        let bad = pairdb(&[&["ring", "simulate"][..], args].concat(), &[]);
        assert!(!bad.status.success(), "{args:?}");
        assert!(stderr(&bad).contains(flag), "{args:?}: {}", stderr(&bad));
    }
}
