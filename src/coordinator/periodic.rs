//! The coordinators' periodic background loops (ring refresh, hint replay, lease watch,
//! RF-change refresh, automatic cleanup) share one shape: a step every interval, a late tick
//! delayed rather than bunched, and an end when the role stops.

use std::future::Future;
use std::time::Duration;

use crate::shutdown::Tasks;

/// Runs `step` every `every` as a task of `tasks` until the role stops (checked between steps;
/// a step that has started runs to its end, which the stop waits for).
pub fn spawn_every<F, Fut>(every: Duration, tasks: &Tasks, mut step: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let stop = tasks.stop().clone();
    tasks.spawn(async move {
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
