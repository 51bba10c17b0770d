//! Process-wide interners for what thousands of cached objects repeat: strings (label and
//! annotation keys and values, owner references, finalizers, condition types, reasons and
//! messages) and compound values made of them (a label, a condition's text, an owner
//! reference). Each distinct value is allocated once and shared as an `Arc`.
//!
//! A table holds a strong reference to every value it has handed out, so a value no object
//! uses any more is one the table alone holds (`strong_count == 1`). Such values are dropped in
//! one sweep when the table has grown to twice the number of values that were live after the
//! previous sweep (and at least [`MIN_SWEEP`]): a table never holds more than about twice the
//! values in use at their peak, however Nodes churn, and the sweeps cost amortized O(1) per
//! interned value.
//!
//! Compound values are keyed by the addresses of their interned parts ([`Compound`]): an
//! interned string is the one allocation of its text while anything holds it, and the
//! compound value in the table holds its parts, so an address in a key cannot be reused by
//! another text while the key is in the table.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

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
        .unwrap_or_else(PoisonError::into_inner)
        .intern(s)
}

/// The address of an interned string, as part of a compound value's key.
pub(crate) fn addr(s: &Arc<str>) -> usize {
    Arc::as_ptr(s).cast::<u8>() as usize
}

/// The address of an optional interned string (0 for none).
pub(crate) fn opt_addr(s: &Option<Arc<str>>) -> usize {
    s.as_ref().map_or(0, addr)
}

/// A table of compound values made of interned strings, keyed by their parts' addresses.
pub(crate) struct Compound<K, T> {
    values: HashMap<K, Arc<T>>,
    live: usize,
}

impl<K: Hash + Eq, T> Compound<K, T> {
    pub(crate) fn new() -> Self {
        Self {
            values: HashMap::new(),
            live: 0,
        }
    }

    /// The shared value of key `key`, made by `make` (from the interned parts the key names)
    /// when there is none.
    pub(crate) fn intern(&mut self, key: K, make: impl FnOnce() -> T) -> Arc<T> {
        if let Some(v) = self.values.get(&key) {
            return v.clone();
        }
        if self.values.len() >= (2 * self.live).max(MIN_SWEEP) {
            self.values.retain(|_, v| Arc::strong_count(v) > 1);
            self.live = self.values.len();
            if self.values.capacity() > 4 * self.live.max(MIN_SWEEP) {
                self.values.shrink_to(2 * self.live.max(MIN_SWEEP));
            }
        }
        let v = Arc::new(make());
        self.values.insert(key, v.clone());
        v
    }
}

/// A process-wide [`Compound`] table.
pub(crate) type SharedTable<K, T> = LazyLock<Mutex<Compound<K, T>>>;

/// [`Compound::intern`] on a process-wide table.
pub(crate) fn intern_in<K: Hash + Eq, T>(
    table: &SharedTable<K, T>,
    key: K,
    make: impl FnOnce() -> T,
) -> Arc<T> {
    table
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .intern(key, make)
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

    #[test]
    fn compound_values_are_shared_and_swept() {
        let mut t: Compound<(usize, usize), (Arc<str>, Arc<str>)> = Compound::new();
        let mut strings = Table::new();
        let mut pair = |t: &mut Compound<_, _>, k: &str, v: &str| {
            let (k, v) = (strings.intern(k), strings.intern(v));
            t.intern((addr(&k), addr(&v)), || (k, v))
        };
        let a = pair(&mut t, "zone", "a");
        let b = pair(&mut t, "zone", "a");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &pair(&mut t, "zone", "b")));
        let mut held = Vec::new();
        for round in 0..20 {
            held.clear();
            held.extend((0..300).map(|i| pair(&mut t, "host", &format!("{round}-{i}"))));
            assert!(t.values.len() <= (2 * (held.len() + 1)).max(MIN_SWEEP) + 1);
        }
        assert!(Arc::ptr_eq(&a, &pair(&mut t, "zone", "a")));
    }
}
