//! keyrack patch: where a connection's responses go.
//!
//! The original wrote each response through a `BufWriter` straight into the socket from the
//! worker thread that handled the request, with a blocking write: a client that stops reading
//! its answers held that worker until the socket's write timeout, and with pipelining, every
//! worker that had one of its requests. Here a worker only ever writes into memory and then
//! sends what the socket takes at once (`MSG_DONTWAIT`); whatever the socket does not take is
//! left to the connection's own thread (`ResponseSink::deliver`), which writes it under the
//! write timeout before it reads the connection's next request. A client that does not read
//! holds its own connection's thread, and nothing else.
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
/// Past this many bytes waiting that the socket would not take, a write waits for the socket
/// (only a writer streaming a large body through `Request::into_writer` gets there; keyrack's
/// answers are far smaller).
const MAX_WAITING: usize = 1024 * 1024;
/// The buffer's room kept between responses.
const KEPT_ROOM: usize = 16 * 1024;

struct Inner {
    stream: RefinedTcpStream,
    /// Bytes written and not yet on the socket.
    waiting: Vec<u8>,
    /// The first error the socket gave; nothing more is written after it.
    failed: Option<IoError>,
    /// Called once `waiting` is empty (by `deliver`, on the connection's thread).
    on_delivered: Option<OnDelivered>,
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
            on_delivered: None,
            write_timeout,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After a response was written and flushed: calls `done` now when every byte has left
    /// (or the socket failed), else keeps it for `deliver`. Returns whether bytes are left.
    pub(crate) fn settle(&self, done: OnDeliveredOr) -> bool {
        let mut inner = self.lock();
        if inner.waiting.is_empty() || inner.failed.is_some() {
            let outcome = inner.outcome();
            drop(inner);
            done.call(outcome);
            false
        } else {
            inner.on_delivered = Some(done.boxed());
            true
        }
    }

    /// On the connection's thread, before it reads the next request: writes what the worker
    /// left, waiting for the socket (at most the write timeout in all), then tells the
    /// application. `false` when the connection cannot go on (the socket failed or timed out).
    pub(crate) fn deliver(&self) -> bool {
        let mut inner = self.lock();
        if !inner.waiting.is_empty() && inner.failed.is_none() {
            if let Err(e) = inner.write_waiting() {
                inner.failed = Some(e);
            }
        }
        let outcome = inner.outcome();
        let ok = outcome.is_ok();
        let done = inner.on_delivered.take();
        drop(inner);
        if let Some(done) = done {
            done(outcome);
        }
        ok
    }
}

/// A callback given by value (called at once in the common case, without an allocation) and
/// boxed only when it must wait for the connection's thread.
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
    fn boxed(self) -> OnDelivered {
        match self {
            OnDeliveredOr::Boxed(f) => f,
            OnDeliveredOr::Nothing => Box::new(|_| {}),
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

    fn wipe(&mut self) {
        self.waiting.zeroize();
        if self.waiting.capacity() > KEPT_ROOM {
            self.waiting = Vec::with_capacity(4096);
        }
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
            self.waiting[..sent].zeroize();
            self.waiting.drain(..sent);
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
        self.wipe();
        result
    }
}

impl Write for ResponseSink {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        let mut inner = self.lock();
        if inner.failed.is_some() {
            // The client is gone: what is written goes nowhere, as the original's ignored
            // errors of a closed socket did.
            return Ok(buf.len());
        }
        inner.waiting.extend_from_slice(buf);
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
