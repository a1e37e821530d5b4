use std::io::Result as IoResult;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::connection::Connection;
#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use crate::ssl::SslStream;

pub(crate) enum Stream {
    Http(Connection),
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    Https(SslStream),
}

impl Stream {
    // keyrack patch: cloning a socket needs a file descriptor, which can run out; the original
    // `Clone` impl unwrapped here and so killed the accept thread when descriptors ran out.
    fn try_clone(&self) -> IoResult<Self> {
        match self {
            Stream::Http(tcp_stream) => Ok(Stream::Http(tcp_stream.try_clone()?)),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => Ok(Stream::Https(ssl_stream.clone())),
        }
    }
}

impl From<Connection> for Stream {
    fn from(tcp_stream: Connection) -> Self {
        Stream::Http(tcp_stream)
    }
}

impl Stream {
    fn secure(&self) -> bool {
        match self {
            Stream::Http(_) => false,
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => true,
        }
    }

    fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.peer_addr(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.peer_addr(),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.set_read_timeout(t),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => Ok(()),
        }
    }

    fn shutdown(&mut self, how: Shutdown) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.shutdown(how),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.read(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.write(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.write(buf),
        }
    }

    fn flush(&mut self) -> IoResult<()> {
        match self {
            Stream::Http(tcp_stream) => tcp_stream.flush(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.flush(),
        }
    }
}

pub struct RefinedTcpStream {
    stream: Stream,
    close_read: bool,
    close_write: bool,
    // keyrack patch: a deadline for reads (see `now_ms`; 0: none), shared with the
    // `ClientConnection`, which sets it while it waits for a request head and reads it (and a
    // small body with it).
    deadline: Arc<AtomicU64>,
    // keyrack patch: the socket's own read timeout, and the one applied now (shortened to
    // what is left before the deadline when that is less).
    read_timeout: Option<Duration>,
    applied_timeout: Option<Duration>,
}

/// keyrack patch: milliseconds on a monotonic clock (`Instant`), counted from the first call
/// plus one, so that 0 can mean "no deadline". A wall clock set back or forward would stretch
/// or cut every deadline.
pub(crate) fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl RefinedTcpStream {
    pub(crate) fn new<S>(stream: S) -> IoResult<(RefinedTcpStream, RefinedTcpStream)>
    where
        S: Into<Stream>,
    {
        let stream: Stream = stream.into();

        let (read, write) = (stream.try_clone()?, stream);

        let deadline = Arc::new(AtomicU64::new(0));
        let read = RefinedTcpStream {
            stream: read,
            close_read: true,
            close_write: false,
            deadline: deadline.clone(),
            read_timeout: None,
            applied_timeout: None,
        };

        let write = RefinedTcpStream {
            stream: write,
            close_read: false,
            close_write: true,
            deadline,
            read_timeout: None,
            applied_timeout: None,
        };

        Ok((read, write))
    }

    /// keyrack patch: a handle on the plain socket, used to close a connection after a response
    /// that asked for it. `None` for TLS streams or when no descriptor is left.
    pub(crate) fn close_handle(&self) -> Option<Connection> {
        match &self.stream {
            Stream::Http(conn) => conn.try_clone().ok(),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => None,
        }
    }

    /// Returns true if this struct wraps around a secure connection.
    #[inline]
    pub(crate) fn secure(&self) -> bool {
        self.stream.secure()
    }

    pub(crate) fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        self.stream.peer_addr()
    }

    /// keyrack patch: the read timeout the socket was given, so that reads under a deadline
    /// can shorten it and restore it after.
    pub(crate) fn with_read_timeout(mut self, t: Option<Duration>) -> Self {
        self.read_timeout = t;
        self.applied_timeout = t;
        self
    }

    /// keyrack patch: the shared read deadline.
    pub(crate) fn deadline(&self) -> Arc<AtomicU64> {
        self.deadline.clone()
    }
}

impl Drop for RefinedTcpStream {
    fn drop(&mut self) {
        if self.close_read {
            self.stream.shutdown(Shutdown::Read).ok();
        }

        if self.close_write {
            self.stream.shutdown(Shutdown::Write).ok();
        }
    }
}

impl Read for RefinedTcpStream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        // keyrack patch: under a deadline, a read waits at most until the deadline (the socket's
        // timeout is shortened to what is left), so a client that trickles its head, or sends
        // nothing at all, cannot hold the connection past it.
        let deadline = self.deadline.load(Ordering::Relaxed);
        let want = if deadline == 0 {
            self.read_timeout
        } else {
            let now = now_ms();
            if now >= deadline {
                return Err(timed_out());
            }
            let left = Duration::from_millis(deadline - now);
            Some(self.read_timeout.map_or(left, |t| t.min(left)))
        };
        if want != self.applied_timeout {
            self.stream.set_read_timeout(want)?;
            self.applied_timeout = want;
        }
        match self.stream.read(buf) {
            Err(e)
                if deadline != 0
                    && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                    && now_ms() >= deadline =>
            {
                Err(timed_out())
            }
            other => other,
        }
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(ErrorKind::TimedOut, "the request head took too long")
}

impl RefinedTcpStream {
    /// keyrack patch: the socket's write timeout (the delivery of an answer shortens it to
    /// what is left of its deadline).
    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> IoResult<()> {
        match &self.stream {
            Stream::Http(conn) => conn.set_write_timeout(t),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(_) => Ok(()),
        }
    }

    /// keyrack patch: writes what the socket takes at once, without waiting for room
    /// (`WouldBlock` when it takes nothing). TLS streams wait as `write` does.
    pub(crate) fn write_now(&mut self, buf: &[u8]) -> IoResult<usize> {
        match &mut self.stream {
            Stream::Http(conn) => conn.send_now(buf),
            #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
            Stream::Https(ssl_stream) => ssl_stream.write(buf),
        }
    }
}

impl Write for RefinedTcpStream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        self.stream.flush()
    }
}
