//! Watch requests: a chunked stream of one JSON event per line, from the
//! version asked for, with selectors applied the way the real watch cache
//! applies them, BOOKMARKs, 410 for compacted versions, timeoutSeconds,
//! and an abrupt end on [`super::KubeApi::break_watches`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::Shared;
use super::http;
use super::kinds::KINDS;
use super::list::Selection;
use super::query::Query;
use super::status::Failure;
use super::store::{Change, Event, Object};

/// How a watch request ended, for the connection that carried it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The stream ended cleanly (timeout, 410): the connection may serve
    /// another request.
    Cleanly,
    /// Dropped (break_watches) or the client went away: close it.
    Dropped,
}

/// Where a watch starts.
enum Start {
    /// Events after this version, first `initial` as ADDED (then, when
    /// `initial_end`, a BOOKMARK marking their end).
    At {
        position: u64,
        initial: Vec<Arc<Object>>,
        initial_end: bool,
    },
    /// The version asked for was compacted away.
    Expired { asked: u64, oldest: u64 },
}

/// Checks the options; a failure is answered as a plain error response,
/// as the real server does before a watch starts.
fn validate(query: &Query) -> Result<(), Failure> {
    let version_match = query.non_empty("resourceVersionMatch");
    let send_initial = query.get("sendInitialEvents").is_some();
    if send_initial && version_match != Some("NotOlderThan") {
        return Err(Failure::invalid_options(
            "resourceVersionMatch",
            "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    if let Some(m) = version_match {
        if !send_initial {
            return Err(Failure::invalid_options(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if m != "NotOlderThan" {
            return Err(Failure::invalid_options(
                "resourceVersionMatch",
                &format!("unsupported value {m:?}: supported values: \"NotOlderThan\""),
            ));
        }
    }
    if let Some(v) = query.non_empty("resourceVersion") {
        v.parse::<u64>().map_err(|_| {
            Failure::bad_request(format!(
                "resourceVersion {v:?} is invalid: it must be a non-negative integer"
            ))
        })?;
    }
    if let Some(t) = query.non_empty("timeoutSeconds") {
        t.parse::<u64>().map_err(|_| {
            Failure::bad_request(format!(
                "timeoutSeconds {t:?} is not a non-negative integer"
            ))
        })?;
    }
    Ok(())
}

/// Serves one watch on `writer`; `reader` is watched for the client
/// closing the connection.
pub(crate) async fn serve<R, W>(
    shared: &Shared,
    kind: usize,
    selection: Selection,
    query: &Query,
    reader: &mut R,
    writer: &mut W,
) -> io::Result<Ended>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Err(failure) = validate(query) {
        http::respond(writer, failure.code, &failure.json()).await?;
        return Ok(Ended::Cleanly);
    }
    let bookmarks_allowed = query.flag("allowWatchBookmarks");
    let send_initial = query
        .get("sendInitialEvents")
        .map(|_| query.flag("sendInitialEvents"));
    let asked = query
        .non_empty("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v > 0);
    let timeout = query
        .non_empty("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);

    // Subscribe before reading the store, so no change falls in between.
    let mut changes = shared.changes.subscribe();
    let mut breaks = shared.breaks.subscribe();
    let mut bookmark_every = shared.bookmarks.subscribe();
    changes.borrow_and_update();
    breaks.borrow_and_update();

    let (start, id) = {
        let mut store = shared.store();
        let current = store.resource_version();
        let start = match (send_initial, asked) {
            // The legacy "state, then changes", and sendInitialEvents=true.
            (None, None) | (Some(true), _) => Start::At {
                position: current,
                initial: store
                    .snapshot(kind, None)
                    .map(|objects| {
                        objects
                            .values()
                            .filter(|o| selection.matches(o))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default(),
                initial_end: send_initial == Some(true) && bookmarks_allowed,
            },
            (Some(false), None) => Start::At {
                position: current,
                initial: Vec::new(),
                initial_end: false,
            },
            (_, Some(asked)) if asked < store.compacted() => Start::Expired {
                asked,
                oldest: store.compacted(),
            },
            (_, Some(asked)) => Start::At {
                position: asked,
                initial: Vec::new(),
                initial_end: false,
            },
        };
        let id = match &start {
            Start::At { position, .. } => Some(store.open_watch(*position)),
            Start::Expired { .. } => None,
        };
        (start, id)
    };
    let _open = id.map(|id| OpenWatch::new(shared, id));

    let mut out = http::stream_head();
    let mut position = match start {
        Start::Expired { asked, oldest } => {
            // As the watch cache answers: 200, then one ERROR event.
            let failure = Failure::expired(format!("too old resource version: {asked} ({oldest})"));
            event(&mut out, "ERROR", &failure.json());
            out.extend_from_slice(http::LAST_CHUNK);
            writer.write_all(&out).await?;
            return Ok(Ended::Cleanly);
        }
        Start::At {
            position,
            initial,
            initial_end,
        } => {
            for object in &initial {
                event(&mut out, "ADDED", &object.json);
            }
            if initial_end {
                event(&mut out, "BOOKMARK", &bookmark(kind, position, true));
            }
            position
        }
    };
    let Some(id) = id else {
        return Ok(Ended::Cleanly);
    };

    let deadline = timeout.map(|t| Instant::now() + t);
    let mut next_bookmark =
        next_bookmark_at(bookmarks_allowed, *bookmark_every.borrow_and_update());
    let mut scratch = [0u8; 512];
    loop {
        // A dropped watch sends nothing more, not even what changed
        // before it noticed.
        if breaks.has_changed().unwrap_or(true) {
            return Ok(Ended::Dropped);
        }
        // Everything that changed since the last look.
        let (events, upto) = shared.store().events_after(id, position);
        for e in events.iter().filter(|e| e.kind == kind) {
            if let Some((kind_of_event, json)) = as_seen(e, &selection) {
                event(&mut out, kind_of_event, &json);
            }
        }
        position = upto;
        if !out.is_empty() {
            let sent = tokio::select! {
                biased;
                _ = breaks.changed() => return Ok(Ended::Dropped),
                sent = writer.write_all(&out) => sent,
            };
            sent?;
            out.clear();
        }

        tokio::select! {
            biased;
            _ = breaks.changed() => return Ok(Ended::Dropped),
            _ = changes.changed() => {
                changes.borrow_and_update();
            }
            () = sleep_until(deadline) => {
                writer.write_all(http::LAST_CHUNK).await?;
                return Ok(Ended::Cleanly);
            }
            () = sleep_until(next_bookmark) => {
                // Caught up to `position` (just drained): say so.
                let (events, upto) = shared.store().events_after(id, position);
                for e in events.iter().filter(|e| e.kind == kind) {
                    if let Some((kind_of_event, json)) = as_seen(e, &selection) {
                        event(&mut out, kind_of_event, &json);
                    }
                }
                position = upto;
                event(&mut out, "BOOKMARK", &bookmark(kind, position, false));
                next_bookmark = next_bookmark_at(bookmarks_allowed, *bookmark_every.borrow());
            }
            changed = bookmark_every.changed() => {
                if changed.is_ok() {
                    next_bookmark = next_bookmark_at(bookmarks_allowed, *bookmark_every.borrow_and_update());
                }
            }
            read = reader.read(&mut scratch) => {
                // A client sends nothing while it watches: any read is
                // its end (or a protocol error).
                let _ = read;
                return Ok(Ended::Dropped);
            }
        }
    }
}

/// An open watch: counted while it lasts, and its history position freed
/// when it ends (however it ends, runtime shutdown included).
struct OpenWatch<'a> {
    shared: &'a Shared,
    id: u64,
}

impl<'a> OpenWatch<'a> {
    fn new(shared: &'a Shared, id: u64) -> OpenWatch<'a> {
        shared.watchers.fetch_add(1, Ordering::SeqCst);
        OpenWatch { shared, id }
    }
}

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        self.shared.store().close_watch(self.id);
        self.shared.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

fn next_bookmark_at(allowed: bool, every: Option<Duration>) -> Option<Instant> {
    every.filter(|_| allowed).map(|d| Instant::now() + d)
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

/// The event this watcher sees for `e`, as the watch cache filters: an
/// object that starts to match is ADDED, one that stops is DELETED (its
/// previous state at the change's version).
fn as_seen(e: &Event, selection: &Selection) -> Option<(&'static str, String)> {
    let now = selection.matches(&e.object);
    let before = e.previous.as_ref().is_some_and(|p| selection.matches(p));
    match e.change {
        Change::Added if now => Some(("ADDED", e.object.json.clone())),
        Change::Deleted if now => Some(("DELETED", e.object.json.clone())),
        Change::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", e.object.json.clone())),
            (false, true) => Some(("ADDED", e.object.json.clone())),
            (true, false) => e.previous.as_ref().map(|p| ("DELETED", p.json_at(e.rv))),
            (false, false) => None,
        },
        Change::Added | Change::Deleted => None,
    }
}

/// A BOOKMARK's object: the kind with only its resourceVersion (and the
/// annotation that ends the initial events of sendInitialEvents).
fn bookmark(kind: usize, rv: u64, initial_end: bool) -> String {
    let spec = &KINDS[kind];
    let annotations = if initial_end {
        ",\"annotations\":{\"k8s.io/initial-events-end\":\"true\"}"
    } else {
        ""
    };
    format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\"{annotations}}}}}",
        spec.kind,
        spec.api_version()
    )
}

/// Appends one event line as one chunk.
fn event(out: &mut Vec<u8>, kind_of_event: &str, object: &str) {
    let line = format!("{{\"type\":\"{kind_of_event}\",\"object\":{object}}}\n");
    http::chunk(out, line.as_bytes());
}
