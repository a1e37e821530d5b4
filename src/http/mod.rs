//! The HTTP server: a listener, two fixed pools of worker threads each with its own database
//! connection (readers take every request from the connections and serve the reads; writers
//! serve the writes the readers pass them), and the loop that turns a tiny_http request into
//! an `Incoming`, routes it, and writes the reply. Shutdown on SIGINT/SIGTERM: stop accepting, close idle keep-alive
//! connections, read and answer every request that had begun to arrive, flush usage counters,
//! return. The HTTP layer's timeouts are settings (`HttpTimeouts`).

pub mod api;
mod page;
mod people;
mod principal;
pub(crate) mod routes;

use std::io::{Cursor, Read, Write};
use std::net::TcpListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use tiny_http::{ConnectionOptions, Header, Response, Server, StatusCode};
use zeroize::Zeroizing;

use crate::app::App;
use crate::config::ServeConfig;
use crate::store::Store;
use crate::Failure;
use api::{ApiError, Incoming, Reply, MAX_BODY};

/// How often expired sessions are deleted (also once at start).
const SESSION_PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Most connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;

/// Tries of the flush at a shutdown, each waiting up to `KEYRACK_BUSY_TIMEOUT` for a lock
/// another process holds (the default 5 s: up to 50 s in all, within systemd's 90 s stop).
const FINAL_FLUSH_TRIES: u32 = 10;

/// `MAX_CONNECTIONS`, or in debug builds only `KEYRACK_TEST_MAX_CONNECTIONS` (a positive
/// number), so the test suite goes past the cap without opening a thousand connections.
/// Release builds ignore it.
fn max_connections() -> usize {
    crate::config::test_switch_positive("MAX_CONNECTIONS").unwrap_or(MAX_CONNECTIONS)
}

/// Binds, prints the ready line, serves until SIGINT or SIGTERM.
pub fn serve(app: Arc<App>, cfg: &ServeConfig) -> Result<(), Failure> {
    // Every worker's connection is opened before the ready line, so a harness that saw it
    // can rely on the server.
    let stores = (0..cfg.workers)
        .map(|_| app.store())
        .collect::<Result<Vec<_>, _>>()?;
    let write_stores = (0..cfg.write_workers)
        .map(|_| app.store())
        .collect::<Result<Vec<_>, _>>()?;
    let mut flusher_store = app.store()?;

    let listener = TcpListener::bind(cfg.listen)
        .map_err(|e| Failure::Runtime(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::Runtime(format!("cannot read the bound address: {e}")))?;
    let server = Arc::new(
        Server::from_listener_with_options(
            listener,
            None,
            ConnectionOptions {
                read_timeout: Some(cfg.timeouts.socket),
                write_timeout: Some(cfg.timeouts.socket),
                max_connections: max_connections(),
                head_timeout: Some(cfg.timeouts.head),
                idle_timeout: Some(cfg.timeouts.idle),
                answer_head: every_answer(),
            },
        )
        .map_err(|e| Failure::Runtime(format!("cannot start the HTTP server: {e}")))?,
    );

    crate::metrics::init(&routes::route_patterns());

    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| Failure::Runtime(format!("cannot install signal handlers: {e}")))?;

    // Writes wait for their group's commit to reach the disk; the more writers wait, the larger
    // the group. They wait in a pool of their own, so the readers stay few (as many as keep the
    // cores busy) and a burst of writes never holds them.
    let (to_writers, writes) = mpsc::channel::<tiny_http::Request>();
    let writes = Arc::new(Mutex::new(writes));
    let writers: Vec<_> = write_stores
        .into_iter()
        .enumerate()
        .map(|(i, mut store)| {
            let writes = writes.clone();
            let app = app.clone();
            thread::Builder::new()
                .name(format!("writer-{i}"))
                .spawn(move || loop {
                    // Ends once every reader is gone and the queue is empty.
                    let next = writes.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok(rq) = next else { return };
                    handle(&app, &mut store, rq);
                })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| Failure::Runtime(format!("cannot start worker threads: {e}")))?;
    let workers: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(i, mut store)| {
            let server = server.clone();
            let app = app.clone();
            let to_writers = to_writers.clone();
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    while let Ok(rq) = server.recv() {
                        // The writers take what may change something (the methods that are
                        // not safe, as the connection's reader also counts them). A read that
                        // happens to write (a key moved from the legacy column on read) stays
                        // here.
                        if rq.method().is_safe() {
                            handle(&app, &mut store, rq);
                        } else if let Err(mpsc::SendError(rq)) = to_writers.send(rq) {
                            // No writer left (only if one died): served here.
                            handle(&app, &mut store, rq);
                        }
                    }
                })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| Failure::Runtime(format!("cannot start worker threads: {e}")))?;
    drop(to_writers);

    let flusher = {
        let audit_days = app.audit_days;
        // Expired sessions and events older than KEYRACK_AUDIT_DAYS are pruned at start and
        // then every hour, on the flusher's thread.
        let mut pruned_at: Option<Instant> = None;
        let run = move || loop {
            if pruned_at.is_none_or(|t| t.elapsed() >= SESSION_PRUNE_EVERY) {
                pruned_at = Some(Instant::now());
                match flusher_store.prune_sessions() {
                    Ok(0) => {}
                    Ok(n) => log::info!("removed {n} expired sessions"),
                    Err(e) => log::warn!(
                        "could not remove expired sessions yet: {}",
                        crate::error_chain(&e)
                    ),
                }
                match flusher_store.prune_events(audit_days) {
                    Ok(0) => {}
                    Ok(n) => log::info!("removed {n} events older than {audit_days} days"),
                    Err(e) => log::warn!(
                        "could not remove old events yet: {}",
                        crate::error_chain(&e)
                    ),
                }
            }
            // Woken sooner when many events of reads are queued, or to stop.
            let done = flusher_store.wait_for_flush(Duration::from_secs(1));
            let mut written = flusher_store.flush_usage();
            if !done {
                if let Err(e) = written {
                    log::warn!(
                        "could not write usage counters yet: {}",
                        crate::error_chain(&e)
                    );
                }
                continue;
            }
            // The last flush has no later one to catch up: while another process holds the
            // write lock, it tries again (each try waits up to KEYRACK_BUSY_TIMEOUT).
            for _ in 1..FINAL_FLUSH_TRIES {
                let Err(e) = &written else { break };
                log::warn!(
                    "could not write usage counters and events of reads at shutdown yet, trying again: {}",
                    crate::error_chain(e)
                );
                written = flusher_store.flush_usage();
            }
            if let Err(e) = written {
                log::error!(
                    "usage counters and events of reads not written at shutdown after {FINAL_FLUSH_TRIES} tries, they are lost: {}",
                    crate::error_chain(&e)
                );
            }
            return;
        };
        thread::Builder::new()
            .name("flusher".into())
            .spawn(run)
            .map_err(|e| Failure::Runtime(format!("cannot start the flusher thread: {e}")))?
    };

    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "keyrack listening on http://{addr}");
        let _ = out.flush();
    }
    // From here on log lines are written by a thread of their own, many in one write; every
    // line still waiting is written when this guard drops, as `serve` returns.
    let _log_writer = crate::logging::serve_batched()
        .inspect_err(|e| log::warn!("cannot start the log writer thread, logging directly: {e}"))
        .ok();
    log::info!(
        "serving on http://{addr} with {} workers and {} writers",
        cfg.workers,
        cfg.write_workers
    );

    // Wait for SIGINT or SIGTERM.
    if let Some(sig) = signals.forever().next() {
        log::info!("signal {sig}: finishing requests in flight, then exiting");
    }
    // Idle keep-alive connections close now; a request whose head or body has begun to arrive
    // is read (within the head timeout) and answered while the workers still run. Then the
    // workers finish what is queued and stop.
    let limit = cfg.timeouts.head + cfg.timeouts.socket;
    if !server.shutdown_gracefully(limit) {
        log::warn!("some connections were still open after {limit:?}; closing them");
    }
    for _ in 0..workers.len() {
        server.unblock();
    }
    for w in workers {
        let _ = w.join();
    }
    // The readers are gone: the writers answer what was passed to them, then stop.
    for w in writers {
        let _ = w.join();
    }
    app.shared.stop_flusher();
    let _ = flusher.join();
    log::info!("stopped");
    Ok(())
}

/// Serves one request: never panics, always answers.
fn handle(app: &App, store: &mut Store, mut rq: tiny_http::Request) {
    let start = Instant::now();
    // Every line logged until this request is answered carries its id (and its user, once
    // authenticated): the request line and a 500's error line name the same request.
    let _request = crate::logging::begin_request();
    // Kept past the answer (which takes the request) for the metrics and the log line.
    let method = rq.method().clone();
    let method = method.as_str();
    let url = rq.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));

    let reply = match read_incoming(&mut rq, method, path, query) {
        Ok(req) => match catch_unwind(AssertUnwindSafe(|| routes::route(app, store, &req))) {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => e.into_reply(),
            Err(_) => {
                log::error!(
                    "the handler of {method} {} panicked; answered 500",
                    loggable(path)
                );
                ApiError::internal().into_reply()
            }
        },
        Err(e) => e.into_reply(),
    };
    let status = reply.status;
    if let Err(e) = rq.respond(to_response(reply)) {
        log::debug!("could not write the response: {e}");
    }
    let elapsed = start.elapsed();
    crate::metrics::request(routes::served_route(path), status, elapsed);
    // One line per request: never a body, never a header value, never the query string. The
    // logger escapes control characters in the path.
    // Tenths of a millisecond, rounded, in integers (cheaper than formatting a float).
    let tenths = (elapsed.as_micros() + 50) / 100;
    log::info!(
        "{method} {} {status} {}.{}ms",
        loggable(path),
        tenths / 10,
        tenths % 10
    );
}

/// The path as the request log shows it: a service route's `email:` selector is left out (the
/// line names the user by id once the user is found), so the log keeps no email.
fn loggable(path: &str) -> std::borrow::Cow<'_, str> {
    match path.strip_prefix("/service/users/email:") {
        Some(rest) => {
            let tail = rest.find('/').map_or("", |i| &rest[i..]);
            format!("/service/users/email:…{tail}").into()
        }
        None => path.into(),
    }
}

/// Reads what handlers need, and the body up to `MAX_BODY`: a larger declared length is refused
/// before any of it is read; a body without a length is read through a limit one past it.
fn read_incoming<'a>(
    rq: &mut tiny_http::Request,
    method: &'a str,
    path: &'a str,
    query: &'a str,
) -> Result<Incoming<'a>, ApiError> {
    // Several Authorization headers are refused: proxies and servers disagree on which one
    // counts, and the difference can be used to pass one credential off as another.
    let mut authorization = None;
    for h in rq.headers() {
        if h.field.equiv("Authorization") {
            if authorization.is_some() {
                return Err(ApiError::invalid_request(
                    "send one Authorization header, not several",
                ));
            }
            authorization = Some(Zeroizing::new(h.value.as_str().to_owned()));
        }
    }
    if rq.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(ApiError::payload_too_large());
    }
    // Room for the declared length at once (bounded above): a body that grows leaves unwiped
    // copies of itself in the allocations it outgrows.
    let mut body = Zeroizing::new(Vec::with_capacity(
        rq.body_length().unwrap_or(0).min(MAX_BODY),
    ));
    if let Err(e) = rq
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
    {
        log::debug!("reading a request body failed: {e}");
        let mut err = ApiError::invalid_request("the request body could not be read");
        err.close = true;
        return Err(err);
    }
    if body.len() > MAX_BODY {
        return Err(ApiError::payload_too_large());
    }
    // HEAD is answered as GET; tiny_http leaves out the body and keeps its Content-Length.
    let method = if method == "HEAD" { "GET" } else { method };
    Ok(Incoming {
        method,
        path,
        query: api::parse_query(query),
        authorization,
        body,
    })
}

/// The page's policy: its own files only, no inline script or style, never inside a frame.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The headers of every answer, each a `Name: value` line ending in CRLF.
const EVERY_ANSWER: [(&str, &str); 4] = [
    // Responses may carry key data; nothing is to be cached anywhere.
    ("Cache-Control", "no-store"),
    // Every answer, the page's and the API's: scripts and styles from this server's own files
    // only (none inline), no framing, no sniffing of types, no Referer leaving the page.
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
];

/// `EVERY_ANSWER`'s lines, then `extra`'s, rendered once, checked as tiny_http checks a header.
fn render_head(extra: &[(&str, &str)]) -> Vec<u8> {
    let mut head = Vec::new();
    for (name, value) in EVERY_ANSWER.iter().chain(extra) {
        if Header::from_bytes(name.as_bytes(), value.as_bytes()).is_ok() {
            head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
    }
    head
}

/// The lines of every answer (tiny_http's own answers included), built once.
fn every_answer() -> &'static [u8] {
    static HEAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HEAD.get_or_init(|| render_head(&[]))
}

/// The lines of every answer and a JSON body's type, built once: most answers need no header
/// of their own.
fn every_json_answer() -> &'static [u8] {
    static HEAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HEAD.get_or_init(|| render_head(&[("Content-Type", api::JSON)]))
}

fn to_response(reply: Reply) -> Response<Cursor<Zeroizing<Vec<u8>>>> {
    let body = reply.body.unwrap_or_default();
    let len = body.len();
    let typed = reply.status != 204;
    let json = typed && reply.content_type == api::JSON;
    let mut resp = Response::new(
        StatusCode(reply.status),
        // Room for the headers tiny_http adds (Date, Server, Content-Length) too.
        Vec::with_capacity(8),
        Cursor::new(body),
        Some(len),
        None,
    )
    .with_raw_head(if json {
        every_json_answer()
    } else {
        every_answer()
    });
    let mut add = |name: &str, value: &str| {
        if let Ok(h) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            resp.add_header(h);
        }
    };
    if typed && !json {
        add("Content-Type", reply.content_type);
    }
    for (name, value) in &reply.headers {
        add(name, value);
    }
    if reply.close {
        add("Connection", "close");
    }
    resp
}
