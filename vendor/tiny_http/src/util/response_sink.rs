//! keyrack patch: where a connection's responses go.
//!
//! The original wrote each response through a `BufWriter` straight into the socket from the
//! worker thread that handled the request, with a blocking write: a client that stops reading
//! its answers held that worker until the socket's write timeout, and with pipelining, every
//! worker that had one of its requests. Here a worker only ever writes into memory and then
//! sends what the socket takes at once (`MSG_DONTWAIT`); whatever the socket does not take is
//! written by a thread of its own, started for that answer (`ResponseSink::settle`), under the
//! write timeout. Only then is the connection told that the answer is done, and its next
//! request handed out. A client that does not read holds its own connection, and nothing else;
//! a client that reads costs nothing more than before (the connection's thread reads its next
//! request meanwhile, as it always did).
//!
//! "Delivered" means handed to the kernel whole: the socket's send buffer is bounded
//! (`ConnectionOptions::send_buffer`), so that is at most that much short of the client.
//!
//! The bytes of a response may carry secrets (keyrack reveals keys): the buffer is wiped once
//! its bytes have left, and shrunk back when a large response made it grow.

use std::io::{Error as IoError, ErrorKind, Result as IoResult, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use zeroize::Zeroize;

use crate::util::RefinedTcpStream;

/// What the application learns once a response has left, or failed to (see
/// `Request::respond_then`).
pub type OnDelivered = Box<dyn FnOnce(IoResult<()>) + Send + 'static>;

/// Past this many bytes waiting, a write tries the socket at once (without waiting).
const EARLY_SEND: usize = 64 * 1024;
/// Past this many bytes waiting that the socket would not take, a write waits for the socket,
/// so that a body read from a stream is not read into memory faster than the client takes it.
/// keyrack's answers are far smaller (a listing of the default thousand keys is 345 KB; one of
/// more than about 11,000 keys, with KEYRACK_MAX_KEYS_PER_USER raised, would get here).
const MAX_WAITING: usize = 4 * 1024 * 1024;
/// The buffer's room kept between responses.
const KEPT_ROOM: usize = 16 * 1024;

struct Inner {
    stream: RefinedTcpStream,
    /// Bytes written and not yet on the socket.
    waiting: Vec<u8>,
    /// The first error the socket gave; nothing more is written after it.
    failed: Option<IoError>,
    write_timeout: Option<Duration>,
}

/// The response side of one connection, shared by its requests (one at a time) and its thread.
#[derive(Clone)]
pub struct ResponseSink(Arc<Mutex<Inner>>);

impl ResponseSink {
    pub(crate) fn new(stream: RefinedTcpStream, write_timeout: Option<Duration>) -> ResponseSink {
        ResponseSink(Arc::new(Mutex::new(Inner {
            stream,
            waiting: Vec::with_capacity(4096),
            failed: None,
            write_timeout,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After a response was written and flushed: when every byte has left (or the socket
    /// failed), calls `answered` and then `done` here, at once. Otherwise a thread of its own
    /// writes the rest, waiting for the client under the write timeout, then calls `done`,
    /// closes the sending half when `close` is given (the answer closes the connection), and
    /// calls `answered`. Returns whether bytes were left to that thread.
    pub(crate) fn settle(
        &self,
        done: OnDeliveredOr,
        answered: impl FnOnce() + Send + 'static,
        close: Option<Arc<crate::connection::Connection>>,
    ) -> bool {
        {
            let mut inner = self.lock();
            if inner.waiting.is_empty() || inner.failed.is_some() {
                let outcome = inner.outcome();
                drop(inner);
                // The connection first: its next request may be waiting for this already.
                answered();
                done.call(outcome);
                return false;
            }
        }
        let sink = self.clone();
        let deliver = move || {
            let outcome = sink.deliver();
            done.call(outcome);
            if let Some(conn) = close {
                let _ = conn.shutdown(std::net::Shutdown::Write);
            }
            answered();
        };
        // A small stack: the thread only writes a buffer it does not copy.
        let spawned = std::thread::Builder::new()
            .name("tiny-http-deliver".into())
            .stack_size(64 * 1024)
            .spawn(deliver);
        if let Err(e) = spawned {
            // No thread to be had: this one waits for the client instead, as the original did.
            log::warn!("cannot start a thread to deliver an answer, writing it here: {e}");
            let mut inner = self.lock();
            if let Err(e) = inner.write_waiting() {
                inner.failed = Some(e);
            }
            inner.wipe();
        }
        true
    }

    /// Writes what is waiting, waiting for the socket (at most the write timeout in all);
    /// whether the answer left whole.
    fn deliver(&self) -> IoResult<()> {
        let mut inner = self.lock();
        if !inner.waiting.is_empty() && inner.failed.is_none() {
            if let Err(e) = inner.write_waiting() {
                inner.failed = Some(e);
            }
        }
        inner.outcome()
    }

    /// Whether the socket failed: the connection cannot go on.
    pub(crate) fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// On the connection's thread, for an answer it wrote itself (an error of the layer):
    /// writes what the socket did not take at once. `false` when the connection cannot go on.
    pub(crate) fn finish(&self) -> bool {
        self.deliver().is_ok()
    }
}

/// The application's callback, if it gave one.
pub(crate) enum OnDeliveredOr {
    Boxed(OnDelivered),
    Nothing,
}

impl OnDeliveredOr {
    pub(crate) fn call(self, outcome: IoResult<()>) {
        if let OnDeliveredOr::Boxed(f) = self {
            f(outcome)
        }
    }
}

impl Inner {
    /// Whether the last response left whole; the buffer is wiped either way.
    fn outcome(&mut self) -> IoResult<()> {
        self.wipe();
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(IoError::new(e.kind(), e.to_string())),
        }
    }

    /// Wipes the bytes written (the room past them never holds any: every byte moved or left
    /// behind is wiped where it was) and empties the buffer, shrunk back if it grew.
    fn wipe(&mut self) {
        self.waiting.as_mut_slice().zeroize();
        self.waiting.clear();
        if self.waiting.capacity() > KEPT_ROOM {
            self.waiting = Vec::with_capacity(4096);
        }
    }

    /// Adds `buf` to what waits. The buffer grows by hand: `Vec`'s own growth would free the
    /// old allocation with the answer's bytes still in it.
    fn append(&mut self, buf: &[u8]) {
        let needed = self.waiting.len() + buf.len();
        if needed > self.waiting.capacity() {
            let mut grown = Vec::with_capacity(needed.max(self.waiting.capacity() * 2));
            grown.extend_from_slice(&self.waiting);
            let mut old = std::mem::replace(&mut self.waiting, grown);
            old.as_mut_slice().zeroize();
        }
        self.waiting.extend_from_slice(buf);
    }

    /// Sends what the socket takes without waiting; the rest stays in `waiting`.
    fn send_now(&mut self) {
        let mut sent = 0;
        while sent < self.waiting.len() {
            match self.stream.write_now(&self.waiting[sent..]) {
                Ok(0) => {
                    self.failed = Some(ErrorKind::WriteZero.into());
                    break;
                }
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.failed = Some(e);
                    break;
                }
            }
        }
        if self.failed.is_some() {
            self.wipe();
        } else if sent > 0 {
            // The rest moves to the front; what it leaves behind is wiped.
            let len = self.waiting.len();
            self.waiting.copy_within(sent.., 0);
            self.waiting[len - sent..].zeroize();
            self.waiting.truncate(len - sent);
        }
    }

    /// Writes every waiting byte, waiting for the socket, within the write timeout in all.
    fn write_waiting(&mut self) -> IoResult<()> {
        let deadline = self.write_timeout.map(|t| Instant::now() + t);
        let mut sent = 0;
        let result = loop {
            if sent == self.waiting.len() {
                break self.stream.flush();
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Err(IoError::new(
                    ErrorKind::TimedOut,
                    "the client did not read its answer in time",
                ));
            }
            // Each write waits at most what is left of the timeout, not the whole of it again.
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                let _ = self.stream.set_write_timeout(Some(left));
            }
            match self.stream.write(&self.waiting[sent..]) {
                Ok(0) => break Err(ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    break Err(IoError::new(
                        ErrorKind::TimedOut,
                        "the client did not read its answer in time",
                    ))
                }
                Err(e) => break Err(e),
            }
        };
        if let Some(t) = self.write_timeout {
            let _ = self.stream.set_write_timeout(Some(t));
        }
        self.wipe();
        result
    }
}

impl Write for ResponseSink {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        let mut inner = self.lock();
        if let Some(e) = &inner.failed {
            // The client is gone: the writer learns it, and stops (`respond` ignores the
            // errors of a closed connection).
            return Err(IoError::new(e.kind(), e.to_string()));
        }
        inner.append(buf);
        if inner.waiting.len() >= EARLY_SEND {
            inner.send_now();
            if inner.waiting.len() >= MAX_WAITING {
                if let Err(e) = inner.write_waiting() {
                    inner.failed = Some(e);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> IoResult<()> {
        let mut inner = self.lock();
        if inner.failed.is_none() && !inner.waiting.is_empty() {
            inner.send_now();
        }
        Ok(())
    }
}
