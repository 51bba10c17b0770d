//! Watch streams: newline-delimited JSON watch events with selector
//! filtering, bookmarks, timeouts and the optional delivery lag.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::Inner;
use crate::resources::ResourceDef;
use crate::selector::{FieldSelector, LabelSelector};
use crate::service::{RespBody, render};
use crate::store::{Change, ChangeType, WatchMsg, WatchStart};
use crate::util::labels_of;

/// How often BOOKMARK events are sent when `allowWatchBookmarks=true`.
pub(crate) const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
const INITIAL_BATCH: usize = 200;

pub(crate) struct WatchOptions {
    pub namespace: Option<String>,
    pub label: LabelSelector,
    pub field: FieldSelector,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    pub meta_only: bool,
    /// Send a BOOKMARK with `k8s.io/initial-events-end` after the initial ADDED events.
    pub initial_events_end: bool,
}

#[derive(Serialize)]
struct Line<'a> {
    #[serde(rename = "type")]
    type_: &'a str,
    object: &'a Value,
}

struct WatchCtx {
    inner: Weak<Inner>,
    def: Arc<ResourceDef>,
    opts: WatchOptions,
    rx: Option<UnboundedReceiver<WatchMsg>>,
    initial: VecDeque<Arc<Value>>,
    initial_end_pending: bool,
    pending: VecDeque<Arc<Change>>,
    out: VecDeque<Bytes>,
    last_rv: u64,
    bookmark: Interval,
    deadline: Option<Instant>,
    done: bool,
}

enum Wake {
    Timeout,
    Ready,
    Bookmark,
    Msg(Option<WatchMsg>),
}

impl WatchCtx {
    fn lag(&self) -> Duration {
        self.inner
            .upgrade()
            .map(|i| i.watch_lag())
            .unwrap_or_default()
    }

    fn line(&self, type_: &str, obj: &Value, buf: &mut Vec<u8>) {
        let rendered = render(obj, &self.def, self.opts.meta_only);
        if serde_json::to_writer(
            &mut *buf,
            &Line {
                type_,
                object: &rendered,
            },
        )
        .is_ok()
        {
            buf.push(b'\n');
        }
    }

    fn bookmark_line(&self, rv: u64, initial_end: bool) -> Bytes {
        let (kind, api_version) = if self.opts.meta_only {
            ("PartialObjectMetadata", "meta.k8s.io/v1")
        } else {
            (self.def.kind.as_str(), self.def.api_version.as_str())
        };
        let mut md = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": kind, "apiVersion": api_version, "metadata": md});
        let mut buf = Vec::new();
        if serde_json::to_writer(
            &mut buf,
            &Line {
                type_: "BOOKMARK",
                object: &obj,
            },
        )
        .is_ok()
        {
            buf.push(b'\n');
        }
        Bytes::from(buf)
    }

    fn in_scope(&self, obj: &Value) -> bool {
        self.opts.label.matches(labels_of(obj)) && self.opts.field.matches(obj)
    }

    fn process(&mut self, c: &Change) {
        if c.rv <= self.last_rv {
            return;
        }
        self.last_rv = c.rv;
        if let Some(ns) = &self.opts.namespace
            && &c.namespace != ns
        {
            return;
        }
        let now = self.in_scope(&c.object);
        let type_ = match c.kind {
            ChangeType::Added => now.then_some("ADDED"),
            ChangeType::Deleted => {
                let before = c.old.as_deref().map(|o| self.in_scope(o)).unwrap_or(now);
                (now || before).then_some("DELETED")
            }
            ChangeType::Modified => {
                let before = c.old.as_deref().is_some_and(|o| self.in_scope(o));
                match (before, now) {
                    (true, true) => Some("MODIFIED"),
                    (true, false) => Some("DELETED"),
                    (false, true) => Some("ADDED"),
                    (false, false) => None,
                }
            }
        };
        if let Some(t) = type_ {
            let mut buf = Vec::new();
            self.line(t, &c.object, &mut buf);
            self.out.push_back(Bytes::from(buf));
        }
    }

    fn emit_bookmark(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            self.done = true;
            return;
        };
        if self.pending.is_empty() {
            // While holding the store lock no write can be in flight: if our
            // channel is empty we have seen every change up to the global RV.
            let state = inner.lock();
            if self.rx.as_ref().is_none_or(|rx| rx.is_empty()) {
                self.last_rv = self.last_rv.max(state.rv);
            }
        }
        let b = self.bookmark_line(self.last_rv, false);
        self.out.push_back(b);
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(b);
            }
            if !self.initial.is_empty() {
                let mut buf = Vec::new();
                for _ in 0..INITIAL_BATCH {
                    let Some(o) = self.initial.pop_front() else {
                        break;
                    };
                    self.line("ADDED", &o, &mut buf);
                }
                return Some(Bytes::from(buf));
            }
            if self.initial_end_pending {
                self.initial_end_pending = false;
                return Some(self.bookmark_line(self.last_rv, true));
            }
            if self.done {
                return None;
            }
            let lag = self.lag();
            let now = Instant::now();
            while let Some(head) = self.pending.front() {
                if head.at.checked_add(lag).is_none_or(|due| due > now) {
                    break;
                }
                if let Some(c) = self.pending.pop_front() {
                    self.process(&c);
                }
            }
            if !self.out.is_empty() {
                continue;
            }
            let head_deadline = self.pending.front().and_then(|c| c.at.checked_add(lag));
            let far = now.checked_add(Duration::from_secs(86_400)).unwrap_or(now);
            let wake = {
                let rx = self.rx.as_mut();
                let has_rx = rx.is_some();
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(self.deadline.unwrap_or(far)), if self.deadline.is_some() => Wake::Timeout,
                    _ = tokio::time::sleep_until(head_deadline.unwrap_or(far)), if head_deadline.is_some() => Wake::Ready,
                    _ = self.bookmark.tick(), if self.opts.bookmarks => Wake::Bookmark,
                    m = async move {
                        match rx {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    }, if has_rx => Wake::Msg(m),
                    else => Wake::Timeout,
                }
            };
            match wake {
                Wake::Timeout => self.done = true,
                Wake::Ready => {}
                Wake::Bookmark => self.emit_bookmark(),
                Wake::Msg(Some(WatchMsg::Change(c))) => self.pending.push_back(c),
                Wake::Msg(None) => {
                    // The resource went away (e.g. its CRD was deleted).
                    self.rx = None;
                    self.done = self.pending.is_empty();
                    if !self.done {
                        // Deliver what is pending, then end.
                        let lag = self.lag();
                        if let Some(last) = self.pending.back() {
                            self.deadline = last
                                .at
                                .checked_add(lag)
                                .and_then(|t| t.checked_add(Duration::from_millis(1)));
                        }
                    }
                }
            }
        }
    }
}

/// Build the streaming response body for a watch.
pub(crate) fn watch_body(
    inner: &Arc<Inner>,
    def: Arc<ResourceDef>,
    opts: WatchOptions,
    start: WatchStart,
) -> RespBody {
    let mut out = VecDeque::new();
    let mut done = false;
    if let Some(err) = &start.expired {
        let status = err.to_status();
        let mut buf = Vec::new();
        if serde_json::to_writer(
            &mut buf,
            &Line {
                type_: "ERROR",
                object: &status,
            },
        )
        .is_ok()
        {
            buf.push(b'\n');
        }
        out.push_back(Bytes::from(buf));
        done = true;
    }
    let mut bookmark =
        tokio::time::interval_at(Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
    bookmark.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let ctx = WatchCtx {
        inner: Arc::downgrade(inner),
        def,
        deadline: opts.timeout.and_then(|t| Instant::now().checked_add(t)),
        initial_end_pending: opts.initial_events_end && !done,
        opts,
        rx: start.rx,
        initial: start.initial.into(),
        pending: start.replay.into(),
        out,
        last_rv: start.start_rv,
        bookmark,
        done,
    };
    let stream = futures::stream::unfold(ctx, |mut ctx| async move {
        let chunk = ctx.next_chunk().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), ctx))
    })
    .boxed();
    StreamBody::new(stream).boxed_unsync()
}
