//! The nemesis: injects faults on a schedule drawn from the run's seed, one or two at a time,
//! each for a few seconds, then heals everything and pauses before the next. Every fault is
//! recorded with its start and end.

use std::time::{Duration, Instant};

use crate::admin;
use crate::cluster::{COORDINATORS, Cluster, Role};
use crate::history::FaultEvent;
use crate::lab::HUB_IP;
use crate::workload::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL, restarted when healed.
    Kill,
    /// SIGSTOP, SIGCONT when healed.
    Pause,
    /// No packets to or from one process.
    Isolate,
    /// The processes split in two groups that cannot reach each other.
    Split,
    /// A can reach B, B cannot reach A.
    OneWay,
    /// 20% of the packets to and from one process are dropped.
    Loss,
    /// ~150 ms more on every packet into one process (`tc netem`).
    Latency,
    /// One coordinator's wall clock moves 5-45 s ahead or behind.
    ClockSkew,
    /// The small-disk storage node's filesystem fills up.
    DiskFull,
    /// A spare node joins the ring, or leaves it (one change at a time); half of the time a
    /// coordinator is killed 0.2-1.5 s into the change, in the middle of its streaming.
    Topology,
    /// [`RF_TENANT`]'s replication factor moves between 3 and 2 (one change at a time); half
    /// of the time a coordinator is killed 0.2-1.5 s into the change, in the middle of its copy.
    RfChange,
}

/// The tenant whose replication factor the nemesis changes (the other keeps RF 3).
pub const RF_TENANT: &str = "globex";

impl FaultKind {
    pub const ALL: [FaultKind; 11] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Isolate,
        FaultKind::Split,
        FaultKind::OneWay,
        FaultKind::Loss,
        FaultKind::Latency,
        FaultKind::ClockSkew,
        FaultKind::DiskFull,
        FaultKind::Topology,
        FaultKind::RfChange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::Split => "split",
            FaultKind::OneWay => "one-way",
            FaultKind::Loss => "loss",
            FaultKind::Latency => "latency",
            FaultKind::ClockSkew => "clock-skew",
            FaultKind::DiskFull => "disk-full",
            FaultKind::Topology => "topology",
            FaultKind::RfChange => "rf-change",
        }
    }
}

/// Which fault kinds this machine can inject, and why the others cannot be.
pub fn available(cluster: &Cluster) -> (Vec<FaultKind>, Vec<(FaultKind, String)>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for kind in FaultKind::ALL {
        match kind {
            FaultKind::Latency if !cluster.lab.netem_available() => refused.push((
                kind,
                "tc netem refused: the kernel has no sch_netem (CONFIG_NET_SCH_NETEM)".to_owned(),
            )),
            FaultKind::ClockSkew if !cluster.can_skew() => refused.push((
                kind,
                "libfaketime is not installed (apt-get install faketime)".to_owned(),
            )),
            FaultKind::DiskFull if cluster.small_disk_refused.is_some() => refused.push((
                kind,
                format!(
                    "mounting a small filesystem failed: {}",
                    cluster.small_disk_refused.as_deref().unwrap_or_default()
                ),
            )),
            _ => ok.push(kind),
        }
    }
    (ok, refused)
}

pub struct Nemesis {
    kinds: Vec<FaultKind>,
    rng: Rng,
    pub events: Vec<FaultEvent>,
    start: Instant,
    /// For the admin calls of topology changes.
    runtime: tokio::runtime::Handle,
    gateways: Vec<String>,
    /// The joiner's newest topology change: the last one started here, or a newer one the
    /// registry shows (a call whose answer was lost).
    pub migration: Option<String>,
    /// [`RF_TENANT`]'s newest replication-factor change, learned the same way.
    pub rf_migration: Option<String>,
}

impl Nemesis {
    pub fn new(
        kinds: Vec<FaultKind>,
        seed: u64,
        start: Instant,
        runtime: tokio::runtime::Handle,
        gateways: Vec<String>,
    ) -> Nemesis {
        Nemesis {
            kinds,
            rng: Rng::new(seed ^ 0x6E656D65),
            events: Vec::new(),
            start,
            runtime,
            gateways,
            migration: None,
            rf_migration: None,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Injects faults until `deadline`, healing each round; returns with every fault healed.
    pub fn run(&mut self, cluster: &mut Cluster, deadline: Instant) -> Result<(), String> {
        // Let the workload warm up before the first fault.
        std::thread::sleep(Duration::from_secs(2));
        while Instant::now() + Duration::from_secs(4) < deadline && !self.kinds.is_empty() {
            let count = if self.rng.chance(30) { 2 } else { 1 };
            let mut injected = Vec::new();
            for _ in 0..count {
                let kind = self.kinds[self.rng.below(self.kinds.len() as u64) as usize];
                let target = self.inject(cluster, kind)?;
                injected.push(FaultEvent {
                    kind: kind.name().to_owned(),
                    target,
                    start_ms: self.now_ms(),
                    end_ms: 0,
                });
            }
            let hold = Duration::from_millis(2_000 + self.rng.below(5_000));
            let until = (Instant::now() + hold).min(deadline);
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            cluster.heal_all()?;
            let end = self.now_ms();
            for mut e in injected {
                e.end_ms = end;
                self.events.push(e);
            }
            std::thread::sleep(Duration::from_millis(1_000 + self.rng.below(2_000)));
        }
        cluster.heal_all()?;
        self.settle_joiner_after_healing(cluster)
    }

    /// Learns from the registry whether the joiner is in the ring and its newest change: an
    /// admin call cut after it was sent may have been applied although no answer came back.
    fn settle_joiner(&mut self, cluster: &mut Cluster, gateway: &str) -> Result<(), String> {
        let (member, newest) = self
            .runtime
            .block_on(admin::node_in_registry(gateway, cluster.joiner_id()))?;
        cluster.joiner_member = member;
        if newest.is_some() {
            self.migration = newest;
        }
        if self.kinds.contains(&FaultKind::RfChange) {
            let newest = self
                .runtime
                .block_on(admin::newest_rf_change(gateway, RF_TENANT))?;
            if newest.is_some() {
                self.rf_migration = newest;
            }
        }
        Ok(())
    }

    /// [`Self::settle_joiner`] once every fault is healed, retried while the cluster recovers
    /// (a restarted coordinator, a gateway reconnecting).
    fn settle_joiner_after_healing(&mut self, cluster: &mut Cluster) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let gateway = self.gateways[0].clone();
            match self.settle_joiner(cluster, &gateway) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the joiner's registry entry after healing: {e}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    fn pick(&mut self, of: &[usize]) -> usize {
        of[self.rng.below(of.len() as u64) as usize]
    }

    /// Injects one fault; returns what it hit.
    fn inject(&mut self, cluster: &mut Cluster, kind: FaultKind) -> Result<String, String> {
        let all: Vec<usize> = (0..cluster.procs.len()).collect();
        match kind {
            FaultKind::Kill | FaultKind::Pause => {
                let i = self.pick(&all);
                let p = &mut cluster.procs[i];
                if kind == FaultKind::Kill {
                    p.kill9();
                } else if p.is_running() {
                    p.pause();
                }
                Ok(p.name.clone())
            }
            FaultKind::Isolate => {
                let i = self.pick(&all);
                let me = cluster.procs[i].ip;
                for other in cluster.procs.iter().map(|p| p.ip).chain([HUB_IP]) {
                    if other != me {
                        cluster.lab.block(me, other)?;
                        cluster.lab.block(other, me)?;
                    }
                }
                Ok(cluster.procs[i].name.clone())
            }
            FaultKind::Split => {
                let mut side_a = Vec::new();
                let mut side_b = Vec::new();
                for i in all {
                    if self.rng.chance(50) {
                        side_a.push(i);
                    } else {
                        side_b.push(i);
                    }
                }
                for a in &side_a {
                    for b in &side_b {
                        let (ia, ib) = (cluster.procs[*a].ip, cluster.procs[*b].ip);
                        cluster.lab.block(ia, ib)?;
                        cluster.lab.block(ib, ia)?;
                    }
                }
                let names = |side: &[usize]| {
                    side.iter()
                        .map(|i| cluster.procs[*i].name.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                Ok(format!("{} | {}", names(&side_a), names(&side_b)))
            }
            FaultKind::OneWay => {
                // Mostly between the roles that talk: coordinators and storage nodes.
                let storage = cluster.indices(Role::Storage);
                let coordinators = cluster.indices(Role::Coordinator);
                let s = self.pick(&storage);
                let c = self.pick(&coordinators);
                let (from, to) = if self.rng.chance(50) { (s, c) } else { (c, s) };
                let (ip_from, ip_to) = (cluster.procs[from].ip, cluster.procs[to].ip);
                // `from` reaches `to`; nothing comes back.
                cluster.lab.block(ip_to, ip_from)?;
                Ok(format!(
                    "{} -> {} only",
                    cluster.procs[from].name, cluster.procs[to].name
                ))
            }
            FaultKind::Loss => {
                let i = self.pick(&all);
                cluster.lab.lose(cluster.procs[i].ip, 20)?;
                Ok(cluster.procs[i].name.clone())
            }
            FaultKind::Latency => {
                let i = self.pick(&all);
                cluster.lab.delay(i, 150)?;
                Ok(cluster.procs[i].name.clone())
            }
            FaultKind::ClockSkew => {
                // One coordinator at a time, 5-45 s: with another's earlier lead kept by the
                // HLC, counters can lead a slow clock by about twice that plus a reservation,
                // which the product trusts for replica versions (docs/reliability.md, finding 5).
                for other in 0..COORDINATORS {
                    cluster.skew_clock(other, 0)?;
                }
                let c = self.rng.below(COORDINATORS as u64) as usize;
                let magnitude = 5 + self.rng.below(41) as i64;
                let offset = if self.rng.chance(50) {
                    magnitude
                } else {
                    -magnitude
                };
                cluster.skew_clock(c, offset)?;
                Ok(format!("c{} {offset:+}s", c + 1))
            }
            FaultKind::DiskFull => {
                cluster.fill_disk(true)?;
                Ok(format!("s{}", crate::cluster::STORAGE))
            }
            FaultKind::Topology => self.change_topology(cluster),
            FaultKind::RfChange => self.change_rf(cluster),
        }
    }

    /// Adds the joiner (as a new node) or removes it, unless the previous change is still
    /// running; may kill a coordinator in the middle. Admin calls that fail (another fault
    /// may be cutting the gateway off) are recorded, not fatal; whether a call that got no
    /// answer was applied is read from the registry before the next change is chosen, so a
    /// joiner that is in the ring is never replaced by a new one.
    fn change_topology(&mut self, cluster: &mut Cluster) -> Result<String, String> {
        let gateway = self.gateways[self.rng.below(self.gateways.len() as u64) as usize].clone();
        if let Err(e) = self.settle_joiner(cluster, &gateway) {
            return Ok(format!("none (the registry did not answer: {e})"));
        }
        let mut previous = String::new();
        if let Some(m) = &self.migration {
            let state = self.runtime.block_on(admin::migration_state(&gateway, m));
            match state {
                Ok(state) if state.finished() => previous = format!(" (after {m} {state})"),
                state => return Ok(format!("none ({m} still running: {state:?})")),
            }
        }
        let (what, result) = if cluster.joiner_member {
            let id = cluster.joiner_id().to_owned();
            let r = self
                .runtime
                .block_on(admin::change_node(&gateway, &id, None));
            (format!("remove {id}{previous}"), r)
        } else {
            let (id, addr) = cluster.renew_joiner()?;
            let r = self
                .runtime
                .block_on(admin::change_node(&gateway, &id, Some(addr)));
            (format!("add {id}{previous}"), r)
        };
        let migration = match result {
            Ok(m) => m,
            Err(e) => return Ok(format!("{what} failed or not answered: {e}")),
        };
        cluster.joiner_member = !cluster.joiner_member;
        self.migration = Some(migration);
        Ok(self.maybe_kill_coordinator(cluster, what))
    }

    /// Half of the time, kills a coordinator 0.2-1.5 s after a change started (`what`).
    fn maybe_kill_coordinator(&mut self, cluster: &mut Cluster, what: String) -> String {
        if !self.rng.chance(50) {
            return what;
        }
        let after = 200 + self.rng.below(1_300);
        std::thread::sleep(Duration::from_millis(after));
        let coordinators = cluster.indices(Role::Coordinator);
        let c = self.pick(&coordinators);
        cluster.procs[c].kill9();
        format!("{what}, {} killed at {after} ms", cluster.procs[c].name)
    }

    /// Moves [`RF_TENANT`]'s replication factor from 3 to 2 or back (the stored RF decides),
    /// unless its previous change is still running; may kill a coordinator in the middle. A
    /// call cut after it was sent may have started a change: the newest one is read from the
    /// migration list first. Refusals (another change runs, a fault cuts the gateway off) are
    /// recorded, not fatal.
    fn change_rf(&mut self, cluster: &mut Cluster) -> Result<String, String> {
        let gateway = self.gateways[self.rng.below(self.gateways.len() as u64) as usize].clone();
        match self
            .runtime
            .block_on(admin::newest_rf_change(&gateway, RF_TENANT))
        {
            Ok(Some(m)) => self.rf_migration = Some(m),
            Ok(None) => {}
            Err(e) => return Ok(format!("none (the migrations did not answer: {e})")),
        }
        let mut previous = String::new();
        if let Some(m) = &self.rf_migration {
            match self.runtime.block_on(admin::migration_state(&gateway, m)) {
                Ok(state) if state.finished() => previous = format!(" (after {m} {state})"),
                state => return Ok(format!("none ({m} still running: {state:?})")),
            }
        }
        let rf = match self.runtime.block_on(admin::tenant_rf(&gateway, RF_TENANT)) {
            Ok(rf) => rf,
            Err(e) => return Ok(format!("none (the tenant did not answer: {e})")),
        };
        let target = if rf == crate::RF {
            crate::RF - 1
        } else {
            crate::RF
        };
        let what = format!("{RF_TENANT} rf {rf} -> {target}{previous}");
        match self
            .runtime
            .block_on(admin::change_rf(&gateway, RF_TENANT, target))
        {
            Ok(m) => self.rf_migration = Some(m),
            Err(e) => return Ok(format!("{what} failed or not answered: {e}")),
        }
        Ok(self.maybe_kill_coordinator(cluster, what))
    }
}
