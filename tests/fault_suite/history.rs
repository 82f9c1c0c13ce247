//! The recorded history: every operation a client invoked, when it was invoked and completed
//! (ms since the run began), and what came back. A write's outcome is `Ok` only for a 200;
//! a write that failed after it may have been sent (a timeout, a 5xx) is `Unknown`: it may or
//! may not have been applied, at any later time.

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Put,
    Delete,
    Get,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Outcome {
    /// 200 (or a read's 404: `found` false).
    Ok {
        /// The version returned (`vector_clock`), if any.
        clock: Option<Value>,
        /// A read's value id (`None`: not found or not ours to parse).
        read: Option<ReadValue>,
        found: bool,
        duplicate: bool,
        /// The write was served without the idempotency store (`idempotency_skipped`).
        #[serde(default)]
        skipped: bool,
    },
    /// Refused before anything was written (a 4xx, a connection refused).
    Fail { code: String },
    /// May or may not have been applied.
    Unknown { why: String },
}

/// What a read returned, parsed from the stored JSON `{"t": tenant, "k": key, "id": n}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReadValue {
    pub tenant: String,
    pub key: String,
    pub id: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub id: u64,
    pub client: usize,
    pub kind: Kind,
    pub tenant: String,
    pub key: String,
    /// The value id a write wrote (unique in the run).
    pub value: Option<u64>,
    pub consistency: &'static str,
    pub idempotency_key: Option<String>,
    /// Tries of an idempotent write (1 for every other operation).
    pub attempts: u32,
    /// A deliberate resend of this acknowledged idempotent write (a client that lost the
    /// answer): it must be answered as a duplicate with the first answer's version.
    pub resend_of: Option<u64>,
    /// A conditional write's condition: `{"if_match": clock}` or `"if_absent"`.
    pub condition: Option<Value>,
    pub invoke_ms: u64,
    pub complete_ms: u64,
    pub outcome: Outcome,
}

impl Op {
    pub fn is_write(&self) -> bool {
        self.kind != Kind::Get
    }

    pub fn acked(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }

    /// An acknowledged write other than a deliberate resend (which must write nothing).
    pub fn acked_write(&self) -> bool {
        self.is_write() && self.acked() && self.resend_of.is_none()
    }

    /// Served without the idempotency store: a repeat is written again, as the answer said.
    pub fn skipped_idempotency(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { skipped: true, .. })
    }

    /// A write that may have been applied: acknowledged, or unknown.
    pub fn may_have_applied(&self) -> bool {
        self.is_write() && !matches!(self.outcome, Outcome::Fail { .. })
    }

    /// When the write's effect was settled at the latest: its completion when acknowledged,
    /// never when unknown (a request still in flight in a paused coordinator may land later).
    pub fn settled_by(&self) -> u64 {
        if self.acked() {
            self.complete_ms
        } else {
            u64::MAX
        }
    }

    pub fn clock(&self) -> Option<&Value> {
        match &self.outcome {
            Outcome::Ok { clock, .. } => clock.as_ref(),
            _ => None,
        }
    }

    pub fn read_value(&self) -> Option<&ReadValue> {
        match &self.outcome {
            Outcome::Ok { read, .. } => read.as_ref(),
            _ => None,
        }
    }

    /// A conditional write refused with VERSION_CONFLICT.
    pub fn conflicted(&self) -> bool {
        matches!(&self.outcome, Outcome::Fail { code } if code.ends_with("VERSION_CONFLICT"))
    }

    /// Reads at QUORUM or ALL (R + W > RF with quorum or all writes).
    pub fn is_strong(&self) -> bool {
        matches!(self.consistency, "quorum" | "all")
    }
}

/// A fault the nemesis injected, and when it was healed.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    pub kind: String,
    pub target: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// The final state of one key after every fault was healed.
#[derive(Debug, Clone, Serialize)]
pub struct FinalKey {
    pub tenant: String,
    pub key: String,
    /// The value id read at ALL (`None`: not found).
    pub value: Option<u64>,
    pub clock: Option<Value>,
    /// What each natural replica held after the suite's repair, before the read at ALL:
    /// (node, value id or `None` for nothing/tombstone, version as text).
    pub replicas: Vec<(String, Option<u64>, Option<String>)>,
}
