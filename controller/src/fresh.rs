//! One observation shared by everyone who asks, kept and served the way a
//! watch-fed cache is (stale-while-revalidate).
//!
//! The console's pages and live streams each used to observe every node (and read
//! the state store) on their own: a page load cost a full observation, and ten
//! open pages observed the cluster twenty times a second. A [`Fresh`] holds the
//! newest value with the instant it was made.
//!
//! - [`Fresh::get`]: the value if it is younger than the age the caller accepts;
//!   otherwise one caller makes a new one while the others wait for it (single
//!   flight), so a burst of callers costs one making. Live streams read so.
//! - [`Fresh::serve`]: the newest value at once, however old, with its age; when
//!   it is older than the caller wants, or stale, a new one is made in the
//!   background (one at a time) for the next reader. Only when no value was ever
//!   made does the caller wait, and then all callers share that one making.
//!   Pages read so: a page never waits for an observation of 1,000 nodes.
//! - [`Fresh::invalidate`] marks the value stale when something happened (an event
//!   was recorded): `get` no longer takes it, `serve` still shows it (with its
//!   age) and starts a new one. A value made while an invalidation happened is
//!   kept, but stale: it may not show what happened.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The newest value, made at most once at a time.
pub struct Fresh<T> {
    latest: Mutex<Option<Slot<T>>>,
    /// Held while a value is being made.
    flight: Arc<tokio::sync::Mutex<()>>,
    /// Counts invalidations: a value made while one happened is stored stale.
    generation: AtomicU64,
}

struct Slot<T> {
    made: Instant,
    value: T,
    /// Something happened since it was made (or while it was made).
    stale: bool,
}

/// A value as [`Fresh::serve`] gives it.
#[derive(Debug, Clone)]
pub struct Served<T> {
    /// The newest value.
    pub value: T,
    /// How long ago it was made.
    pub age: Duration,
    /// It was stale or too old, and a new one is being made behind it.
    pub revalidating: bool,
}

impl<T> Default for Fresh<T> {
    fn default() -> Self {
        Self {
            latest: Mutex::new(None),
            flight: Arc::new(tokio::sync::Mutex::new(())),
            generation: AtomicU64::new(0),
        }
    }
}

impl<T> std::fmt::Debug for Fresh<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (age, stale) = self
            .latest
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|s| (s.made.elapsed(), s.stale)))
            .unzip();
        f.debug_struct("Fresh")
            .field("age", &age)
            .field("stale", &stale)
            .finish()
    }
}

impl<T: Clone> Fresh<T> {
    /// The value if it was made less than `max_age` ago and nothing happened
    /// since, else a new one from `make` (made once for all concurrent callers).
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

    /// Something happened: the value is stale (kept, shown with its age, and
    /// made anew by the next reader).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(slot) = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            slot.stale = true;
        }
    }

    /// Forgets the value altogether, as if none was ever made (the bench's
    /// "never observed" case).
    pub fn forget(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The newest value with its age and whether it is stale, if any was made.
    pub fn peek(&self) -> Option<(T, Duration, bool)> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest
            .as_ref()
            .map(|s| (s.value.clone(), s.made.elapsed(), s.stale))
    }

    /// How many times something happened (each `invalidate` and `forget`).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn store(&self, generation: u64, value: T) {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        // Something happened while it was made: it may not show it, so it is
        // stale; it is still newer than what is there.
        let stale = self.generation() != generation;
        *latest = Some(Slot {
            made: Instant::now(),
            value,
            stale,
        });
    }

    fn young(&self, max_age: Duration) -> Option<T> {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        match &*latest {
            Some(s) if !s.stale && s.made.elapsed() < max_age => Some(s.value.clone()),
            _ => None,
        }
    }
}

impl<T: Clone + Send + 'static> Fresh<T> {
    /// Stale-while-revalidate: the newest value at once, with its age. When it is
    /// stale or at least `max_age` old, a new one is made in the background by
    /// `make` unless one is being made already. Only when none was ever made does
    /// the caller wait (sharing one making with every other caller).
    pub async fn serve<F, Fut>(self: &Arc<Self>, max_age: Duration, make: F) -> Served<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        if let Some((value, age, stale)) = self.peek() {
            let revalidating = stale || age >= max_age;
            if revalidating {
                self.revalidate(make);
            }
            return Served {
                value,
                age,
                revalidating,
            };
        }
        // Never made: wait, once, for the making in flight or for this one.
        let _flight = self.flight.lock().await;
        if let Some((value, age, _)) = self.peek() {
            return Served {
                value,
                age,
                revalidating: false,
            };
        }
        let generation = self.generation();
        let value = make().await;
        self.store(generation, value.clone());
        Served {
            value,
            age: Duration::ZERO,
            revalidating: false,
        }
    }

    /// Makes a new value in the background, unless one is being made; returns
    /// whether it started one.
    pub fn revalidate<F, Fut>(self: &Arc<Self>, make: F) -> bool
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let Ok(flight) = Arc::clone(&self.flight).try_lock_owned() else {
            return false;
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let _flight = flight;
            let generation = this.generation();
            let value = make().await;
            this.store(generation, value);
        });
        true
    }

    /// Makes a new value now unless one is being made (then waits for that one):
    /// what a keeper task calls.
    pub async fn refresh<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let Ok(_flight) = self.flight.try_lock() else {
            let _done = self.flight.lock().await;
            return;
        };
        let generation = self.generation();
        let value = make().await;
        self.store(generation, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    async fn an_invalidation_makes_the_value_stale_and_a_value_made_across_one_is_stale() {
        let fresh = Fresh::<u64>::default();
        assert_eq!(fresh.get(Duration::from_secs(10), || async { 1 }).await, 1);
        fresh.invalidate();
        assert!(fresh.peek().is_some_and(|(v, _, stale)| v == 1 && stale));
        assert_eq!(fresh.get(Duration::from_secs(10), || async { 2 }).await, 2);
        // An invalidation while a value is being made: the caller gets it, it is
        // kept stale, so the next `get` makes anew.
        let v = fresh
            .get(Duration::ZERO, || async {
                fresh.invalidate();
                3
            })
            .await;
        assert_eq!(v, 3);
        assert!(fresh.peek().is_some_and(|(v, _, stale)| v == 3 && stale));
        assert_eq!(fresh.get(Duration::from_secs(10), || async { 4 }).await, 4);
        fresh.put(5);
        assert_eq!(fresh.get(Duration::from_secs(10), || async { 6 }).await, 5);
        fresh.forget();
        assert!(fresh.peek().is_none());
    }

    /// Pages: a stale value is served at once, with its age, and one new value is
    /// made behind it for the next reader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_value_is_served_at_once_and_revalidated_once_in_the_background() {
        let fresh = Arc::new(Fresh::<u64>::default());
        fresh.put(1);
        fresh.invalidate();
        let made = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let slow = |made: Arc<AtomicUsize>, mut released: tokio::sync::watch::Receiver<bool>| {
            move || async move {
                let _ = released.wait_for(|r| *r).await;
                made.fetch_add(1, Ordering::SeqCst) as u64 + 2
            }
        };
        for _ in 0..5 {
            let started = Instant::now();
            let served = fresh
                .serve(
                    Duration::from_secs(60),
                    slow(made.clone(), released.clone()),
                )
                .await;
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "served without waiting for the making"
            );
            assert_eq!(served.value, 1, "the stale value");
            assert!(served.revalidating);
        }
        release.send(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while fresh.peek().is_none_or(|(v, _, _)| v == 1) {
            assert!(Instant::now() < deadline, "revalidated in the background");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            made.load(Ordering::SeqCst),
            1,
            "five stale reads, one making"
        );
        let served = fresh.serve(Duration::from_secs(60), || async { 99 }).await;
        assert_eq!(served.value, 2, "the next reader has the new value");
        assert!(!served.revalidating, "young and not stale: nothing made");
        assert!(served.age < Duration::from_secs(5));
        // Old enough for this reader (not stale): served and renewed too.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let served = fresh.serve(Duration::from_millis(10), || async { 7 }).await;
        assert_eq!(served.value, 2);
        assert!(served.revalidating && served.age >= Duration::from_millis(10));
        let deadline = Instant::now() + Duration::from_secs(5);
        while fresh.peek().is_none_or(|(v, _, _)| v != 7) {
            assert!(Instant::now() < deadline, "renewed in the background");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A controller that never observed: the first readers wait, all for one
    /// making; later readers never wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_no_value_ever_made_readers_wait_once_for_one_making() {
        let fresh = Arc::new(Fresh::<u64>::default());
        let made = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![];
        for _ in 0..6 {
            let (fresh, made) = (fresh.clone(), made.clone());
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let served = fresh
                    .serve(Duration::from_secs(60), move || async move {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        made.fetch_add(1, Ordering::SeqCst) as u64 + 1
                    })
                    .await;
                (served, started.elapsed())
            }));
        }
        for t in tasks {
            let (served, waited) = t.await.unwrap();
            assert_eq!(served.value, 1);
            assert!(!served.revalidating);
            assert!(
                waited >= Duration::from_millis(150),
                "nothing to show: it waited for the first making ({waited:?})"
            );
        }
        assert_eq!(made.load(Ordering::SeqCst), 1, "one making for six readers");
        let started = Instant::now();
        let served = fresh
            .serve(Duration::from_secs(60), || async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                9
            })
            .await;
        assert_eq!(served.value, 1);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "a value exists: no wait again"
        );
    }

    #[tokio::test]
    async fn refresh_makes_once_while_another_making_runs() {
        let fresh = Arc::new(Fresh::<u64>::default());
        fresh.put(1);
        let (release, mut released) = tokio::sync::watch::channel(false);
        assert!(fresh.revalidate(move || async move {
            let _ = released.wait_for(|r| *r).await;
            2
        }));
        assert!(!fresh.revalidate(|| async { 3 }), "one making at a time");
        let waiter = {
            let fresh = fresh.clone();
            tokio::spawn(async move { fresh.refresh(|| async { 4 }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(true).unwrap();
        waiter.await.unwrap();
        assert_eq!(
            fresh.peek().map(|p| p.0),
            Some(2),
            "refresh waited for the making in flight instead of making its own"
        );
        fresh.refresh(|| async { 5 }).await;
        assert_eq!(fresh.peek().map(|p| p.0), Some(5));
    }
}
