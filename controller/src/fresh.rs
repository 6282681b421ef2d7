//! One observation shared by everyone who asks at about the same time.
//!
//! The console's pages and live streams each used to observe every node (and read
//! the state store) on their own: a page load cost a full observation, and ten
//! open pages observed the cluster twenty times a second. A [`Fresh`] holds the
//! newest value with the instant it was made. A caller gets it if it is younger
//! than the age the caller accepts; otherwise one caller makes a new one while
//! the others wait for it (single flight), so a burst of page loads costs one
//! observation. [`Fresh::invalidate`] drops the value when something happened
//! (an event was recorded), so the next reader sees the change.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The newest value, made at most once at a time.
pub struct Fresh<T> {
    latest: Mutex<Option<(Instant, T)>>,
    /// Held while a value is being made.
    flight: tokio::sync::Mutex<()>,
    /// Counts invalidations: a value made while one happened is not stored as fresh.
    generation: std::sync::atomic::AtomicU64,
}

impl<T: Clone> Default for Fresh<T> {
    fn default() -> Self {
        Self {
            latest: Mutex::new(None),
            flight: tokio::sync::Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl<T> std::fmt::Debug for Fresh<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let age = self
            .latest
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|(at, _)| at.elapsed()));
        f.debug_struct("Fresh").field("age", &age).finish()
    }
}

impl<T: Clone> Fresh<T> {
    /// The value if it was made less than `max_age` ago, else a new one from
    /// `make` (made once for all concurrent callers).
    pub async fn get<F, Fut>(&self, max_age: Duration, make: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        if let Some(value) = self.young(max_age) {
            return value;
        }
        let _flight = self.flight.lock().await;
        // Another caller may have made it while this one waited.
        if let Some(value) = self.young(max_age) {
            return value;
        }
        let generation = self.generation();
        let value = make().await;
        self.store(generation, value.clone());
        value
    }

    /// Stores a value made elsewhere (a fresh `/api/v1/status` answer).
    pub fn put(&self, value: T) {
        let generation = self.generation();
        self.store(generation, value);
    }

    /// Forgets the value: the next reader makes a new one.
    pub fn invalidate(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn store(&self, generation: u64, value: T) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        // Something happened while it was made: it may not show it; keep nothing.
        if self.generation() == generation {
            *latest = Some((Instant::now(), value));
        }
    }

    fn young(&self, max_age: Duration) -> Option<T> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        match &*latest {
            // An invalidation empties it, so a value present is a current one.
            Some((at, value)) if at.elapsed() < max_age => Some(value.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_share_one_making_and_a_young_value_is_reused() {
        let fresh = Arc::new(Fresh::<u64>::default());
        let made = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![];
        for _ in 0..8 {
            let (fresh, made) = (fresh.clone(), made.clone());
            tasks.push(tokio::spawn(async move {
                fresh
                    .get(Duration::from_secs(10), || async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        made.fetch_add(1, Ordering::SeqCst) as u64 + 1
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 1, "every reader gets the one value made");
        }
        assert_eq!(
            made.load(Ordering::SeqCst),
            1,
            "made once for eight readers"
        );
        // Young: reused without making.
        let v = fresh.get(Duration::from_secs(10), || async { 99 }).await;
        assert_eq!(v, 1);
        // Too old for this reader: made anew.
        let v = fresh.get(Duration::ZERO, || async { 2 }).await;
        assert_eq!(v, 2);
    }

    #[tokio::test]
    async fn an_invalidation_drops_the_value_and_a_value_made_across_one_is_not_kept() {
        let fresh = Fresh::<u64>::default();
        assert_eq!(fresh.get(Duration::from_secs(10), || async { 1 }).await, 1);
        fresh.invalidate();
        assert_eq!(fresh.get(Duration::from_secs(10), || async { 2 }).await, 2);
        // An invalidation while a value is being made: the caller gets it, the next
        // reader does not.
        let v = fresh
            .get(Duration::ZERO, || async {
                fresh.invalidate();
                3
            })
            .await;
        assert_eq!(v, 3);
        assert_eq!(fresh.get(Duration::from_secs(10), || async { 4 }).await, 4);
        fresh.put(5);
        assert_eq!(fresh.get(Duration::from_secs(10), || async { 6 }).await, 5);
    }
}
