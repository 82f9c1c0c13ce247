//! The coordinators' periodic background loops (lease watch, RF-change refresh, automatic
//! cleanup) share one shape: a step every interval, a late tick delayed rather than bunched,
//! and an end when the process stops.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `step` every `every` until `stop` is cancelled (checked between steps; a step that
/// has started runs to its end).
pub fn spawn_every<F, Fut>(every: Duration, stop: CancellationToken, mut step: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            step().await;
        }
    });
}
