//! Shared fresh reads: many requests that each need a read issued after they asked can share
//! one such read.
//!
//! A burst of pods from one ReplicaSet arrives as dozens of concurrent reviews, and every review
//! past the canary quota must see the owner's slots and pods as they are *now* (a pod deleted a
//! moment ago frees its slot). Giving each review its own LIST makes the API server the
//! bottleneck. A [`FreshRead`] keeps one read in flight per key; a caller that arrives while one
//! is running waits for the next one, which starts after it arrived, so every caller still gets
//! a read that began after its own request: the answer is as fresh as a private LIST.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One coalesced read (see the module documentation).
pub struct FreshRead<T> {
    /// How many reads have been started.
    started: AtomicU64,
    /// The newest completed read and its number; the lock is held while a read runs.
    newest: tokio::sync::Mutex<Option<(u64, Arc<T>)>>,
}

impl<T> Default for FreshRead<T> {
    fn default() -> Self {
        Self {
            started: AtomicU64::new(0),
            newest: tokio::sync::Mutex::new(None),
        }
    }
}

impl<T> FreshRead<T> {
    /// Returns the result of a `fetch` that started after this call began: a read already
    /// started by another caller after that point is shared, else this caller runs one.
    /// Errors are not shared: each caller that meets one retries with its own read.
    pub async fn read<E, Fut>(&self, fetch: impl FnOnce() -> Fut) -> Result<Arc<T>, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let seen_before = self.started.load(Ordering::SeqCst);
        let mut newest = self.newest.lock().await;
        if let Some((number, value)) = newest.as_ref()
            && *number > seen_before
        {
            return Ok(Arc::clone(value));
        }
        // Counted before the read is issued, so a caller that saw the old count never takes
        // this read for one that started after it.
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let value = Arc::new(fetch().await?);
        *newest = Some((number, Arc::clone(&value)));
        Ok(value)
    }
}

/// Values shared per key (per canary owner), created on first use and dropped once nobody
/// holds them and the map has grown.
pub struct PerKey<V> {
    entries: Mutex<HashMap<String, Arc<V>>>,
}

impl<V> Default for PerKey<V> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

/// Size past which unused entries are dropped.
const PRUNE_ABOVE: usize = 4096;

impl<V: Default> PerKey<V> {
    /// The value for `key`, created if missing.
    pub fn get(&self, key: &str) -> Arc<V> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() > PRUNE_ABOVE {
            entries.retain(|_, value| Arc::strong_count(value) > 1);
        }
        Arc::clone(entries.entry(key.to_owned()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_caller_gets_a_read_that_started_after_it_asked() {
        // The "server state" is a clock; a read returns the clock at its start. A caller that
        // asked at time t must get a value >= t.
        let clock = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        let fresh = Arc::new(FreshRead::<u64>::default());
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let (clock, reads, fresh) = (clock.clone(), reads.clone(), fresh.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(i * 50)).await;
                let asked = clock.fetch_add(1, Ordering::SeqCst);
                let value = fresh
                    .read(|| async {
                        reads.fetch_add(1, Ordering::SeqCst);
                        let started = clock.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        Ok::<_, ()>(started)
                    })
                    .await
                    .unwrap();
                assert!(*value > asked, "read started at {value}, asked at {asked}");
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let reads = reads.load(Ordering::SeqCst);
        assert!(
            reads < 200,
            "reads were shared: {reads} reads for 200 callers"
        );
    }

    #[tokio::test]
    async fn errors_are_not_shared() {
        let fresh = FreshRead::<u32>::default();
        assert_eq!(
            fresh.read(|| async { Err::<u32, _>("down") }).await,
            Err("down")
        );
        assert_eq!(*fresh.read(|| async { Ok::<_, ()>(7) }).await.unwrap(), 7);
        // A later caller never reuses a read that finished before it asked.
        assert_eq!(*fresh.read(|| async { Ok::<_, ()>(8) }).await.unwrap(), 8);
    }

    #[test]
    fn per_key_values_are_shared_and_pruned() {
        let map = PerKey::<FreshRead<u8>>::default();
        let a = map.get("a");
        assert!(Arc::ptr_eq(&a, &map.get("a")));
        for i in 0..=PRUNE_ABOVE {
            map.get(&i.to_string());
        }
        map.get("b");
        let size = map.entries.lock().unwrap().len();
        assert!(size <= 3, "unused entries pruned, {size} left");
        assert!(Arc::ptr_eq(&a, &map.get("a")), "held entries survive");
    }
}
