//! The hashing pool: the threads that serve the requests whose handler hashes or checks a
//! password (`routes::hashes_password`: login, registration). A check takes tens of
//! milliseconds of a core (argon2id); served by the writers, a flood of failed logins held
//! every writer and a user's key write waited seconds behind it. Here they wait in a pool of
//! their own, one thread per hashing slot (`auth::hash_slots`, one per core), each with its own
//! database connection (a login's session and a registration's account still go through group
//! commit), behind a bounded queue: when `QUEUE` requests already wait, the reader answers 503
//! `busy` with `Retry-After` at once. A flood of logins then slows logins only.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use super::api::ApiError;
use crate::app::App;
use crate::store::Store;

/// Most requests waiting for a hashing thread (each thread's own request apart). A full queue
/// is a second or more of work for every thread: a later request is refused rather than kept
/// waiting longer, its connection's thread holding it the while.
const QUEUE: usize = 64;

/// `QUEUE`, or in debug builds only `KEYRACK_TEST_HASH_QUEUE` (a positive number), so the test
/// suite fills the queue with a few requests. Release builds ignore it.
fn queue_capacity() -> usize {
    crate::config::test_switch_positive("HASH_QUEUE").unwrap_or(QUEUE)
}

/// The readers' end of the pool's queue.
#[derive(Clone)]
pub(super) struct Pool {
    to: SyncSender<tiny_http::Request>,
    threads: Arc<Threads>,
}

/// The pool's threads, started at the first request that needs them (a harness that never
/// logs in never pays for them).
pub(super) struct Threads {
    started: Once,
    app: Arc<App>,
    from: Arc<Mutex<Receiver<tiny_http::Request>>>,
    slots: usize,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Threads {
    /// Starts the threads once; whether any runs.
    fn ensure(&self) -> bool {
        self.started
            .call_once(|| match start(&self.app, self.from.clone(), self.slots) {
                Ok(handles) => {
                    *self.handles.lock().unwrap_or_else(PoisonError::into_inner) = handles
                }
                Err(e) => log::warn!("cannot start the password hashing threads: {e}"),
            });
        !self
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Waits for the threads to end (once every `Pool` is dropped and the queue is empty).
    pub(super) fn join(&self) {
        let handles =
            std::mem::take(&mut *self.handles.lock().unwrap_or_else(PoisonError::into_inner));
        for h in handles {
            let _ = h.join();
        }
    }
}

/// The pool's queue, made before the ready line (a login may come first), and its threads,
/// `slots` of them once the first request for them comes.
pub(super) fn queue(app: &Arc<App>, slots: usize) -> (Pool, Arc<Threads>) {
    let (to, from) = mpsc::sync_channel(queue_capacity());
    let threads = Arc::new(Threads {
        started: Once::new(),
        app: app.clone(),
        from: Arc::new(Mutex::new(from)),
        slots,
        handles: Mutex::new(Vec::new()),
    });
    (
        Pool {
            to,
            threads: threads.clone(),
        },
        threads,
    )
}

/// Starts `slots` threads on the queue, each opening its connection at its first request. The
/// threads end once every `Pool` is dropped and the queue is empty.
fn start(
    app: &Arc<App>,
    from: Arc<Mutex<Receiver<tiny_http::Request>>>,
    slots: usize,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    (0..slots)
        .map(|i| {
            let from = from.clone();
            let app = app.clone();
            thread::Builder::new()
                .name(format!("hasher-{i}"))
                .spawn(move || {
                    let mut store: Option<Store> = None;
                    loop {
                        let next = from.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(rq) = next else { return };
                        crate::metrics::hash_queue(-1);
                        super::serve_on(&app, &mut store, rq);
                    }
                })
        })
        .collect()
}

impl Pool {
    /// Queues `rq` for a hashing thread, or answers it 503 `busy` when the queue is full.
    /// Gives it back only when no hashing thread is left (one died): the caller serves it.
    pub(super) fn offer(&self, rq: tiny_http::Request) -> Option<tiny_http::Request> {
        if !self.threads.ensure() {
            return Some(rq);
        }
        crate::metrics::hash_queue(1);
        match self.to.try_send(rq) {
            Ok(()) => None,
            Err(TrySendError::Full(rq)) => {
                crate::metrics::hash_queue(-1);
                refuse_busy(rq);
                None
            }
            Err(TrySendError::Disconnected(rq)) => {
                crate::metrics::hash_queue(-1);
                Some(rq)
            }
        }
    }
}

/// Answers 503 `busy` with `Retry-After` without reading further, counted and logged as any
/// answer.
fn refuse_busy(rq: tiny_http::Request) {
    let start = Instant::now();
    let _request = crate::logging::begin_request();
    let method = rq.method().clone();
    let url = rq.url().to_owned();
    let route = super::routes::route_index(url.split_once('?').map_or(url.as_str(), |(p, _)| p));
    let reply = ApiError::new(
        503,
        "busy",
        "too many logins and registrations are waiting; try again in a moment",
    )
    .with_header("Retry-After", "1".into())
    .into_reply();
    super::answer(rq, reply, method, url, route, start);
}
