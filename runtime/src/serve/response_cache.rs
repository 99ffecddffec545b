//! The response cache: whole answers to deterministic requests (temperature 0, or a fixed
//! seed), keyed by the model, the endpoint, the prompt's token ids, every setting that changes
//! the output and the caller's API key, kept for a TTL within a memory bound (least recently
//! used out first). A hot request is answered without touching the engine.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Identifies a request's answer.
pub type Key = [u8; 32];

/// Per-entry bookkeeping counted against the memory bound on top of the text.
const ENTRY_OVERHEAD: usize = 160;

/// A whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    /// The generated text.
    pub text: String,
    /// Why generation ended (`stop`, `length`).
    pub finish_reason: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

struct Entry {
    value: Arc<Cached>,
    stored: Instant,
    tick: u64,
    size: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Use order: tick -> key, oldest first.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

/// What the cache holds now, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Answers held.
    pub entries: usize,
    /// Bytes counted against the bound.
    pub bytes: usize,
}

/// The cache. `None` where it is turned off (TTL or bound 0).
pub struct ResponseCache {
    ttl: Duration,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

/// Builds a [`Key`] from the parts of a request that decide its answer.
#[derive(Default)]
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    /// Adds a length-prefixed field (so that no two different requests hash alike).
    pub fn field(mut self, bytes: &[u8]) -> Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// Adds token ids.
    pub fn ids(self, ids: &[u32]) -> Self {
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        self.field(&bytes)
    }

    /// The key.
    pub fn finish(self) -> Key {
        self.0.finalize().into()
    }
}

impl ResponseCache {
    /// A cache keeping answers for `ttl` within `max_bytes`; `None` when either is zero.
    pub fn new(ttl: Duration, max_bytes: usize) -> Option<Self> {
        (!ttl.is_zero() && max_bytes > 0).then(|| Self {
            ttl,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer stored under `key` less than the TTL ago.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Arc<Cached>> {
        let mut inner = self.lock();
        let fresh = inner
            .entries
            .get(key)
            .map(|e| now.duration_since(e.stored) < self.ttl)?;
        if !fresh {
            inner.remove(key);
            return None;
        }
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.entries.get_mut(key)?;
        let old = std::mem::replace(&mut entry.tick, tick);
        let value = entry.value.clone();
        inner.order.remove(&old);
        inner.order.insert(tick, *key);
        Some(value)
    }

    /// Stores `value` under `key`, making room by dropping expired, then least recently used
    /// answers. An answer larger than the whole bound is not stored.
    pub fn put(&self, key: Key, value: Cached, now: Instant) {
        let size = value.text.len() + value.finish_reason.len() + ENTRY_OVERHEAD;
        if size > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        inner.remove(&key);
        let expired: Vec<Key> = inner
            .entries
            .iter()
            .filter(|(_, e)| now.duration_since(e.stored) >= self.ttl)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            inner.remove(&k);
        }
        while inner.bytes + size > self.max_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.remove(&oldest);
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.order.insert(tick, key);
        inner.bytes += size;
        inner.entries.insert(
            key,
            Entry {
                value: Arc::new(value),
                stored: now,
                tick,
                size,
            },
        );
    }

    /// What is held now.
    pub fn usage(&self) -> Usage {
        let inner = self.lock();
        Usage {
            entries: inner.entries.len(),
            bytes: inner.bytes,
        }
    }
}

impl Inner {
    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.entries.remove(key) {
            self.order.remove(&e.tick);
            self.bytes -= e.size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Cached {
        Cached {
            text: text.into(),
            finish_reason: "stop".into(),
            prompt_tokens: 3,
            completion_tokens: 2,
        }
    }

    fn key(s: &str) -> Key {
        KeyBuilder::default().field(s.as_bytes()).finish()
    }

    #[test]
    fn answers_expire_after_the_ttl() {
        let cache = ResponseCache::new(Duration::from_secs(300), 1 << 20).unwrap();
        let t0 = Instant::now();
        cache.put(key("a"), answer("47"), t0);
        assert_eq!(
            cache
                .get(&key("a"), t0 + Duration::from_secs(299))
                .as_deref(),
            Some(&answer("47"))
        );
        assert_eq!(cache.get(&key("a"), t0 + Duration::from_secs(300)), None);
        assert_eq!(cache.usage().entries, 0);
    }

    #[test]
    fn the_least_recently_used_answer_goes_first_when_the_bound_is_reached() {
        let one = "x".repeat(100).len() + "stop".len() + ENTRY_OVERHEAD;
        let cache = ResponseCache::new(Duration::from_secs(300), 2 * one).unwrap();
        let t = Instant::now();
        cache.put(key("a"), answer(&"x".repeat(100)), t);
        cache.put(key("b"), answer(&"x".repeat(100)), t);
        // a is used, so b is the oldest when c arrives.
        assert!(cache.get(&key("a"), t).is_some());
        cache.put(key("c"), answer(&"x".repeat(100)), t);
        assert!(cache.get(&key("a"), t).is_some());
        assert!(cache.get(&key("b"), t).is_none());
        assert!(cache.get(&key("c"), t).is_some());
        assert_eq!(
            cache.usage(),
            Usage {
                entries: 2,
                bytes: 2 * one
            }
        );
        // Larger than the whole bound: not stored, nothing evicted.
        cache.put(key("d"), answer(&"x".repeat(4 * one)), t);
        assert_eq!(cache.usage().entries, 2);
    }

    #[test]
    fn keys_tell_fields_apart_and_off_means_none() {
        let ab = KeyBuilder::default().field(b"a").field(b"b").finish();
        let a_b = KeyBuilder::default().field(b"ab").field(b"").finish();
        assert_ne!(ab, a_b);
        assert_ne!(
            KeyBuilder::default().ids(&[1, 2]).finish(),
            KeyBuilder::default().ids(&[2, 1]).finish()
        );
        assert!(ResponseCache::new(Duration::ZERO, 1 << 20).is_none());
        assert!(ResponseCache::new(Duration::from_secs(1), 0).is_none());
    }
}
