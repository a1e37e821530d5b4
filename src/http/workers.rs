//! The two pools of worker threads, started as they are needed rather than before the ready
//! line: one reader at first; a reader that takes a request while no other reader waits starts
//! one more, and a write that finds no writer waiting starts a writer, each pool up to its
//! setting (`KEYRACK_WORKERS`, `KEYRACK_WRITE_WORKERS`). A worker opens its database
//! connection at its first request (the first one gets the start-up's connection). Under load
//! the pools reach their full size within the first requests; a server that is started, used a
//! little and stopped (a test harness) never pays for threads and connections it does not use.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use tiny_http::Server;

use super::{hashing, serve_on};
use crate::app::App;
use crate::store::Store;

/// Threads of one kind, started one at a time up to `max`.
struct Pool {
    name: &'static str,
    max: usize,
    /// Threads waiting for work right now.
    idle: AtomicUsize,
    threads: Mutex<Threads>,
}

#[derive(Default)]
struct Threads {
    handles: Vec<JoinHandle<()>>,
    /// No thread starts once the pool is closed (at shutdown).
    closed: bool,
}

impl Pool {
    fn new(name: &'static str, max: usize) -> Pool {
        Pool {
            name,
            max,
            idle: AtomicUsize::new(0),
            threads: Mutex::default(),
        }
    }

    /// Starts one more thread running `body`, unless `max` run already or the pool is closed.
    fn grow(&self, body: impl FnOnce() + Send + 'static) {
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        if threads.closed || threads.handles.len() >= self.max {
            return;
        }
        let name = format!("{}-{}", self.name, threads.handles.len());
        match thread::Builder::new().name(name).spawn(body) {
            Ok(h) => threads.handles.push(h),
            Err(e) => log::warn!("cannot start another {} thread: {e}", self.name),
        }
    }

    fn size(&self) -> usize {
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handles
            .len()
    }

    /// Runs `wait` counted as idle.
    fn waiting<T>(&self, wait: impl FnOnce() -> T) -> T {
        self.idle.fetch_add(1, SeqCst);
        let got = wait();
        self.idle.fetch_sub(1, SeqCst);
        got
    }

    /// Starts no thread from now on; the threads started so far.
    fn close(&self) -> Vec<JoinHandle<()>> {
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.closed = true;
        std::mem::take(&mut threads.handles)
    }
}

/// What every worker shares.
pub(super) struct Workers {
    app: Arc<App>,
    server: Arc<Server>,
    readers: Pool,
    writers: Pool,
    /// The writers' one queue; every reader holds a sender, so the writers stop once every
    /// reader is gone and the queue is empty.
    writes: Mutex<Receiver<tiny_http::Request>>,
    /// The sender each new reader clones; dropped at shutdown.
    to_writers: Mutex<Option<Sender<tiny_http::Request>>>,
    /// The hashing pool's queue each new reader clones; dropped at shutdown.
    hashing: Mutex<Option<hashing::Pool>>,
}

impl Workers {
    /// The pools, and their first reader.
    pub(super) fn start(
        app: Arc<App>,
        server: Arc<Server>,
        readers: usize,
        writers: usize,
        hashing: hashing::Pool,
    ) -> Arc<Workers> {
        let (to_writers, writes) = mpsc::channel();
        let w = Arc::new(Workers {
            app,
            server,
            readers: Pool::new("worker", readers),
            writers: Pool::new("writer", writers),
            writes: Mutex::new(writes),
            to_writers: Mutex::new(Some(to_writers)),
            hashing: Mutex::new(Some(hashing)),
        });
        w.start_reader();
        w
    }

    fn start_reader(self: &Arc<Self>) {
        let Some(to_writers) = self
            .to_writers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return;
        };
        let Some(hashing) = self
            .hashing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return;
        };
        let w = self.clone();
        self.readers.grow(move || w.read(to_writers, hashing));
    }

    fn start_writer(self: &Arc<Self>) {
        let w = self.clone();
        self.writers.grow(move || w.write());
    }

    /// A reader: takes every request from the connections, serves the reads and passes the
    /// writes to the writers.
    fn read(self: Arc<Self>, to_writers: Sender<tiny_http::Request>, hashing: hashing::Pool) {
        let mut store = None;
        while let Ok(rq) = self.readers.waiting(|| self.server.recv()) {
            if self.readers.idle.load(SeqCst) == 0 {
                // Every other reader is busy: one more for the next request.
                self.start_reader();
            }
            // The writers take what may change something (the methods that are not safe, as
            // the connection's reader also counts them). A read that happens to write (a key
            // moved from the legacy column on read) stays here.
            if rq.method().is_safe() {
                self.serve(&mut store, rq);
                continue;
            }
            if super::hashes_password(&rq) {
                // Queued for the hashing pool, or answered 503 when its queue is full; served
                // here only if no hashing thread is left.
                if let Some(rq) = hashing.offer(rq) {
                    self.serve(&mut store, rq);
                }
                continue;
            }
            if self.writers.idle.load(SeqCst) == 0 {
                self.start_writer();
            }
            if self.writers.size() == 0 {
                // No writer could start: served here.
                self.serve(&mut store, rq);
            } else if let Err(mpsc::SendError(rq)) = to_writers.send(rq) {
                // No writer left (only if one died): served here.
                self.serve(&mut store, rq);
            }
        }
    }

    /// A writer: serves the writes the readers pass, until every reader is gone and the queue
    /// is empty.
    fn write(self: Arc<Self>) {
        let mut store = None;
        loop {
            let next = self.writers.waiting(|| {
                self.writes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .recv()
            });
            let Ok(rq) = next else { return };
            self.serve(&mut store, rq);
        }
    }

    fn serve(&self, store: &mut Option<Store>, rq: tiny_http::Request) {
        serve_on(&self.app, store, rq);
    }

    /// At shutdown, once the server stopped taking requests: every reader stops, then the
    /// writers answer what was passed to them and stop.
    pub(super) fn stop(&self) {
        let readers = self.readers.close();
        for _ in 0..readers.len() {
            self.server.unblock();
        }
        for r in readers {
            let _ = r.join();
        }
        self.to_writers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.hashing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for w in self.writers.close() {
            let _ = w.join();
        }
    }
}
