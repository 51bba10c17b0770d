//! A process-wide string interner for the strings thousands of cached objects repeat: label
//! and annotation keys and values, owner references, finalizers, condition types, reasons and
//! messages. Each distinct string is allocated once and shared as an `Arc<str>`.
//!
//! The table holds a strong reference to every string it has handed out, so a string no object
//! uses any more is one the table alone holds (`strong_count == 1`). Such strings are dropped in
//! one sweep when the table has grown to twice the number of strings that were live after the
//! previous sweep (and at least [`MIN_SWEEP`]): the table never holds more than about twice
//! the strings in use at their peak, however Nodes churn, and the sweeps cost amortized O(1)
//! per interned string.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

/// Below this many entries the table is never swept (sweeping a small table buys nothing).
const MIN_SWEEP: usize = 1024;

struct Table {
    strings: HashSet<Arc<str>>,
    /// How many strings were in use after the last sweep.
    live: usize,
}

impl Table {
    fn new() -> Self {
        Self {
            strings: HashSet::new(),
            live: 0,
        }
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        if self.strings.len() >= (2 * self.live).max(MIN_SWEEP) {
            self.sweep();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    /// Drops the strings only the table holds.
    fn sweep(&mut self) {
        self.strings.retain(|a| Arc::strong_count(a) > 1);
        self.live = self.strings.len();
        // The hash table's own memory follows the live set down too.
        if self.strings.capacity() > 4 * self.live.max(MIN_SWEEP) {
            self.strings.shrink_to(2 * self.live.max(MIN_SWEEP));
        }
    }
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| Mutex::new(Table::new()));

/// The shared copy of `s`.
pub(crate) fn intern(s: &str) -> Arc<str> {
    // A panic elsewhere while holding the lock leaves the table consistent (every operation on
    // it is a single HashSet call): keep using it.
    TABLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .intern(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_string_is_shared() {
        let mut t = Table::new();
        let a = t.intern("kubernetes.io/os");
        let b = t.intern("kubernetes.io/os");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "kubernetes.io/os");
    }

    /// Strings of objects that come and go (a Node's hostname label, its launch time) do not
    /// pile up: the table stays within twice the live strings (or the sweep minimum).
    #[test]
    fn the_table_stays_bounded_as_objects_churn() {
        let mut t = Table::new();
        let shared: Vec<Arc<str>> = (0..100).map(|i| t.intern(&format!("shared-{i}"))).collect();
        let mut held: Vec<Arc<str>> = Vec::new();
        for round in 0..50 {
            // 500 live unique strings at a time; the previous round's are dropped.
            held.clear();
            held.extend((0..500).map(|i| t.intern(&format!("node-{round}-{i}"))));
            let live = shared.len() + held.len();
            assert!(
                t.strings.len() <= (2 * live).max(MIN_SWEEP) + 1,
                "round {round}: {} entries for {live} live strings",
                t.strings.len()
            );
        }
        // Shared strings survive every sweep and are still the same allocation.
        assert!(Arc::ptr_eq(&shared[0], &t.intern("shared-0")));
    }
}
