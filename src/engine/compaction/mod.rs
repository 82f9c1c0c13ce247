//! Leveled compaction: [`policy`] decides (pure), [`worker`] executes.

pub mod policy;
#[cfg(test)]
mod simulation;
mod worker;
