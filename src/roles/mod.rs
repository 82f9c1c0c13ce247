//! The roles one `pairdb` process can run. Each role lands as `roles/<role>.rs` with
//! `run(config, shutdown) -> Result<()>`; a role that has not landed is refused, never faked.

use crate::cli::{DevArgs, Role};
use crate::config::Config;

/// Why a role could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoleError {
    #[error("role {0} is not built yet")]
    NotBuilt(&'static str),
}

/// Runs every role of `config.node.roles` until shutdown.
pub async fn run(config: Config) -> Result<(), RoleError> {
    let first = config.node.roles.first().copied().unwrap_or(Role::Gateway);
    let missing = config
        .node
        .roles
        .iter()
        .copied()
        .find(|role| !is_built(*role))
        .unwrap_or(first);
    Err(RoleError::NotBuilt(missing.as_str()))
}

/// Roles whose implementation has landed.
pub fn is_built(role: Role) -> bool {
    match role {
        Role::Gateway | Role::Coordinator | Role::Storage => false,
    }
}

/// `pairdb dev`: the whole cluster in one process.
pub async fn run_dev(_args: DevArgs) -> Result<(), RoleError> {
    Err(RoleError::NotBuilt("dev"))
}
