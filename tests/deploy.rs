//! The deployment files in `deploy/` are kept working: every Kubernetes container's arguments and
//! environment (config map, secret, downward API values substituted as Kubernetes would), and
//! every systemd unit's `ExecStart` (with the repo's example configs), pass `pairdb
//! --check-config`; probes point at the role's health endpoints on a declared port. The
//! manifests also pass the Kubernetes API schemas (kubernetes-validate) and the units
//! `systemd-analyze verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

use std::collections::BTreeMap;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

fn docs(file: &str) -> Vec<Value> {
    let path = format!("{}/deploy/k8s/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

/// `$(VAR)` references replaced as Kubernetes does.
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = s.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

fn check_config(args: &[String], env: &BTreeMap<String, String>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pairdb"));
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("PAIRDB_")) {
        cmd.env_remove(key);
    }
    let out = cmd
        .args(args)
        .arg("--check-config")
        .envs(env)
        .output()
        .expect("run pairdb");
    assert!(
        out.status.success(),
        "{args:?} with {env:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_containers_pass_check_config() {
    // The pairdb-tls Secret's files, made the way config.yaml says, stand in for the mount.
    let tls = tempfile::tempdir().expect("tempdir");
    let made = Command::new(env!("CARGO_BIN_EXE_pairdb"))
        .args(["cert", "--node=node"])
        .arg(format!("--out-dir={}", tls.path().display()))
        .output()
        .expect("pairdb cert");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mount = format!("{}/", tls.path().display());
    let shared = docs("config.yaml");
    let mut from_refs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for d in &shared {
        let name = d["metadata"]["name"].as_str().expect("name");
        let data = d.get("data").or_else(|| d.get("stringData")).expect("data");
        let kind = d["kind"].as_str().expect("kind").to_owned();
        let map = data
            .as_object()
            .expect("map")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_owned()))
            .collect();
        from_refs.insert(format!("{kind}/{name}"), map);
    }
    let mut checked = 0;
    for file in ["storage.yaml", "coordinator.yaml", "gateway.yaml"] {
        for d in docs(file) {
            if !matches!(d["kind"].as_str(), Some("StatefulSet" | "Deployment")) {
                continue;
            }
            for c in d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .expect("containers")
            {
                let mut env = BTreeMap::new();
                for source in c["envFrom"].as_array().into_iter().flatten() {
                    let key = if let Some(r) = source.get("configMapRef") {
                        format!("ConfigMap/{}", r["name"].as_str().expect("name"))
                    } else {
                        format!(
                            "Secret/{}",
                            source["secretRef"]["name"].as_str().expect("name")
                        )
                    };
                    env.extend(
                        from_refs
                            .get(&key)
                            .unwrap_or_else(|| panic!("{key} not defined"))
                            .clone(),
                    );
                }
                for e in c["env"].as_array().into_iter().flatten() {
                    let name = e["name"].as_str().expect("name").to_owned();
                    let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                        Some("metadata.name") => "pairdb-x-0".to_owned(),
                        Some("status.podIP") => "10.0.0.7".to_owned(),
                        Some(other) => panic!("unexpected fieldRef {other}"),
                        None => e["value"].as_str().expect("value").to_owned(),
                    };
                    env.insert(name, value);
                }
                let args: Vec<String> = c["args"]
                    .as_array()
                    .expect("args")
                    .iter()
                    .map(|a| expand(a.as_str().expect("arg"), &env))
                    .collect();
                let env: BTreeMap<String, String> = env
                    .into_iter()
                    .filter(|(k, _)| k.starts_with("PAIRDB_"))
                    .map(|(k, v)| (k, v.replace("/etc/pairdb/tls/", &mount)))
                    .collect();
                assert!(
                    env.contains_key("PAIRDB_NODE_TLS_CERT_FILE"),
                    "{file}: internal TLS is on in every workload"
                );
                let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
                assert!(
                    mounts.iter().any(|m| m["mountPath"] == "/etc/pairdb/tls"),
                    "{file}: the pairdb-tls Secret is mounted"
                );
                check_config(&args, &env);
                let ports: Vec<&str> = c["ports"]
                    .as_array()
                    .expect("ports")
                    .iter()
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
                {
                    assert_eq!(c[probe]["httpGet"]["path"], path, "{file} {probe}");
                    let port = c[probe]["httpGet"]["port"].as_str().expect("named port");
                    assert!(
                        ports.contains(&port),
                        "{file}: probe port {port} not declared"
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3, "storage, coordinator and gateway containers");
}

#[test]
fn systemd_units_pass_check_config() {
    let dir = format!("{}/deploy/systemd", env!("CARGO_MANIFEST_DIR"));
    let configs = format!("{}/config", env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/systemd") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("unit");
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{}: no ExecStart", path.display()));
        let mut words = exec.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/pairdb"), "{exec}");
        let args: Vec<String> = words
            .map(|w| {
                w.replace("%i", "x1")
                    .replace(
                        "/etc/pairdb/storage-x1.toml",
                        &format!("{configs}/storage.toml"),
                    )
                    .replace(
                        "/etc/pairdb/coordinator-x1.toml",
                        &format!("{configs}/coordinator.toml"),
                    )
                    .replace(
                        "/etc/pairdb/gateway.toml",
                        &format!("{configs}/gateway.toml"),
                    )
            })
            .collect();
        // The configs name /etc/pairdb/cluster-secret; the env points at a real file instead.
        let secret_dir = tempfile::tempdir().expect("tempdir");
        let secret_file = secret_dir.path().join("cluster-secret");
        std::fs::write(&secret_file, "deploy-test-cluster-secret\n").expect("secret file");
        let env = BTreeMap::from([
            ("PAIRDB_GATEWAY_AUTH_SECRET".to_owned(), "x".to_owned()),
            (
                "PAIRDB_NODE_CLUSTER_SECRET_FILE".to_owned(),
                secret_file.display().to_string(),
            ),
        ]);
        check_config(&args, &env);
        checked += 1;
    }
    assert_eq!(checked, 3, "storage, coordinator and gateway units");
}

/// Whether `program args.. --version` answers.
fn available(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// kubernetes-validate, run as a module of the python3 it was installed into (no dependence on
/// where pip put its script).
const KUBERNETES_VALIDATE: [&str; 2] = ["-m", "kubernetes_validate"];

/// Every manifest in deploy/k8s against the Kubernetes API schemas, offline and strict (no
/// unknown field): PyPI's kubernetes-validate, which .ci/run installs. Skipped where it is
/// missing, except under CI.
#[test]
fn kubernetes_manifests_match_the_api_schemas() {
    if !available("python3", &KUBERNETES_VALIDATE) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs kubernetes-validate (.ci/run installs it from PyPI)"
        );
        eprintln!(
            "skipped: kubernetes-validate is not installed (pip install kubernetes-validate)"
        );
        return;
    }
    let dir = format!("{}/deploy/k8s", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let out = Command::new("python3")
        .args(KUBERNETES_VALIDATE)
        .arg("--strict")
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().filter(|l| l.contains(" passed ")).count() >= 12,
        "every resource validated: {text}"
    );
}

/// Every unit in deploy/systemd through `systemd-analyze verify` (where systemd's tools are
/// present), with its ExecStart pointed at the binary under test: an unknown key or a bad
/// value, which systemd only warns about, fails the test.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !available("systemd-analyze", &[]) {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = format!("{}/deploy/systemd", env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut verified = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/systemd") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path)
            .expect("unit")
            .replace("/usr/local/bin/pairdb", env!("CARGO_BIN_EXE_pairdb"));
        let copy = scratch.path().join(path.file_name().expect("file name"));
        std::fs::write(&copy, text).expect("copy of the unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("run systemd-analyze");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{}: {said}",
            path.display()
        );
        verified += 1;
    }
    assert_eq!(verified, 3, "every unit");
}
