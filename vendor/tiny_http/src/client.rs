
use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};

use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{HTTPVersion, Method};
use crate::connection::Connection;
use crate::util::refined_tcp_stream::now_ms;
use crate::util::RefinedTcpStream;
use crate::util::{ResponseSink, SequentialReader, SequentialReaderBuilder};
use crate::{ConnectionOptions, Header, Request, Tracker};

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // keyrack patch: where responses go (see `util::response_sink`). One request of a
    // connection is served at a time, so responses never need ordering among themselves.
    sink: ResponseSink,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // keyrack patch: the socket, for responses that close the connection
    close_handle: Option<Arc<Connection>>,

    // keyrack patch: the read deadline shared with the socket's read half
    deadline: Arc<AtomicU64>,

    // keyrack patch: set by a request whose response closes the connection
    closing: Arc<AtomicBool>,

    // keyrack patch: the timeouts, and the server's register of connections (for the cap and a
    // graceful shutdown), with this connection's number in it
    options: ConnectionOptions,
    tracker: Arc<Tracker>,
    id: u64,
    // keyrack patch: when the connection was accepted (`now_ms`), until its first head begins
    accepted: Option<u64>,
    // keyrack patch: the request handed out last, until its answer has left: told then (its
    // connection is busy meanwhile, not idle)
    in_flight: bool,
    // keyrack patch: how a request's answer tells this connection it is done (one message per
    // request, one request at a time)
    answered: (
        std::sync::mpsc::SyncSender<()>,
        std::sync::mpsc::Receiver<()>,
    ),
}

/// keyrack patch: how many times a connection looks again, spinning, for the answer to its last
/// request before it sleeps until told (see `await_answer`).
const SPIN_FOR_ANSWER: usize = 200;
/// keyrack patch: the longest request line; past it, 414.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// keyrack patch: the longest header line, the most header lines, and the most bytes of
/// header lines in all; past any of them, 431.
const MAX_HEADER_LINE: usize = 8 * 1024;
const MAX_HEADERS: usize = 100;
const MAX_HEADER_BYTES: usize = 32 * 1024;
/// keyrack patch: empty lines accepted before a request line (RFC 9112 section 2.2).
const MAX_LEADING_EMPTY_LINES: usize = 4;
/// keyrack patch: how much of an unread body is still read and thrown away before a connection
/// is closed after its response, and for how long at most. Reading it lets a client that is
/// still sending see the response rather than a reset; the limits keep a huge or endless body
/// from being read at all. This runs on the connection's thread, never on a worker.
const LINGER_BYTES: usize = 4 * 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// keyrack patch: a JSON error answer; the connection then closes.
fn error_response(status: u16, code: &str, message: &str) -> crate::Response<std::io::Cursor<Vec<u8>>> {
    let body = format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#);
    let mut response = crate::Response::from_string(body).with_status_code(status);
    if let Ok(h) = crate::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
        response.add_header(h);
    }
    if let Ok(h) = crate::Header::from_bytes(&b"Connection"[..], &b"close"[..]) {
        response.add_header(h);
    }
    response
}

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    /// keyrack patch: the head is malformed (400); the reason is for the client
    BadRequest(&'static str),
    /// a malformed chunked body read with the head (400)
    WrongHeader(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    ReadIoError(IoError),
    /// keyrack patch: the request line is longer than `MAX_REQUEST_LINE`
    UriTooLong,
    /// keyrack patch: the headers are over one of the header limits
    HeadersTooLarge,
    /// keyrack patch: an HTTP version other than 1.0 and 1.1 (505)
    VersionNotSupported,
    /// keyrack patch: a transfer coding other than chunked (501)
    NotImplemented,
    /// keyrack patch: the client went away, stayed idle past the idle timeout, the server is
    /// shutting down and this connection was idle, or a response closed it: no answer
    Closed,
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub(crate) fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        options: ConnectionOptions,
        tracker: Arc<Tracker>,
        id: u64,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();
        let close_handle = read_socket.close_handle().map(Arc::new);
        let deadline = read_socket.deadline();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: ResponseSink::new(write_socket, options.write_timeout),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            close_handle,
            deadline,
            closing: Arc::new(AtomicBool::new(false)),
            options,
            tracker,
            id,
            accepted: Some(now_ms()),
            in_flight: false,
            answered: std::sync::mpsc::sync_channel(1),
        }
    }

    /// keyrack patch: reads end at `timeout` from now (none: only the socket's own timeout).
    fn set_deadline(&self, timeout: Option<Duration>) {
        let at = timeout.map_or(0, |t| now_ms().saturating_add(t.as_millis() as u64));
        self.deadline.store(at, AtomicOrdering::Relaxed);
    }

    /// keyrack patch: how many bytes are buffered for this connection, read from the socket
    /// when there are none; 0 when the client has closed it.
    fn fill(&mut self) -> IoResult<usize> {
        loop {
            match self.next_header_source.fill_buf() {
                Ok(buf) => return Ok(buf.len()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// keyrack patch: reads one request head, through the empty line that ends it, and
    /// nothing after it. Waiting for its first byte, the connection is idle: the idle timeout
    /// applies, and a graceful shutdown closes it. From its first byte on, the head (and a
    /// small body, read with it) must arrive within the head timeout. Lines may end in CRLF
    /// or a bare LF (both are accepted, here and by the parser). The original read lines
    /// without any limit or deadline. The head is scanned in the connection's buffer and only
    /// its own bytes are consumed: what follows it stays buffered for the body or the next
    /// request.
    fn read_head(&mut self) -> Result<Vec<u8>, ReadError> {
        // A request pipelined behind the previous one has begun to arrive: a graceful shutdown
        // reads and answers it (the connection thread waits for a write's answer before it
        // reads on, so the shutdown can begin meanwhile).
        let pipelined = self.next_header_source.has_buffered();
        if !self
            .tracker
            .enter_idle(self.id, self.accepted, self.in_flight, self.close_handle.as_ref())
            && !pipelined
        {
            return Err(ReadError::Closed);
        }
        self.set_deadline(self.options.idle_timeout);
        let first = self.fill();
        self.tracker.begin_head(self.id);
        self.accepted = None;
        match first {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            // an idle keep-alive connection is closed without an answer
            Err(e) if e.kind() == ErrorKind::TimedOut => return Err(ReadError::Closed),
            Err(e) => return Err(ReadError::ReadIoError(e)),
        }
        self.set_deadline(self.options.head_timeout);

        let mut scan = HeadScan {
            head: Vec::with_capacity(256),
            line_start: 0,
            request_line_len: None,
            header_lines: 0,
            empty_lines: 0,
        };
        loop {
            let (used, done) = {
                match self.fill() {
                    Ok(0) => return Err(ReadError::Closed),
                    Ok(_) => {}
                    Err(e) => return Err(ReadError::ReadIoError(e)),
                }
                // buffered now: no read from the socket
                let buf = match self.next_header_source.fill_buf() {
                    Ok(buf) => buf,
                    Err(e) => return Err(ReadError::ReadIoError(e)),
                };
                let mut used = 0;
                let mut done = None;
                for &byte in buf {
                    used += 1;
                    done = scan.push(byte);
                    if done.is_some() {
                        break;
                    }
                }
                (used, done)
            };
            self.next_header_source.consume(used);
            match done {
                Some(Ok(())) => return Ok(scan.head),
                Some(Err(e)) => return Err(e),
                None => {}
            }
        }
    }

    /// keyrack patch: before closing, reads and throws away a bounded part of what the client
    /// is still sending, so that it sees the response rather than a reset.
    // Not inlined: its buffer would otherwise sit in the frame of every connection's thread
    // while it waits for a head (about 10 KiB of resident stack each, with 1,000 connections).
    #[inline(never)]
    fn linger(&mut self) {
        if let Some(handle) = &self.close_handle {
            let _ = handle.shutdown(Shutdown::Write);
        }
        self.set_deadline(Some(LINGER_TIME));
        let mut left = LINGER_BYTES;
        let mut buf = [0u8; 8192];
        while left > 0 {
            let want = buf.len().min(left);
            match self.next_header_source.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n,
            }
        }
        self.set_deadline(None);
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        let result = self.read_request();
        // keyrack patch: the connection is no longer idle or reading a head
        self.tracker.forget(self.id);
        result
    }

    fn read_request(&mut self) -> Result<Request, ReadError> {
        // keyrack patch: after the previous request's body; a response that closed the
        // connection ends it here.
        self.next_header_source.wait_turn();
        if self.closing.load(AtomicOrdering::Acquire) {
            self.linger();
            return Err(ReadError::Closed);
        }

        // keyrack patch: the head is parsed by httparse; the original parser split lines on
        // spaces and colons and accepted much that it should not.
        let head = self.read_head()?;
        let (method, path, version, headers) = parse_head(&head)?;

        // building the writer for the request
        let writer = self.sink.clone();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            // keyrack patch: the peer can be gone already; the original unwrapped here
            self.remote_addr.as_ref().ok().copied().flatten(),
            data_source,
            writer,
            Some(self.closing.clone()),
        )
        .map_err(|e| {
            use crate::request;
            match e {
                // keyrack patch: a malformed chunked body read with the head is a bad request
                request::RequestCreationError::CreationIoError(e)
                    if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::InvalidData) =>
                {
                    ReadError::WrongHeader(version.clone())
                }
                request::RequestCreationError::CreationIoError(e)
                    if e.kind() == ErrorKind::ConnectionAborted =>
                {
                    ReadError::Closed
                }
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
                request::RequestCreationError::BadFraming(why) => ReadError::BadRequest(why),
                request::RequestCreationError::UnsupportedTransferCoding => {
                    ReadError::NotImplemented
                }
            }
        })?;

        // keyrack patch: the head (and any small body) is in; no deadline for what follows
        self.set_deadline(None);

        // return the request
        Ok(request
            .with_close_handle(self.close_handle.clone())
            .with_sink(self.sink.clone()))
    }

    /// keyrack patch: hands `rq` out (through `push`), to be answered before the next request
    /// of this connection is handed out (`await_answer`).
    pub(crate) fn hand_out(&mut self, rq: Request, push: impl FnOnce(Request)) {
        self.in_flight = true;
        push(rq.with_notify_sender(self.answered.0.clone()));
    }

    /// keyrack patch: waits until the request handed out last (if any) has been answered and
    /// its answer has left (or failed to). While it waits for a client that does not read, the
    /// connection may be closed to make room at the cap. `false` when the connection cannot go
    /// on: its answer was not delivered, or it closes.
    pub(crate) fn await_answer(&mut self) -> bool {
        if !std::mem::take(&mut self.in_flight) {
            return true;
        }
        let answered = &self.answered.1;
        // A client that waits for each answer sends its next request once the answer's bytes
        // left, a moment before the worker says so: a short spin saves a sleep and a wake-up.
        let mut polled = answered.try_recv();
        for _ in 0..SPIN_FOR_ANSWER {
            if !matches!(polled, Err(std::sync::mpsc::TryRecvError::Empty)) {
                break;
            }
            std::hint::spin_loop();
            polled = answered.try_recv();
        }
        let done = match polled {
            Ok(()) => true,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => false,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                self.tracker.begin_answer(self.id, self.close_handle.as_ref());
                let done = answered.recv().is_ok();
                self.tracker.forget(self.id);
                done
            }
        };
        if !done || self.sink.failed() {
            self.no_more_requests = true;
            return false;
        }
        if self.closing.load(AtomicOrdering::Acquire) {
            self.linger();
            self.no_more_requests = true;
            return false;
        }
        true
    }

    /// keyrack patch: answers a request that cannot be served, then closes the connection.
    /// The error responses of the original were written while the request that failed still
    /// held the connection's writer (the 505 branch waited for it for ever). The answer carries
    /// `ConnectionOptions::answer_head`.
    #[inline(never)]
    fn refuse<R: Read>(&mut self, response: crate::Response<R>, version: HTTPVersion) {
        // After the answer to the request before it, never into it.
        if !self.await_answer() {
            return;
        }
        let response = response.with_raw_head(self.options.answer_head);
        let mut writer = self.sink.clone();
        response.raw_print(&mut writer, version, &[], false, None).ok();
        writer.flush().ok();
        if self.sink.finish() {
            self.linger();
        }
    }
}

/// keyrack patch: a request head as it arrives, byte by byte, with the limits on its lines.
struct HeadScan {
    head: Vec<u8>,
    line_start: usize,
    request_line_len: Option<usize>,
    header_lines: usize,
    empty_lines: usize,
}

impl HeadScan {
    /// Takes the next byte: `Some(Ok(()))` when it ended the head, `Some(Err(_))` when the
    /// head broke a limit, `None` to go on.
    #[inline]
    fn push(&mut self, byte: u8) -> Option<Result<(), ReadError>> {
        self.head.push(byte);
        if byte == b'\n' {
            let line = &self.head[self.line_start..self.head.len() - 1];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                if self.request_line_len.is_some() {
                    return Some(Ok(()));
                }
                self.empty_lines += 1;
                if self.empty_lines > MAX_LEADING_EMPTY_LINES {
                    return Some(Err(ReadError::BadRequest("the request line is missing")));
                }
                self.head.clear();
            } else if self.request_line_len.is_none() {
                self.request_line_len = Some(self.head.len());
            } else {
                self.header_lines += 1;
                if self.header_lines > MAX_HEADERS {
                    return Some(Err(ReadError::HeadersTooLarge));
                }
            }
            self.line_start = self.head.len();
        } else {
            let line_len = self.head.len() - self.line_start;
            match self.request_line_len {
                None if line_len > MAX_REQUEST_LINE => return Some(Err(ReadError::UriTooLong)),
                Some(first)
                    if line_len > MAX_HEADER_LINE || self.head.len() - first > MAX_HEADER_BYTES =>
                {
                    return Some(Err(ReadError::HeadersTooLarge))
                }
                _ => {}
            }
        }
        None
    }
}

/// keyrack patch: parses a whole request head with httparse. A version other than HTTP/1.0 or
/// 1.1 is a 505 when the request line is otherwise well formed, and a 400 when it is not.
#[inline(never)]
fn parse_head(head: &[u8]) -> Result<(Method, String, HTTPVersion, Vec<Header>), ReadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ReadError::BadRequest("the request head is incomplete"))
        }
        Err(httparse::Error::Version) => {
            let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let mut parts = line.split(|&b| b == b' ');
            let well_formed = matches!(
                (parts.next(), parts.next(), parts.next(), parts.next()),
                (Some(m), Some(p), Some(v), None)
                    if !m.is_empty() && !p.is_empty() && v.len() == 8
                        && v.starts_with(b"HTTP/") && v[5].is_ascii_digit()
                        && v[6] == b'.' && v[7].is_ascii_digit()
            );
            return Err(if well_formed {
                ReadError::VersionNotSupported
            } else {
                ReadError::BadRequest("the request line is malformed")
            });
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadersTooLarge),
        Err(_) => return Err(ReadError::BadRequest("the request head is malformed")),
    }
    let method: Method = req
        .method
        .and_then(|m| m.parse().ok())
        .ok_or(ReadError::BadRequest("the request method is malformed"))?;
    let path = req
        .path
        .ok_or(ReadError::BadRequest("the request target is missing"))?
        .to_owned();
    let version = match req.version {
        Some(0) => HTTPVersion(1, 0),
        Some(1) => HTTPVersion(1, 1),
        _ => return Err(ReadError::VersionNotSupported),
    };
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let value = h.value.trim_ascii();
        let header = Header::from_bytes(h.name.as_bytes(), value)
            .map_err(|_| ReadError::BadRequest("a header value is not ASCII"))?;
        headers.push(header);
    }
    Ok((method, path, version, headers))
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        use crate::{Response, StatusCode};

        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        let v11 = HTTPVersion(1, 1);
        let rq = match self.read() {
            Ok(rq) => rq,
            Err(ReadError::BadRequest(why)) => {
                self.refuse(error_response(400, "invalid_request", why), v11);
                return None;
            }
            Err(ReadError::WrongHeader(ver)) => {
                self.refuse(
                    error_response(400, "invalid_request", "the chunked body is malformed"),
                    ver,
                );
                return None;
            }
            // keyrack patch: limits on the head
            Err(ReadError::UriTooLong) => {
                self.refuse(
                    error_response(414, "uri_too_long", "the request line is longer than 8 KiB"),
                    v11,
                );
                return None;
            }
            Err(ReadError::HeadersTooLarge) => {
                self.refuse(
                    error_response(
                        431,
                        "headers_too_large",
                        "the request headers are over the limits (8 KiB a line, 100 lines, 32 KiB in all)",
                    ),
                    v11,
                );
                return None;
            }
            Err(ReadError::VersionNotSupported) => {
                self.refuse(
                    error_response(
                        505,
                        "http_version_not_supported",
                        "this server speaks HTTP/1.1 and HTTP/1.0 only",
                    ),
                    v11,
                );
                return None;
            }
            Err(ReadError::NotImplemented) => {
                self.refuse(
                    error_response(
                        501,
                        "not_implemented",
                        "the only transfer coding accepted is chunked",
                    ),
                    v11,
                );
                return None;
            }
            Err(ReadError::ReadIoError(ref err)) if err.kind() == ErrorKind::TimedOut => {
                // request timeout
                self.refuse(
                    error_response(408, "request_timeout", "the request took too long to arrive"),
                    v11,
                );
                return None;
            }
            Err(ReadError::ExpectationFailed(ver)) => {
                self.refuse(Response::new_empty(StatusCode(417)), ver);
                return None;
            }
            Err(ReadError::ReadIoError(_)) | Err(ReadError::Closed) => return None,
        };

        // updating the status of the connection
        let connection_header = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Connection"))
            .map(|h| h.value.as_str());

        let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

        match lowercase {
            Some(ref val) if val.contains("close") => self.no_more_requests = true,
            Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
            Some(ref val)
                if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
            {
                self.no_more_requests = true
            }
            None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
            _ => (),
        };

        // returning the request
        Some(rq)
    }
}

#[cfg(test)]
mod test {
    use super::{parse_head, ReadError};
    use crate::common::HTTPVersion;

    #[test]
    fn test_parse_head() {
        let (method, path, ver, headers) =
            parse_head(b"GET /hello HTTP/1.1\r\nHost: x \r\n\r\n").unwrap();
        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == HTTPVersion(1, 1));
        assert_eq!(headers[0].value.as_str(), "x");

        assert!(matches!(parse_head(b"GET /hello\r\n\r\n"), Err(ReadError::BadRequest(_))));
        assert!(matches!(parse_head(b"qsd qsd qsd\r\n\r\n"), Err(ReadError::BadRequest(_))));
        assert!(matches!(
            parse_head(b"GET / HTTP/2.0\r\n\r\n"),
            Err(ReadError::VersionNotSupported)
        ));
        assert!(parse_head(b"GET / HTTP/1.1\nA: b\n\n").is_ok());
    }
}
