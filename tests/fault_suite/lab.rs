//! The network the suite's cluster lives in: one network namespace per process plus a hub
//! namespace holding a bridge, all created by the suite and removed by it (on drop, and at the
//! next start for a run that was killed). Every address is inside these namespaces
//! (10.77.0.0/24); nothing touches the host's own network.
//!
//! Faults on the wire are nftables rules in the hub's bridge (`drop` between two addresses, one
//! way or both; random loss with `numgen`), and latency with `tc netem` where the kernel has it.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

const NS_PREFIX: &str = "pdbf";
const TABLE: &str = "pdbfaults";
const CHAIN: &str = "forward_rules";

/// The hub's own address (PostgreSQL and Redis listen there, and the suite's clients come
/// from there).
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// Runs a command; its stderr on failure.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub struct Lab {
    hub: String,
    /// (namespace, hub-side interface, address) per process.
    nodes: Vec<(String, String, Ipv4Addr)>,
}

impl Lab {
    /// A hub and one namespace per name, connected through the hub's bridge.
    pub fn create(count: usize) -> Result<Lab, String> {
        remove_stale();
        let pid = std::process::id();
        let hub = format!("{NS_PREFIX}{pid}h");
        let mut lab = Lab {
            hub: hub.clone(),
            nodes: Vec::new(),
        };
        run("ip", &["netns", "add", &hub])?;
        let h = hub.as_str();
        run("ip", &["-n", h, "link", "set", "lo", "up"])?;
        run("ip", &["-n", h, "link", "add", "br0", "type", "bridge"])?;
        run(
            "ip",
            &["-n", h, "addr", "add", "10.77.0.1/24", "dev", "br0"],
        )?;
        run("ip", &["-n", h, "link", "set", "br0", "up"])?;
        lab.nft(&format!(
            "add table bridge {TABLE}\nadd chain bridge {TABLE} {CHAIN} {{ type filter hook forward priority 0; policy accept; }}"
        ))?;
        for i in 0..count {
            let ns = format!("{NS_PREFIX}{pid}n{i}");
            let peer = format!("p{i}");
            let ip = Ipv4Addr::new(10, 77, 0, 10 + i as u8);
            run("ip", &["netns", "add", &ns])?;
            lab.nodes.push((ns.clone(), peer.clone(), ip));
            let cidr = format!("{ip}/24");
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer,
                    "netns", h,
                ],
            )?;
            run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &["-n", h, "link", "set", &peer, "master", "br0", "up"],
            )?;
        }
        Ok(lab)
    }

    pub fn namespace(&self, i: usize) -> &str {
        &self.nodes[i].0
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.nodes[i].2
    }

    /// Moves the calling thread into the hub namespace; threads it spawns later inherit it.
    pub fn enter_hub(&self) -> Result<(), String> {
        let path = format!("/var/run/netns/{}", self.hub);
        let file = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {path}: {e}"))
    }

    fn nft(&self, script: &str) -> Result<(), String> {
        let path = std::env::temp_dir().join(format!("{}-nft-{}", self.hub, std::process::id()));
        std::fs::write(&path, script).map_err(|e| e.to_string())?;
        let path_s = path.to_string_lossy().into_owned();
        let result = run("ip", &["netns", "exec", &self.hub, "nft", "-f", &path_s]);
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Drops every packet from `from` to `to` (one way).
    pub fn block(&self, from: Ipv4Addr, to: Ipv4Addr) -> Result<(), String> {
        self.nft(&format!(
            "add rule bridge {TABLE} {CHAIN} ip saddr {from} ip daddr {to} drop"
        ))
    }

    /// Drops `percent` of the packets to and from `node`, at random.
    pub fn lose(&self, node: Ipv4Addr, percent: u32) -> Result<(), String> {
        self.nft(&format!(
            "add rule bridge {TABLE} {CHAIN} ip daddr {node} numgen random mod 100 < {percent} drop\n\
             add rule bridge {TABLE} {CHAIN} ip saddr {node} numgen random mod 100 < {percent} drop"
        ))
    }

    /// Whether `tc netem` works here (the kernel may be built without it).
    pub fn netem_available(&self) -> bool {
        let Some((_, peer, _)) = self.nodes.first() else {
            return false;
        };
        let ok = self.netem(peer, Some(1)).is_ok();
        let _ = self.netem(peer, None);
        ok
    }

    fn netem(&self, peer: &str, delay_ms: Option<u32>) -> Result<(), String> {
        let h = self.hub.as_str();
        match delay_ms {
            Some(ms) => {
                let delay = format!("{ms}ms");
                let jitter = format!("{}ms", ms / 4);
                run(
                    "ip",
                    &[
                        "netns", "exec", h, "tc", "qdisc", "replace", "dev", peer, "root", "netem",
                        "delay", &delay, &jitter,
                    ],
                )
            }
            None => run(
                "ip",
                &[
                    "netns", "exec", h, "tc", "qdisc", "del", "dev", peer, "root",
                ],
            ),
        }
    }

    /// Delays packets into process `i` by about `ms` (netem; see [`Lab::netem_available`]).
    pub fn delay(&self, i: usize, ms: u32) -> Result<(), String> {
        self.netem(&self.nodes[i].1, Some(ms))
    }

    /// Removes every rule and delay: the network is whole again.
    pub fn heal(&self) -> Result<(), String> {
        self.nft(&format!("flush chain bridge {TABLE} {CHAIN}"))?;
        for (_, peer, _) in &self.nodes {
            let _ = self.netem(peer, None);
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (ns, _, _) in &self.nodes {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = run("ip", &["netns", "del", &self.hub]);
    }
}

/// Deletes namespaces left by a suite run that was killed (its process is gone).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let alive = pid
            .parse::<i32>()
            .ok()
            .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}
