//! A counter of a backend's cloud API calls by method, so tests and the README can say what a
//! lifecycle costs. Every backend that talks to a cloud API keeps one the same way.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Counts API calls by method or operation name (`RunInstances`,
/// `compute.instanceGroupManagers.resize`, ...). Cheap to clone; clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct CallCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl CallCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls of one method.
    pub fn get(&self, method: &str) -> u64 {
        self.counts
            .lock()
            .map(|m| m.get(method).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Calls of every method.
    pub fn total(&self) -> u64 {
        self.counts.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    /// The counts by method.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Back to zero.
    pub fn reset(&self) {
        if let Ok(mut m) = self.counts.lock() {
            m.clear();
        }
    }

    /// Records one call of `method` (the backend does, once per call whatever its retries).
    pub fn add(&self, method: &str) {
        if let Ok(mut m) = self.counts.lock() {
            *m.entry(method.to_string()).or_insert(0) += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_counts() {
        let a = CallCounter::new();
        let b = a.clone();
        a.add("resize");
        b.add("resize");
        b.add("get");
        assert_eq!(a.get("resize"), 2);
        assert_eq!(a.total(), 3);
        assert_eq!(b.snapshot().get("get"), Some(&1));
        a.reset();
        assert_eq!(b.total(), 0);
    }
}
