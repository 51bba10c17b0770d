//! Which Node passes go first in a scale-up, and which wait for the launches.
//!
//! A launch (a Node that names a NodeClass and has no machine yet) needs no API write, and
//! on a real cloud every second before it is a second of pending pods. Everything else a
//! scale-up asks of this controller is bookkeeping: the token's Secret and the providerID
//! after a launch, the Ready transition after a kubelet joins. So:
//!
//! * launches take their turns apart from other passes, and never queue behind bookkeeping;
//! * while launches are in flight or waiting, a bookkeeping pass is set aside here, holding
//!   no turn, no worker and no timer of its own, and is sent back to the queue once the
//!   launches are done, or after [`BOOKKEEPING_MAX_WAIT`] at most (a Node whose kubelet is
//!   Ready must not keep its unregistered taint through a long run of launches).
//!
//! A Node being deleted never waits: a scale-down must not be held by a scale-up elsewhere.
//!
//! Passes other than launches take [`Turns`], first come, first served. A pass that finds no
//! turn free is queued here and returns at once: waiting inside kube-runtime, it would hold
//! one of kube-runtime's slots, and once those are full kube-runtime parks new requests in a
//! hash set and starts them in hash order — a new Node's launch among them, for many seconds
//! after a scale-up, behind a thousand passes each waiting on a saturated API server.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;
use kube_node_runtime::CachedNode;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The longest a bookkeeping pass waits for launches.
pub(crate) const BOOKKEEPING_MAX_WAIT: Duration = Duration::from_secs(10);

/// How often the set-aside passes are looked at (and the launches counted, see
/// `Context::launches_in_flight`).
pub(crate) const WAKE_INTERVAL: Duration = Duration::from_millis(100);

/// A set-aside pass whose Node left the cache is forgotten after this long.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// How long a turn handed to a queued pass is kept for it: its pass starts within
/// milliseconds of the trigger; one that never comes (its Node is gone) must not keep it.
const RESERVED_FOR: Duration = Duration::from_secs(2);

/// The look a queued pass asks for, should its trigger be lost.
pub(crate) const QUEUED_RECHECK: Duration = Duration::from_secs(60);

/// Which turn a pass takes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// The pass may launch a machine.
    Launch,
    /// Any other pass that may run now.
    Other,
    /// Set aside for the launches; the pass asks to be looked at again after this at most
    /// (the waker sends it back sooner).
    Wait(Duration),
}

struct SetAside {
    node: ObjectRef<CachedNode>,
    since: Instant,
    /// Sent back to the queue: its next pass runs, whatever the launches do by then.
    released: bool,
}

/// Bookkeeping passes set aside while launches are in flight, by Node UID.
#[derive(Default)]
pub(crate) struct Deferred(Mutex<HashMap<String, SetAside>>);

impl Deferred {
    /// Whether the bookkeeping pass of the Node `uid` / `name` waits, given whether launches
    /// are in flight: `Some(longest wait left)`, or `None` to run now (and forget it).
    pub(crate) fn hold(
        &self,
        uid: &str,
        name: &str,
        launching: bool,
        now: Instant,
    ) -> Option<Duration> {
        let Ok(mut set) = self.0.lock() else {
            return None;
        };
        if let Some(e) = set.get(uid)
            && (e.released || now.saturating_duration_since(e.since) >= BOOKKEEPING_MAX_WAIT)
        {
            set.remove(uid);
            return None;
        }
        if !launching {
            set.remove(uid);
            return None;
        }
        let e = set.entry(uid.to_string()).or_insert_with(|| SetAside {
            node: ObjectRef::new(name),
            since: now,
            released: false,
        });
        Some(BOOKKEEPING_MAX_WAIT.saturating_sub(now.saturating_duration_since(e.since)))
    }

    /// Forgets the Node `uid` (it runs now, whatever the launches do).
    pub(crate) fn forget(&self, uid: &str) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(uid);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.lock().map(|s| s.is_empty()).unwrap_or(true)
    }

    /// The set-aside passes due now, each released once: all of them when no launch is in
    /// flight, else those that waited [`BOOKKEEPING_MAX_WAIT`].
    pub(crate) fn due(&self, launching: bool, now: Instant) -> Vec<ObjectRef<CachedNode>> {
        let Ok(mut set) = self.0.lock() else {
            return Vec::new();
        };
        // A released pass that never ran: its Node is gone.
        set.retain(|_, e| !e.released || now.saturating_duration_since(e.since) < FORGET_AFTER);
        set.values_mut()
            .filter(|e| {
                !e.released
                    && (!launching
                        || now.saturating_duration_since(e.since) >= BOOKKEEPING_MAX_WAIT)
            })
            .map(|e| {
                e.released = true;
                e.node.clone()
            })
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map(|s| s.len()).unwrap_or_default()
    }
}

/// The turns of passes other than launches, handed out in order (see the module docs).
pub(crate) struct Turns {
    permits: Arc<Semaphore>,
    queue: Mutex<Queue>,
    wake: Notify,
}

#[derive(Default)]
struct Queue {
    /// Passes waiting for a turn, in the order they came, by Node UID.
    waiting: VecDeque<(String, ObjectRef<CachedNode>)>,
    queued: HashSet<String>,
    /// Turns handed to queued passes whose trigger was sent, with when.
    reserved: HashMap<String, (OwnedSemaphorePermit, Instant)>,
}

impl Turns {
    pub(crate) fn new(turns: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(turns.max(1))),
            queue: Mutex::default(),
            wake: Notify::new(),
        }
    }

    /// A turn for the pass of the Node `uid` / `name` now, or `None`: the pass is queued, and
    /// sent back through [`Turns::dispatch`] with a turn kept for it.
    pub(crate) fn enter(&self, uid: &str, name: &str) -> Option<OwnedSemaphorePermit> {
        let Ok(mut q) = self.queue.lock() else {
            return None;
        };
        if let Some((turn, _)) = q.reserved.remove(uid) {
            return Some(turn);
        }
        // No overtaking: while passes are queued, a new one queues behind them.
        if q.waiting.is_empty()
            && let Ok(turn) = self.permits.clone().try_acquire_owned()
        {
            return Some(turn);
        }
        if q.queued.insert(uid.to_string()) {
            q.waiting.push_back((uid.to_string(), ObjectRef::new(name)));
        }
        drop(q);
        self.wake.notify_one();
        None
    }

    /// Ends the turns: queued passes are not sent back, and `dispatch` returns.
    pub(crate) fn close(&self) {
        self.permits.close();
        self.wake.notify_one();
    }

    /// Hands each freed turn to the first queued pass and sends that pass back through `send`
    /// (the controller's trigger). Returns once the turns are closed.
    pub(crate) async fn dispatch(&self, send: impl Fn(ObjectRef<CachedNode>)) {
        loop {
            let front = {
                let Ok(mut q) = self.queue.lock() else {
                    return;
                };
                q.reserved.retain(|_, (_, at)| at.elapsed() < RESERVED_FOR);
                q.waiting.front().map(|(uid, _)| uid.clone())
            };
            if self.permits.is_closed() {
                return;
            }
            let Some(uid) = front else {
                // Nothing queued: wait for a pass to queue (or a moment, to let unclaimed
                // turns go).
                let _ = tokio::time::timeout(RESERVED_FOR, self.wake.notified()).await;
                continue;
            };
            // A turn, or a moment later the unclaimed ones let go and a new look.
            let turn =
                match tokio::time::timeout(RESERVED_FOR / 4, self.permits.clone().acquire_owned())
                    .await
                {
                    Err(_) => continue,
                    Ok(Err(_)) => return,
                    Ok(Ok(turn)) => turn,
                };
            let node = {
                let Ok(mut q) = self.queue.lock() else {
                    return;
                };
                match q.waiting.pop_front() {
                    Some((u, node)) if u == uid => {
                        q.queued.remove(&u);
                        q.reserved.insert(u, (turn, Instant::now()));
                        node
                    }
                    // Only this task takes from the front.
                    other => {
                        if let Some(o) = other {
                            q.waiting.push_front(o);
                        }
                        continue;
                    }
                }
            };
            send(node);
        }
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queue
            .lock()
            .map(|q| q.waiting.len())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the dispatcher of `turns`; what it sends back arrives on the receiver.
    fn dispatching(
        turns: &Arc<Turns>,
    ) -> (
        tokio::sync::mpsc::UnboundedReceiver<ObjectRef<CachedNode>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let turns = turns.clone();
        let dispatcher = tokio::spawn(async move {
            turns
                .dispatch(move |n| {
                    let _ = tx.send(n);
                })
                .await;
        });
        (rx, dispatcher)
    }

    #[tokio::test]
    async fn queued_passes_get_freed_turns_in_order_and_new_ones_do_not_overtake() {
        let turns = Arc::new(Turns::new(1));
        let first = turns.enter("u0", "n0").expect("a free turn");
        // No turn left: queued, in order.
        assert!(turns.enter("u1", "n1").is_none());
        assert!(turns.enter("u2", "n2").is_none());
        // Queued once, however often its pass comes.
        assert!(turns.enter("u1", "n1").is_none());
        assert_eq!(turns.queued(), 2);
        let (mut rx, dispatcher) = dispatching(&turns);
        drop(first);
        assert_eq!(rx.recv().await, Some(ObjectRef::new("n1")));
        // The freed turn is kept for n1: a newcomer does not get it, and queues behind n2.
        assert!(turns.enter("u3", "n3").is_none());
        let second = turns.enter("u1", "n1").expect("the turn kept for n1");
        drop(second);
        assert_eq!(rx.recv().await, Some(ObjectRef::new("n2")));
        let third = turns.enter("u2", "n2").expect("the turn kept for n2");
        drop(third);
        assert_eq!(rx.recv().await, Some(ObjectRef::new("n3")));
        turns.close();
        dispatcher.await.expect("dispatcher ends once closed");
    }

    #[tokio::test]
    async fn a_turn_kept_for_a_pass_that_never_comes_is_let_go() {
        let turns = Arc::new(Turns::new(1));
        let first = turns.enter("u0", "n0").expect("a free turn");
        assert!(turns.enter("gone", "gone").is_none());
        let (mut rx, dispatcher) = dispatching(&turns);
        drop(first);
        assert_eq!(rx.recv().await, Some(ObjectRef::new("gone")));
        // Its Node is gone and its pass never comes; the next one gets the turn in time.
        assert!(turns.enter("u1", "n1").is_none());
        let next = tokio::time::timeout(RESERVED_FOR * 4, rx.recv()).await;
        assert_eq!(next.ok().flatten(), Some(ObjectRef::new("n1")));
        assert!(turns.enter("u1", "n1").is_some());
        turns.close();
        dispatcher.await.expect("dispatcher ends once closed");
    }

    #[test]
    fn bookkeeping_waits_for_launches_and_runs_once_they_are_done() {
        let d = Deferred::default();
        let t0 = Instant::now();
        // No launch in flight: it runs, and nothing is kept.
        assert_eq!(d.hold("u1", "n1", false, t0), None);
        assert!(d.is_empty());
        // Launches in flight: set aside, with the whole wait left.
        assert_eq!(d.hold("u1", "n1", true, t0), Some(BOOKKEEPING_MAX_WAIT));
        // Asked again later, the wait left shrinks: it counts from the first time.
        let t1 = t0 + Duration::from_secs(4);
        assert_eq!(
            d.hold("u1", "n1", true, t1),
            Some(BOOKKEEPING_MAX_WAIT - Duration::from_secs(4))
        );
        // While launches go on nothing is due.
        assert!(d.due(true, t1).is_empty());
        // Once they are done, the pass is sent back, once.
        let due = d.due(false, t1);
        assert_eq!(due, vec![ObjectRef::new("n1")]);
        assert!(d.due(false, t1).is_empty());
        // Its next pass runs even if launches started again meanwhile.
        assert_eq!(d.hold("u1", "n1", true, t1), None);
        assert!(d.is_empty());
    }

    #[test]
    fn bookkeeping_waits_no_longer_than_the_limit() {
        let d = Deferred::default();
        let t0 = Instant::now();
        assert!(d.hold("u1", "n1", true, t0).is_some());
        let t1 = t0 + Duration::from_secs(5);
        assert!(d.hold("u2", "n2", true, t1).is_some());
        // Launches never stop: the first is due at the limit, the second not yet.
        let at_limit = t0 + BOOKKEEPING_MAX_WAIT;
        assert_eq!(d.due(true, at_limit), vec![ObjectRef::new("n1")]);
        // A pass that comes at the limit by itself (its requeue) runs too.
        assert_eq!(d.hold("u2", "n2", true, t1 + BOOKKEEPING_MAX_WAIT), None);
    }

    #[test]
    fn a_released_pass_whose_node_is_gone_is_forgotten() {
        let d = Deferred::default();
        let t0 = Instant::now();
        assert!(d.hold("u1", "n1", true, t0).is_some());
        assert_eq!(d.due(false, t0).len(), 1);
        assert_eq!(d.len(), 1);
        assert!(d.due(false, t0 + FORGET_AFTER).is_empty());
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn forget_runs_the_next_pass_at_once() {
        let d = Deferred::default();
        let t0 = Instant::now();
        assert!(d.hold("u1", "n1", true, t0).is_some());
        d.forget("u1");
        assert!(d.is_empty());
    }
}
