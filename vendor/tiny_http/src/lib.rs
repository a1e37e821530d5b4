//! # Simple usage
//!
//! ## Creating the server
//!
//! The easiest way to create a server is to call `Server::http()`.
//!
//! The `http()` function returns an `IoResult<Server>` which will return an error
//! in the case where the server creation fails (for example if the listening port is already
//! occupied).
//!
//! ```no_run
//! let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! ```
//!
//! A newly-created `Server` will immediately start listening for incoming connections and HTTP
//! requests.
//!
//! ## Receiving requests
//!
//! Calling `server.recv()` will block until the next request is available.
//! This function returns an `IoResult<Request>`, so you need to handle the possible errors.
//!
//! ```no_run
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//!
//! loop {
//!     // blocks until the next request is received
//!     let request = match server.recv() {
//!         Ok(rq) => rq,
//!         Err(e) => { println!("error: {}", e); break }
//!     };
//!
//!     // do something with the request
//!     // ...
//! }
//! ```
//!
//! In a real-case scenario, you will probably want to spawn multiple worker tasks and call
//! `server.recv()` on all of them. Like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::thread;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! let server = Arc::new(server);
//! let mut guards = Vec::with_capacity(4);
//!
//! for _ in (0 .. 4) {
//!     let server = server.clone();
//!
//!     let guard = thread::spawn(move || {
//!         loop {
//!             let rq = server.recv().unwrap();
//!
//!             // ...
//!         }
//!     });
//!
//!     guards.push(guard);
//! }
//! ```
//!
//! If you don't want to block, you can call `server.try_recv()` instead.
//!
//! ## Handling requests
//!
//! The `Request` object returned by `server.recv()` contains informations about the client's request.
//! The most useful methods are probably `request.method()` and `request.url()` which return
//! the requested method (`GET`, `POST`, etc.) and url.
//!
//! To handle a request, you need to create a `Response` object. See the docs of this object for
//! more infos. Here is an example of creating a `Response` from a file:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! ```
//!
//! All that remains to do is call `request.respond()`:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! # let request = server.recv().unwrap();
//! # let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! let _ = request.respond(response);
//! ```
// keyrack patch: `deny`, not `forbid`: the one `unsafe` block is the non-blocking `send` of
// `Connection::send_now`, allowed there alone.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::match_like_matches_macro)]

#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use zeroize::Zeroizing;

use std::error::Error;
use std::io::Error as IoError;
use std::io::ErrorKind as IoErrorKind;
use std::io::Result as IoResult;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use client::ClientConnection;
use connection::Connection;
use util::refined_tcp_stream::now_ms;
use util::MessagesQueue;

pub use common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
pub use connection::{ConfigListenAddr, ListenAddr, Listener};
pub use request::{ReadWrite, Request};
pub use response::{Response, ResponseBox};
pub use test::TestRequest;

mod client;
mod common;
mod connection;
mod request;
mod response;
mod ssl;
mod test;
mod util;

/// keyrack patch: limits applied to each accepted TCP connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectionOptions {
    /// Timeout of each read on the socket (the original had none, so a client that stopped
    /// sending held a thread for ever). Under the idle and head deadlines below, a read waits
    /// at most until the deadline.
    pub read_timeout: Option<Duration>,
    /// Timeout of each write on the socket.
    pub write_timeout: Option<Duration>,
    /// Most connections served at once (0: no limit); more wait in the listen backlog.
    pub max_connections: usize,
    /// Time a request head, and a body of up to 64 KiB read with it, may take to arrive,
    /// counted from its first byte; past it, 408 and the connection closes (None: no limit).
    pub head_timeout: Option<Duration>,
    /// Time a keep-alive connection may wait for the first byte of its next request; past it
    /// the connection closes without an answer (None: only the read timeout).
    pub idle_timeout: Option<Duration>,
    /// Header lines (each a whole `Name: value` line ending in CRLF, written as they are) added
    /// to every answer this crate writes itself, before any handler sees the request (its 400,
    /// 408, 414, 417, 431, 501 and 505), so that they carry the same headers as the
    /// application's answers (which add them with `Response::with_raw_head`).
    pub answer_head: &'static [u8],
    /// keyrack patch: the send buffer asked of each accepted socket (`SO_SNDBUF`; the kernel
    /// doubles it). Bounds what a client that does not read holds in the kernel, and how far an
    /// answer counted as delivered (handed to the kernel) can be from the client. None: the
    /// system's own (on Linux, growing to `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default).
    pub send_buffer: Option<usize>,
}

/// keyrack patch: the register of live connections: their number (for `max_connections`,
/// waited on without polling), and those that wait for a request or are reading one. A
/// graceful shutdown closes the waiting (idle) ones at once and waits for the others to finish.
/// At the cap, the accept thread closes the connection that has waited longest while idle, or
/// else the one that has spent longest on its head (past `EVICT_AFTER_MS`), so that a healthy
/// client is not kept in the backlog by slow ones until their deadline.
pub(crate) struct Tracker {
    state: Mutex<TrackerState>,
    changed: Condvar,
}

#[derive(Default)]
struct TrackerState {
    live: usize,
    next_id: u64,
    draining: bool,
    /// the accept thread waits for room at the cap (only then is a connection turning idle
    /// worth a wake-up: `notify_all` is a system call)
    accept_waits: bool,
    /// connection number → what it waits for, since when, and its socket
    waiting: HashMap<u64, Waiting>,
}

/// keyrack patch: a connection that waits for, or is reading, a request head.
struct Waiting {
    /// since when (`now_ms`): accepted, idle, or since the head's first byte
    since: u64,
    state: WaitState,
    conn: Arc<Connection>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WaitState {
    /// just accepted: its first request may already be in the socket, unread by its thread yet.
    /// Made room from only like a slow head (after `EVICT_AFTER_MS`); closed by a shutdown.
    Fresh,
    /// answered, waiting for its next request (keep-alive): made room from at once
    Idle,
    /// reading a head: made room from after `EVICT_AFTER_MS`; a shutdown lets it finish
    Head,
    /// waiting for its next request while the last one is still served: made room from after
    /// `EVICT_AFTER_MS` (closing only its reading half: the answer still goes out); a shutdown
    /// closes its reading half at once
    Busy,
    /// holding its next request until the last answer has left, the client not reading it:
    /// made room from after `EVICT_AFTER_MS` (closed both ways, so the writing stops); a
    /// shutdown lets it finish (under the write timeout)
    Answering,
}

/// keyrack patch: a connection reading its head for less than this is never closed to make room.
const EVICT_AFTER_MS: u64 = 1000;

impl Tracker {
    fn new() -> Arc<Tracker> {
        Arc::new(Tracker {
            state: Mutex::new(TrackerState::default()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection for as long as the guard lives; returns its number too.
    fn register(self: &Arc<Self>) -> (u64, LiveGuard) {
        let mut st = self.lock();
        st.live += 1;
        st.next_id += 1;
        (st.next_id, LiveGuard(self.clone()))
    }

    /// The connection waits for its next request, or for its first one when `accepted` (the
    /// `now_ms` of its accept) is given: false when the server is shutting down. Wakes the
    /// accept thread, which may be waiting at the cap for a connection to make room.
    pub(crate) fn enter_idle(
        &self,
        id: u64,
        accepted: Option<u64>,
        busy: bool,
        handle: Option<&Arc<Connection>>,
    ) -> bool {
        let mut st = self.lock();
        if st.draining {
            return false;
        }
        if let Some(h) = handle {
            // A fresh connection counts from its accept, so that one which sends nothing is made
            // room from after the same second as a slow head.
            let (since, state) = match accepted {
                Some(at) => (at, WaitState::Fresh),
                None if busy => (now_ms(), WaitState::Busy),
                None => (now_ms(), WaitState::Idle),
            };
            st.waiting.insert(id, Waiting { since, state, conn: h.clone() });
        }
        if st.accept_waits {
            self.changed.notify_all();
        }
        true
    }

    /// The connection holds its next request until its last answer has left.
    pub(crate) fn begin_answer(&self, id: u64, handle: Option<&Arc<Connection>>) {
        if let Some(h) = handle {
            let mut st = self.lock();
            st.waiting.insert(
                id,
                Waiting {
                    since: now_ms(),
                    state: WaitState::Answering,
                    conn: h.clone(),
                },
            );
            if st.accept_waits {
                self.changed.notify_all();
            }
        }
    }

    /// The first byte of a head has come.
    pub(crate) fn begin_head(&self, id: u64) {
        if let Some(w) = self.lock().waiting.get_mut(&id) {
            if w.state != WaitState::Fresh {
                w.since = now_ms();
            }
            w.state = WaitState::Head;
        }
    }

    /// The head (and a body read with it) is in, or the connection is done.
    pub(crate) fn forget(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }

    /// Blocks while `max` connections are live (0: never), until one ends or `stop` is set.
    /// Makes room by closing an idle or slow connection when there is one.
    fn wait_for_room(&self, max: usize, stop: &AtomicBool) {
        let mut st = self.lock();
        while max > 0 && st.live >= max && !st.draining && !stop.load(Relaxed) {
            let now = now_ms();
            let victim = st
                .waiting
                .iter()
                .filter(|(_, w)| w.state == WaitState::Idle || now.saturating_sub(w.since) >= EVICT_AFTER_MS)
                .min_by_key(|(_, w)| (w.state != WaitState::Idle, w.since))
                .map(|(id, _)| *id);
            if let Some(id) = victim {
                if let Some(w) = st.waiting.remove(&id) {
                    let how = match w.state {
                        WaitState::Answering => Shutdown::Both,
                        _ => Shutdown::Read,
                    };
                    let _ = w.conn.shutdown(how);
                }
            }
            // Woken when a connection ends or turns idle; a head may become old enough to
            // close meanwhile.
            st.accept_waits = true;
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(EVICT_AFTER_MS))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.accept_waits = false;
    }

    /// Closes the idle connections now, and every other one once it has been answered.
    fn drain(&self) {
        let mut st = self.lock();
        st.draining = true;
        st.waiting.retain(|_, w| {
            let waits = !matches!(w.state, WaitState::Head | WaitState::Answering);
            if waits {
                let _ = w.conn.shutdown(Shutdown::Read);
            }
            !waits
        });
        self.changed.notify_all();
    }

    /// Waits until no connection is left, at most `limit`; true when none is.
    fn wait_empty(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut st = self.lock();
        while st.live > 0 {
            let now = Instant::now();
            if now >= end {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn wake(&self) {
        let _st = self.lock();
        self.changed.notify_all();
    }
}

/// Counts a live connection for as long as it is held.
struct LiveGuard(Arc<Tracker>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.live -= 1;
        self.0.changed.notify_all();
    }
}

/// The main class of this library.
///
/// Destroying this object will immediately close the listening socket and the reading
///  part of all the client's connections. Requests that have already been returned by
///  the `recv()` function will not close and the responses will be transferred to the client.
pub struct Server {
    // should be false as long as the server exists
    // when set to true, all the subtasks will close within a few hundreds ms
    close: Arc<AtomicBool>,

    // queue for messages received by child threads
    messages: Arc<MessagesQueue<Message>>,

    // result of TcpListener::local_addr()
    listening_addr: ListenAddr,

    // keyrack patch: the live connections
    tracker: Arc<Tracker>,
}

enum Message {
    Error(IoError),
    NewRequest(Request),
}

impl From<IoError> for Message {
    fn from(e: IoError) -> Message {
        Message::Error(e)
    }
}

impl From<Request> for Message {
    fn from(rq: Request) -> Message {
        Message::NewRequest(rq)
    }
}

// this trait is to make sure that Server implements Share and Send
#[doc(hidden)]
#[allow(dead_code)]
trait MustBeShareDummy: Sync + Send {}
#[doc(hidden)]
impl MustBeShareDummy for Server {}

pub struct IncomingRequests<'a> {
    server: &'a Server,
}

/// Represents the parameters required to create a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The addresses to try to listen to.
    pub addr: ConfigListenAddr,

    /// If `Some`, then the server will use SSL to encode the communications.
    pub ssl: Option<SslConfig>,
}

/// Configuration of the server for SSL.
#[derive(Debug, Clone)]
pub struct SslConfig {
    /// Contains the public certificate to send to clients.
    pub certificate: Vec<u8>,
    /// Contains the ultra-secret private key used to decode communications.
    pub private_key: Vec<u8>,
}

impl Server {
    /// Shortcut for a simple server on a specific address.
    #[inline]
    pub fn http<A>(addr: A) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: None,
        })
    }

    /// Shortcut for an HTTPS server on a specific address.
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    #[inline]
    pub fn https<A>(
        addr: A,
        config: SslConfig,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: Some(config),
        })
    }

    #[cfg(unix)]
    #[inline]
    /// Shortcut for a UNIX socket server at a specific path
    pub fn http_unix(
        path: &std::path::Path,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::unix_from_path(path),
            ssl: None,
        })
    }

    /// Builds a new server that listens on the specified address.
    pub fn new(config: ServerConfig) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = config.addr.bind()?;
        Self::from_listener(listener, config.ssl)
    }

    /// Builds a new server using the specified TCP listener.
    ///
    /// This is useful if you've constructed TcpListener using some less usual method
    /// such as from systemd. For other cases, you probably want the `new()` function.
    pub fn from_listener<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Self::from_listener_with_options(listener, ssl_config, ConnectionOptions::default())
    }

    /// keyrack patch: like `from_listener`, with limits on each accepted connection.
    pub fn from_listener_with_options<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
        options: ConnectionOptions,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = listener.into();
        // building the "close" variable
        let close_trigger = Arc::new(AtomicBool::new(false));

        // building the TcpListener
        let (server, local_addr) = {
            let local_addr = listener.local_addr()?;
            log::debug!("Server listening on {}", local_addr);
            (listener, local_addr)
        };

        // building the SSL capabilities
        #[cfg(all(feature = "ssl-openssl", feature = "ssl-rustls"))]
        compile_error!(
            "Features 'ssl-openssl' and 'ssl-rustls' must not be enabled at the same time"
        );
        #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
        type SslContext = ();
        #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
        type SslContext = crate::ssl::SslContextImpl;
        let ssl: Option<SslContext> = {
            match ssl_config {
                #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                Some(config) => Some(SslContext::from_pem(
                    config.certificate,
                    Zeroizing::new(config.private_key),
                )?),
                #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                Some(_) => return Err(
                    "Building a server with SSL requires enabling the `ssl` feature in tiny-http"
                        .into(),
                ),
                None => None,
            }
        };

        // creating a task where server.accept() is continuously called
        // and ClientConnection objects are pushed in the messages queue
        let messages = MessagesQueue::with_capacity(8);

        let inside_close_trigger = close_trigger.clone();
        let inside_messages = messages.clone();
        let tracker = Tracker::new();
        let inside_tracker = tracker.clone();
        thread::spawn(move || {
            let tracker = inside_tracker;
            // a tasks pool is used to dispatch the connections into threads
            let tasks_pool = util::TaskPool::new();
            let mut backoff = Duration::from_millis(5);

            log::debug!("Running accept thread");
            while !inside_close_trigger.load(Relaxed) {
                // keyrack patch: bound the number of connections (and so of pool threads);
                // further clients wait in the listen backlog until one closes.
                tracker.wait_for_room(options.max_connections, &inside_close_trigger);
                if inside_close_trigger.load(Relaxed) {
                    break;
                }
                let accepted = server.accept().and_then(|(sock, _)| {
                    if let Connection::Tcp(tcp) = &sock {
                        tcp.set_nodelay(true).ok();
                        tcp.set_read_timeout(options.read_timeout)?;
                        tcp.set_write_timeout(options.write_timeout)?;
                        if let Some(size) = options.send_buffer {
                            sock.set_send_buffer(size);
                        }
                    }
                    Ok(sock)
                });
                let new_client = match accepted {
                    Ok(sock) => {
                        use util::RefinedTcpStream;
                        let pair = match ssl {
                            None => RefinedTcpStream::new(sock),
                            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                            Some(ref ssl) => {
                                // trying to apply SSL over the connection
                                // if an error occurs, we just close the socket and resume listening
                                let sock = match ssl.accept(sock) {
                                    Ok(s) => s,
                                    Err(_) => continue,
                                };

                                RefinedTcpStream::new(sock)
                            }
                            #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                            Some(ref _ssl) => unreachable!(),
                        };

                        pair.map(|(read_closable, write_closable)| {
                            let (id, live) = tracker.register();
                            let read_closable = read_closable.with_read_timeout(options.read_timeout);
                            let client = ClientConnection::new(
                                write_closable,
                                read_closable,
                                options,
                                tracker.clone(),
                                id,
                            );
                            (client, live)
                        })
                    }
                    Err(e) => Err(e),
                };

                if inside_close_trigger.load(Relaxed) {
                    break;
                }
                match new_client {
                    Ok((client, live)) => {
                        backoff = Duration::from_millis(5);
                        let messages = inside_messages.clone();
                        let mut client = Some((client, live));
                        tasks_pool.spawn(Box::new(move || {
                            if let Some((mut client, _live)) = client.take() {
                                // keyrack patch: one request of a connection at a time. The
                                // connection's thread reads the next request while the last
                                // one is served (as the original did), but hands it out only
                                // once the last one is answered and its answer has left (what
                                // the worker could not write at once is written by a thread of
                                // its own, waiting for the client under the write timeout,
                                // `util::response_sink`). What one connection has in flight is
                                // then one request and one answer: a client that pipelines
                                // without reading its answers fills its own socket, never a
                                // worker or the shared queue (RFC 9112 section 9.3.2 lets a
                                // server answer pipelined requests one by one). A client that
                                // waits for each answer never waits here. The original handed
                                // every pipelined request out at once, each worker then
                                // waiting, without a limit, for its turn to write.
                                while let Some(rq) = client.next() {
                                    if !client.await_answer() {
                                        break;
                                    }
                                    client.hand_out(rq, |rq| messages.push(rq.into()));
                                }
                                // The last answer is written before the connection goes.
                                client.await_answer();
                            }
                        }));
                    }

                    Err(e) => {
                        // keyrack patch: the original loop ended for good on the first error
                        // (for example EMFILE when descriptors run out). Wait a moment and go
                        // on accepting; the failed connection alone is lost.
                        log::warn!("Error accepting new client: {}", e);
                        thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(200));
                    }
                }
            }
            log::debug!("Terminating accept thread");
        });

        // result
        Ok(Server {
            messages,
            close: close_trigger,
            listening_addr: local_addr,
            tracker,
        })
    }

    /// Returns an iterator for all the incoming requests.
    ///
    /// The iterator will return `None` if the server socket is shutdown.
    #[inline]
    pub fn incoming_requests(&self) -> IncomingRequests<'_> {
        IncomingRequests { server: self }
    }

    /// Returns the address the server is listening to.
    #[inline]
    pub fn server_addr(&self) -> ListenAddr {
        self.listening_addr.clone()
    }

    /// Returns the number of clients currently connected to the server.
    pub fn num_connections(&self) -> usize {
        unimplemented!()
        //self.requests_receiver.lock().len()
    }

    /// Blocks until an HTTP request has been submitted and returns it.
    pub fn recv(&self) -> IoResult<Request> {
        match self.messages.pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(rq),
            None => Err(IoError::new(IoErrorKind::Other, "thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block longer than timeout
    pub fn recv_timeout(&self, timeout: Duration) -> IoResult<Option<Request>> {
        match self.messages.pop_timeout(timeout) {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Same as `recv()` but doesn't block.
    pub fn try_recv(&self) -> IoResult<Option<Request>> {
        match self.messages.try_pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// keyrack patch: a graceful shutdown. Stops accepting, closes the connections that wait
    /// idle for their next request at once, and lets every other connection finish the request
    /// it has begun (its head and body are read under the usual deadlines) and then close.
    /// Returns when no connection is left, or after `limit` (false then). Requests already
    /// received stay queued for `recv`: keep the workers running until this returns, then
    /// unblock them.
    pub fn shutdown_gracefully(&self, limit: Duration) -> bool {
        self.close.store(true, Relaxed);
        self.tracker.drain();
        self.wake_accept_thread();
        self.tracker.wait_empty(limit)
    }

    fn wake_accept_thread(&self) {
        self.tracker.wake();
        // Connect briefly to ourselves to unblock the accept thread
        let maybe_stream = match &self.listening_addr {
            ListenAddr::IP(addr) => TcpStream::connect(addr).map(Connection::from),
            #[cfg(unix)]
            ListenAddr::Unix(addr) => match addr.as_pathname() {
                Some(path) => std::os::unix::net::UnixStream::connect(path).map(Connection::from),
                None => return,
            },
        };
        if let Ok(stream) = maybe_stream {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Unblock thread stuck in recv() or incoming_requests().
    /// If there are several such threads, only one is unblocked.
    /// This method allows graceful shutdown of server.
    pub fn unblock(&self) {
        self.messages.unblock();
    }
}

impl Iterator for IncomingRequests<'_> {
    type Item = Request;
    fn next(&mut self) -> Option<Request> {
        self.server.recv().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close.store(true, Relaxed);
        self.wake_accept_thread();

        #[cfg(unix)]
        if let ListenAddr::Unix(addr) = &self.listening_addr {
            if let Some(path) = addr.as_pathname() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
