//! The HTTP server: a listener, two fixed pools of worker threads each with its own database
//! connection (readers take every request from the connections and serve the reads; writers
//! serve the writes the readers pass them), and the loop that turns a tiny_http request into
//! an `Incoming`, routes it, and writes the reply. Shutdown on SIGINT/SIGTERM: stop accepting, close idle keep-alive
//! connections, read and answer every request that had begun to arrive, flush usage counters,
//! return. The HTTP layer's timeouts are settings (`HttpTimeouts`).

pub mod api;
mod hashing;
mod page;
mod parent;
mod people;
mod principal;
pub(crate) mod rate;
pub(crate) mod routes;
mod surveyor;
mod workers;

use std::io::{Cursor, Read, Write};
use std::net::TcpListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
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
/// The send buffer asked of each connection's socket (the kernel doubles it: 256 KiB). An
/// answer is counted delivered once handed to the kernel whole, so this bounds how far that is
/// from the client, and what a client that does not read holds in the kernel (Linux otherwise
/// grows it to 4 MiB). Larger answers (a listing of a thousand keys, 345 KB) are finished by a
/// thread of their own, never by a worker.
const SEND_BUFFER: usize = 128 * 1024;
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
                send_buffer: Some(SEND_BUFFER),
            },
        )
        .map_err(|e| Failure::Runtime(format!("cannot start the HTTP server: {e}")))?,
    );

    crate::metrics::init(&routes::route_patterns());

    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| Failure::Runtime(format!("cannot install signal handlers: {e}")))?;
    if cfg.exit_with_parent {
        parent::exit_with_parent(cfg.parent_pid)?;
    }

    // Writes wait for their group's commit to reach the disk; the more writers wait, the larger
    // the group. They wait in a pool of their own, so the readers stay few (as many as keep the
    // cores busy) and a burst of writes never holds them. Logins and registrations hash a
    // password: they wait in a pool of their own, never on a writer (`hashing`). The pools
    // start with what the first request needs (one reader; the hashing pool's queue) and grow
    // on demand (`workers.rs`); the hashing threads start with the first request for them.
    let (hashing, hashers) = hashing::queue(&app, crate::auth::hash_slots());
    let workers = workers::Workers::start(
        app.clone(),
        server.clone(),
        cfg.workers,
        cfg.write_workers,
        hashing,
    );

    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "keyrack listening on http://{addr}");
        let _ = out.flush();
    }
    // Nothing below is needed by the first request: it starts after the ready line. The
    // survey behind /metrics runs only where /metrics can be asked (an admin token is set).
    let surveyor = match app.admin_token {
        Some(_) => Some(
            surveyor::start(app.clone(), cfg.metrics_refresh)
                .map_err(|e| Failure::Runtime(format!("cannot start the survey thread: {e}")))?,
        ),
        None => None,
    };

    let flusher = {
        let audit_days = app.audit_days;
        // Expired sessions and events older than KEYRACK_AUDIT_DAYS are pruned at start and
        // then every hour, on the flusher's thread.
        let mut pruned_at: Option<Instant> = None;
        let app = app.clone();
        let mut flusher_store = None;
        let run = move || loop {
            // Its own connection, opened here rather than before the ready line.
            let flusher_store = match &mut flusher_store {
                Some(s) => s,
                None => match app.store() {
                    Ok(s) => flusher_store.insert(s),
                    Err(f) => {
                        log::warn!("cannot open the flusher's connection yet: {}", f.message());
                        if app.shared.wait_for_flush(Duration::from_secs(1)) {
                            return;
                        }
                        continue;
                    }
                },
            };
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
    // The readers stop, then the writers and the hashing pool answer what was passed to them
    // and stop.
    workers.stop();
    hashers.join();
    app.shared.stop_flusher();
    let _ = flusher.join();
    if let Some(surveyor) = surveyor {
        surveyor.stop();
    }
    log::info!("stopped");
    Ok(())
}

/// Serves one request on a worker's connection, opened at its first request (a failed open
/// answers 500 and is tried again at the next).
fn serve_on(app: &App, store: &mut Option<Store>, rq: tiny_http::Request) {
    if store.is_none() {
        match app.store() {
            Ok(s) => *store = Some(s),
            Err(f) => log::error!("cannot open a worker's connection: {}", f.message()),
        }
    }
    match store {
        Some(store) => handle(app, store, rq),
        None => {
            let start = Instant::now();
            let _request = crate::logging::begin_request();
            let method = rq.method().clone();
            let url = rq.url().to_owned();
            let route = routes::route_index(url.split_once('?').map_or(url.as_str(), |(p, _)| p));
            answer(
                rq,
                ApiError::internal().into_reply(),
                method,
                url,
                route,
                start,
            );
        }
    }
}

/// Serves one request: never panics, always answers.
fn handle(app: &App, store: &mut Store, mut rq: tiny_http::Request) {
    let start = Instant::now();
    // Every line logged until this request is answered carries its id (and its user, once
    // authenticated): the request line and a 500's error line name the same request.
    let _request = crate::logging::begin_request();
    // Kept past the answer (which takes the request) for the metrics and the log line.
    let method = rq.method().clone();
    let url = rq.url().to_owned();
    let reply = {
        let method = method.as_str();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        reply_to(app, store, &mut rq, method, path, query)
    };
    let route = routes::served_route(url.split_once('?').map_or(url.as_str(), |(path, _)| path));
    answer(rq, reply, method, url, route, start);
}

/// Sends `reply`; counts the request under its route (`metrics::request`) and logs its line
/// once the answer has left whole, or failed to: tiny_http writes what the socket takes at once
/// and leaves the rest to the connection's own thread, which then calls back (a client that
/// does not read its answers holds only its own connection).
fn answer(
    rq: tiny_http::Request,
    reply: Reply,
    method: tiny_http::Method,
    url: String,
    route: Option<usize>,
    start: Instant,
) {
    let status = reply.status;
    let context = crate::logging::request_context();
    let on_delivered = Box::new(move |outcome: std::io::Result<()>| {
        let _request = crate::logging::resume_request(context);
        let method = method.as_str();
        let path = url.split_once('?').map_or(url.as_str(), |(path, _)| path);
        let elapsed = start.elapsed();
        crate::metrics::request(route, status, elapsed);
        // One line per request: never a body, never a header value, never the query string.
        // The logger escapes control characters in the path. Tenths of a millisecond,
        // rounded, in integers (cheaper than formatting a float).
        let tenths = (elapsed.as_micros() + 50) / 100;
        match outcome {
            Ok(()) => log::info!(
                "{method} {} {status} {}.{}ms",
                loggable(path),
                tenths / 10,
                tenths % 10
            ),
            Err(e) => log::info!(
                "{method} {} {status} not delivered ({e}) {}.{}ms",
                loggable(path),
                tenths / 10,
                tenths % 10
            ),
        }
    });
    if let Err(e) = rq.respond_then(to_response(reply), on_delivered) {
        log::debug!("could not write the response: {e}");
    }
}

/// The reply to one request: routed under `catch_unwind` (a panic answers 500).
fn reply_to(
    app: &App,
    store: &mut Store,
    rq: &mut tiny_http::Request,
    method: &str,
    path: &str,
    query: &str,
) -> Reply {
    match read_incoming(rq, method, path, query) {
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
    }
}

/// Whether `rq` goes to the hashing pool (`routes::hashes_password`).
fn hashes_password(rq: &tiny_http::Request) -> bool {
    let url = rq.url();
    let path = url.split_once('?').map_or(url, |(p, _)| p);
    routes::hashes_password(rq.method().as_str(), path)
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
        remote: rq.remote_addr().map(|a| a.ip()),
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
