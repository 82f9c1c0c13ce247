//! Leveled compaction: [`policy`] decides (pure), [`worker`] executes.

pub mod policy;
mod worker;
