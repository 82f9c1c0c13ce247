//! A coordinator's clock: [`HybridClock`] whose high-water mark lives in the metadata store, so
//! a restarted coordinator (even with its wall clock behind) never issues a counter it issued
//! before. The mark is reserved a minute ahead, so the store is written about once a minute.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::meta::{MetaError, MetadataStore};
use crate::vclock::HybridClock;

pub struct CoordinatorClock {
    id: String,
    store: Arc<dyn MetadataStore>,
    clock: Mutex<HybridClock>,
}

impl CoordinatorClock {
    /// Resumes `coordinator_id`'s clock from its durable high-water mark.
    pub async fn resume(
        coordinator_id: &str,
        store: Arc<dyn MetadataStore>,
    ) -> Result<Self, MetaError> {
        let high_water = store.load_clock(coordinator_id).await?;
        Ok(Self {
            id: coordinator_id.to_owned(),
            store,
            clock: Mutex::new(HybridClock::resume(high_water)),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next counter, above `observed` (the causal context's highest counter). Fails rather
    /// than hand out a counter whose reservation could not be made durable.
    pub async fn next(&self, observed: u64) -> Result<u64, MetaError> {
        self.next_at(crate::wallclock::now_ms(), observed).await
    }

    /// [`CoordinatorClock::next`] at a given wall time (tests move it backwards).
    pub async fn next_at(&self, now_ms: u64, observed: u64) -> Result<u64, MetaError> {
        let mut clock = self.clock.lock().await;
        let tick = clock.tick(now_ms, observed);
        if let Some(high_water) = tick.persist_high_water {
            self.store.store_clock(&self.id, high_water).await?;
            clock.persisted(high_water);
        }
        Ok(tick.counter)
    }
}
