//! Leveled compaction: [`policy`] decides (pure), [`worker`] executes at the [`pace`] the
//! commit log's fsyncs allow.

pub(crate) mod busy;
pub mod pace;
pub mod policy;
#[cfg(test)]
mod simulation;
mod worker;
