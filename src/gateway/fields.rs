//! Fields the key-value responses share: vector clocks as the API shows them, a JSON object
//! `{coordinator_id: counter}` (API.md, `vector_clock`, `context`, `if_match`), to and from the
//! coordinator's clock entries; and expiries (`expires_at`).

use std::collections::BTreeMap;

use crate::rpc::common;

/// The `vector_clock` JSON object of a version.
pub fn clock_json(version: Option<&common::Version>) -> BTreeMap<String, u64> {
    version
        .map(|v| {
            v.clock
                .iter()
                .map(|e| (e.coordinator_id.clone(), e.counter))
                .collect()
        })
        .unwrap_or_default()
}

/// A `vector_clock` JSON object as clock entries, and whether one was given.
pub fn clock_entries(clock: Option<&BTreeMap<String, u64>>) -> (bool, Vec<common::ClockEntry>) {
    match clock {
        Some(c) => (
            true,
            c.iter()
                .map(|(id, counter)| common::ClockEntry {
                    coordinator_id: id.clone(),
                    counter: *counter,
                })
                .collect(),
        ),
        None => (false, Vec::new()),
    }
}

/// An expiry as the coordinator sent it (empty: never) as a response field.
pub fn expires_at(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}
