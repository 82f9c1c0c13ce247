//! A short in-memory history of the key-value traffic this gateway served, for the console's
//! charts (issue "An operator console in the browser": no Prometheus required).
//!
//! Time is cut into [`STEP_SECONDS`] steps; the last [`KEPT_STEPS`] are kept. Each step holds,
//! per series, the number of requests, their latency histogram (hdrhistogram, microseconds) and
//! their outcomes by error code (`OK` for successes). The series are:
//! - `gateway`: every key-value request, from arrival to answer (admission, checks and the
//!   coordinator call included);
//! - `coordinator`: every key-value call the gateway made to a coordinator, as the gateway saw
//!   it (the coordinator's work and the network), by the code it answered;
//! - one per tenant (`tenant:<id>`): that tenant's requests as in `gateway`.
//!
//! Invariants: memory is bounded whatever the traffic: at most [`KEPT_STEPS`] steps, each with
//! at most [`MAX_TENANT_SERIES`] tenant series (requests of further tenants in the same step
//! count in `tenant:(others)`), at most [`MAX_CODES`] distinct codes per series and step, and a
//! latency histogram of fixed size. Recording takes one short mutex section; reading copies
//! out what was asked.

use std::collections::{BTreeMap, VecDeque};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

/// Seconds per step.
pub const STEP_SECONDS: u64 = 2;
/// Steps kept: ten minutes.
pub const KEPT_STEPS: usize = 300;
/// Tenant series per step, at most.
pub const MAX_TENANT_SERIES: usize = 32;
/// Distinct codes per series and step, at most (further ones count as `OTHER`).
pub const MAX_CODES: usize = 16;
/// The series of tenants beyond [`MAX_TENANT_SERIES`] in one step.
pub const OTHER_TENANTS: &str = "tenant:(others)";
/// Latencies are recorded in microseconds up to one hour, with two significant digits.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Which series a request is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Coordinator,
}

impl Role {
    fn series(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Coordinator => "coordinator",
        }
    }
}

/// One series in one step.
struct Tally {
    requests: u64,
    latency_us: Histogram<u32>,
    codes: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Option<Tally> {
        Some(Tally {
            requests: 0,
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).ok()?,
            codes: BTreeMap::new(),
        })
    }

    fn add(&mut self, latency_us: u64, code: &str) {
        self.requests += 1;
        self.latency_us
            .saturating_record(latency_us.clamp(1, MAX_LATENCY_US));
        if let Some(n) = self.codes.get_mut(code) {
            *n += 1;
        } else if self.codes.len() < MAX_CODES {
            self.codes.insert(code.to_owned(), 1);
        } else {
            *self.codes.entry("OTHER".to_owned()).or_insert(0) += 1;
        }
    }
}

/// One step: its start (Unix seconds, a multiple of [`STEP_SECONDS`]) and its series: the
/// roles', and the tenants' (by tenant id, looked up without building a series name on the
/// request path), with the tenants beyond [`MAX_TENANT_SERIES`] in `others`.
struct Step {
    start: u64,
    roles: BTreeMap<&'static str, Tally>,
    tenants: BTreeMap<String, Tally>,
    others: Option<Tally>,
}

impl Step {
    fn role(&mut self, role: Role) -> Option<&mut Tally> {
        let name = role.series();
        if !self.roles.contains_key(name) {
            self.roles.insert(name, Tally::new()?);
        }
        self.roles.get_mut(name)
    }

    fn tenant(&mut self, tenant: &str) -> Option<&mut Tally> {
        if self.tenants.contains_key(tenant) {
            return self.tenants.get_mut(tenant);
        }
        if self.tenants.len() < MAX_TENANT_SERIES {
            self.tenants.insert(tenant.to_owned(), Tally::new()?);
            return self.tenants.get_mut(tenant);
        }
        if self.others.is_none() {
            self.others = Some(Tally::new()?);
        }
        self.others.as_mut()
    }

    /// Every series of the step with its name (`tenant:<id>` for tenants).
    fn series(&self) -> impl Iterator<Item = (String, &Tally)> {
        let roles = self.roles.iter().map(|(n, t)| ((*n).to_owned(), t));
        let tenants = self.tenants.iter().map(|(n, t)| (format!("tenant:{n}"), t));
        let others = self.others.iter().map(|t| (OTHER_TENANTS.to_owned(), t));
        roles.chain(tenants).chain(others)
    }
}

/// One point of a series, as the console reads it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Start of the step, Unix seconds.
    pub t: u64,
    pub requests: u64,
    /// Requests per second over the step.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests by error code (`OK` for successes).
    pub codes: BTreeMap<String, u64>,
}

/// A series' points, oldest first; steps without its requests are left out.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

/// The history (see the module docs).
pub struct History {
    steps: Mutex<VecDeque<Step>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            steps: Mutex::new(VecDeque::with_capacity(KEPT_STEPS)),
        }
    }

    /// Counts one request of `role` that took `latency_us` and ended with `code`, at
    /// `now_unix` (seconds); a gateway request also counts in its tenant's series.
    pub fn record(
        &self,
        now_unix: u64,
        role: Role,
        tenant: Option<&str>,
        latency_us: u64,
        code: &str,
    ) {
        let start = now_unix - now_unix % STEP_SECONDS;
        let mut steps = self.steps.lock();
        // Clocks can step back: a request is counted in the newest step at most.
        let newest = steps.back().map(|s| s.start);
        if newest.is_none_or(|n| start > n) {
            if steps.len() == KEPT_STEPS {
                steps.pop_front();
            }
            steps.push_back(Step {
                start,
                roles: BTreeMap::new(),
                tenants: BTreeMap::new(),
                others: None,
            });
        }
        let Some(step) = steps.back_mut() else {
            return;
        };
        if let Some(t) = step.role(role) {
            t.add(latency_us, code);
        }
        if let (Role::Gateway, Some(tenant)) = (role, tenant) {
            if let Some(t) = step.tenant(tenant) {
                t.add(latency_us, code);
            }
        }
    }

    /// Every series over the steps that started at or after `since_unix`.
    pub fn series_since(&self, since_unix: u64) -> Vec<Series> {
        let steps = self.steps.lock();
        let mut out: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        for step in steps.iter().filter(|s| s.start >= since_unix) {
            for (name, tally) in step.series() {
                let ms = |q: f64| tally.latency_us.value_at_quantile(q) as f64 / 1000.0;
                out.entry(name).or_default().push(Point {
                    t: step.start,
                    requests: tally.requests,
                    rate: tally.requests as f64 / STEP_SECONDS as f64,
                    p50_ms: ms(0.5),
                    p99_ms: ms(0.99),
                    codes: tally.codes.clone(),
                });
            }
        }
        out.into_iter()
            .map(|(name, points)| Series { name, points })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series<'a>(all: &'a [Series], name: &str) -> &'a Series {
        all.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no series {name}"))
    }

    #[test]
    fn requests_are_counted_per_step_series_and_code() {
        let h = History::new();
        h.record(1_000, Role::Gateway, Some("acme"), 1_000, "OK");
        h.record(1_001, Role::Gateway, Some("acme"), 3_000, "KEY_NOT_FOUND");
        h.record(1_001, Role::Coordinator, None, 2_000, "OK");
        h.record(1_002, Role::Gateway, Some("globex"), 5_000, "OK");
        let all = h.series_since(0);
        let gw = series(&all, "gateway");
        assert_eq!(gw.points.len(), 2);
        assert_eq!((gw.points[0].t, gw.points[0].requests), (1_000, 2));
        assert_eq!(gw.points[0].rate, 1.0);
        assert_eq!(
            gw.points[0].codes,
            BTreeMap::from([("KEY_NOT_FOUND".to_owned(), 1), ("OK".to_owned(), 1)])
        );
        assert!(
            (gw.points[0].p99_ms - 3.0).abs() < 0.1,
            "{:?}",
            gw.points[0]
        );
        assert_eq!(series(&all, "tenant:acme").points.len(), 1);
        assert_eq!(series(&all, "tenant:globex").points[0].t, 1_002);
        assert_eq!(series(&all, "coordinator").points[0].requests, 1);
        assert_eq!(h.series_since(1_002).len(), 2, "gateway and globex only");
    }

    #[test]
    fn memory_stays_bounded_whatever_the_traffic() {
        let h = History::new();
        for second in 0..(KEPT_STEPS as u64 * STEP_SECONDS * 2) {
            h.record(second, Role::Gateway, Some("t"), 10, "OK");
        }
        assert_eq!(
            series(&h.series_since(0), "gateway").points.len(),
            KEPT_STEPS
        );
        let h = History::new();
        for i in 0..(MAX_TENANT_SERIES + 10) {
            h.record(
                0,
                Role::Gateway,
                Some(&format!("t{i}")),
                10,
                &format!("C{i}"),
            );
        }
        let all = h.series_since(0);
        let tenants = all.iter().filter(|s| s.name.starts_with("tenant:")).count();
        assert_eq!(tenants, MAX_TENANT_SERIES + 1, "the rest count as others");
        assert_eq!(series(&all, OTHER_TENANTS).points[0].requests, 10);
        let codes = &series(&all, "gateway").points[0].codes;
        assert_eq!(codes.len(), MAX_CODES + 1);
        assert_eq!(codes["OTHER"], (MAX_TENANT_SERIES + 10 - MAX_CODES) as u64);
    }

    #[test]
    fn a_clock_that_steps_back_counts_in_the_newest_step() {
        let h = History::new();
        h.record(100, Role::Gateway, None, 10, "OK");
        h.record(50, Role::Gateway, None, 10, "OK");
        let all = h.series_since(0);
        assert_eq!(series(&all, "gateway").points.len(), 1);
        assert_eq!(series(&all, "gateway").points[0].requests, 2);
    }
}
