//! Logging to stderr: env_logger with a `RUST_LOG`-style filter, no colours, one line per record.
//!
//! Line format: `2026-11-25T20:09:15.713Z [INFO  keyrack::http] GET /healthz 200 0.1ms request=12`.
//! What this module adds to env_logger, all in its `format` closure:
//! - a record logged while a request is served ends with ` request=N`, and ` user=ID` once the
//!   request is authenticated, so the request line and any error line of the same request name
//!   the same request id (never a token, a body or a query value);
//! - control characters in a message (a `\r` or an escape sequence in a request path) are
//!   written escaped, so nothing a client sends can forge or erase a line on a terminal;
//! - a progress line left open on a terminal (`crate::progress`) is ended first, so a log line
//!   always starts on its own line;
//! - a panic is logged as one such line (with its request id), not as the default hook's text.
//!
//! The line is written into env_logger's per-record buffer, the message formatted through a
//! reused per-thread buffer. Commands write each line to stderr at once. The server, from its
//! ready line to its exit, hands lines to a writer thread of its own (`serve_batched`): a line
//! logged while the writer is idle is written at once, and the lines logged while it writes (or
//! in the `BATCH_GAP` after) go together in the next `write` — under load, one system call for
//! hundreds of lines instead of one each. A `kill -9` can lose the lines of that last gap.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::Level;

thread_local! {
    /// The request this thread is serving: its id, and the user once authenticated.
    static REQUEST: Cell<Option<(u64, Option<i64>)>> = const { Cell::new(None) };
}

/// Request ids: counted from 1 for the life of the process.
static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// Set while a progress line without a line end is on stderr.
static PROGRESS_OPEN: AtomicBool = AtomicBool::new(false);

/// Installs the logger with a filter such as `info` or `warn,keyrack=debug`.
pub fn init(spec: &str) {
    let _ = env_logger::Builder::new()
        .parse_filters(spec)
        .write_style(env_logger::WriteStyle::Never)
        .target(env_logger::Target::Pipe(Box::new(Sink)))
        .format(|buf, record| {
            write_line(
                buf,
                time::OffsetDateTime::now_utc(),
                record.level(),
                record.target(),
                record.args(),
                current(),
                PROGRESS_OPEN.swap(false, Ordering::Relaxed),
            )
        })
        .try_init();
    // A panic is logged as one line of the log like any other error, with its request id,
    // instead of the default hook's raw lines on stderr.
    std::panic::set_hook(Box::new(|info| log::error!("{info}")));
}

/// Writes one line, with its line end (and a line end before it to close an open progress
/// line), into env_logger's buffer for the record (written to stderr at once).
fn write_line(
    out: &mut impl std::io::Write,
    at: time::OffsetDateTime,
    level: Level,
    target: &str,
    args: &std::fmt::Arguments<'_>,
    request: Option<(u64, Option<i64>)>,
    close_progress: bool,
) -> std::io::Result<()> {
    thread_local! {
        /// The message, formatted here first to escape it; reused, so a line allocates nothing.
        static MESSAGE: std::cell::RefCell<(String, String)> =
            const { std::cell::RefCell::new((String::new(), String::new())) };
    }
    if close_progress {
        out.write_all(b"\n")?;
    }
    write_time(out, at)?;
    // ` [INFO  target] `: the level padded to 5, written without the formatting machinery.
    let level = level.as_str();
    out.write_all(b" [")?;
    out.write_all(level.as_bytes())?;
    out.write_all(&b"     "[..5usize.saturating_sub(level.len()) + 1])?;
    out.write_all(target.as_bytes())?;
    out.write_all(b"] ")?;
    MESSAGE.with(|m| {
        let Ok(mut m) = m.try_borrow_mut() else {
            // Logging while formatting a log line (a Display impl that logs): no escaping buffer.
            return write!(out, "{}", printable(&args.to_string()));
        };
        let (raw, escaped) = &mut *m;
        raw.clear();
        let _ = write!(raw, "{args}");
        if !has_control(raw) {
            // The usual line: nothing to escape, written as formatted.
            return out.write_all(raw.as_bytes());
        }
        escaped.clear();
        push_printable(escaped, raw);
        out.write_all(escaped.as_bytes())
    })?;
    if let Some((id, user)) = request {
        write!(out, " request={id}")?;
        if let Some(u) = user {
            write!(out, " user={u}")?;
        }
    }
    out.write_all(b"\n")
}

/// `2026-11-25T20:09:15.713Z`: the part up to the second formatted by `time` once per second
/// and thread, the milliseconds appended.
fn write_time(out: &mut impl std::io::Write, at: time::OffsetDateTime) -> std::io::Result<()> {
    thread_local! {
        /// The last second formatted on this thread: its Unix time and its text.
        static SECOND: std::cell::RefCell<(i64, Vec<u8>)> =
            const { std::cell::RefCell::new((i64::MIN, Vec::new())) };
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let ms = at.millisecond();
    let millis = [
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ];
    SECOND.with(|cell| {
        let Ok(mut second) = cell.try_borrow_mut() else {
            at.format_into(out, &fmt).map_err(std::io::Error::other)?;
            return out.write_all(&millis);
        };
        let (unix, text) = &mut *second;
        if *unix != at.unix_timestamp() {
            text.clear();
            at.format_into(text, &fmt).map_err(std::io::Error::other)?;
            *unix = at.unix_timestamp();
        }
        out.write_all(text)?;
        out.write_all(&millis)
    })
}

/// Whether a character is escaped in a log line: those that make a line break or read as
/// another (`domain::disguises_text`).
fn escaped(c: char) -> bool {
    crate::domain::disguises_text(c)
}

/// Whether `s` holds a character to escape (`escaped`), looked for in its bytes: C1 characters
/// are `C2 80` to `C2 9F`, U+061C is `D8 9C`, U+200E and U+200F are `E2 80 8E` and `E2 80 8F`,
/// U+2028 to U+202E are `E2 80 A8` to `E2 80 AE`, U+2066 to U+2069 are `E2 81 A6` to `E2 81 A9`.
fn has_control(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        let next = |k: usize| b.get(i + k).copied().unwrap_or(0);
        c < 0x20
            || c == 0x7f
            || (c == 0xc2 && (0x80..0xa0).contains(&next(1)))
            || (c == 0xd8 && next(1) == 0x9c)
            || (c == 0xe2
                && match next(1) {
                    0x80 => matches!(next(2), 0x8e | 0x8f | 0xa8..=0xae),
                    0x81 => (0xa6..=0xa9).contains(&next(2)),
                    _ => false,
                })
    })
}

/// Appends `s` with its control characters, line separators and bidirectional controls escaped
/// (`\r`, `\n`, `\u{1b}`, `\u{2028}`, `\u{202e}`).
fn push_printable(out: &mut String, s: &str) {
    for c in s.chars() {
        if escaped(c) {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// `s` with its control characters escaped, for a message printed to a terminal.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_printable(&mut out, s);
    out
}

/// The request being served on this thread, if any.
fn current() -> Option<(u64, Option<i64>)> {
    REQUEST.with(Cell::get)
}

/// Marks this thread as serving a new request until the guard is dropped; every record logged
/// meanwhile carries the request id.
pub fn begin_request() -> RequestScope {
    let id = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
    REQUEST.with(|r| r.set(Some((id, None))));
    RequestScope { id }
}

/// The request being served on this thread (its id and user), to be carried to another thread.
#[derive(Clone, Copy)]
pub struct RequestContext(Option<(u64, Option<i64>)>);

/// See `RequestContext`.
pub fn request_context() -> RequestContext {
    RequestContext(current())
}

/// Marks this thread as serving the request of `context` (taken on another thread) until the
/// guard is dropped: the lines logged meanwhile carry its request id and user.
pub fn resume_request(context: RequestContext) -> RequestScope {
    REQUEST.with(|r| r.set(context.0));
    RequestScope {
        id: context.0.map_or(0, |(id, _)| id),
    }
}

/// Records the authenticated user of the request being served on this thread.
pub fn set_user(user_id: i64) {
    REQUEST.with(|r| {
        if let Some((id, _)) = r.get() {
            r.set(Some((id, Some(user_id))));
        }
    });
}

/// See `begin_request`.
pub struct RequestScope {
    pub id: u64,
}

impl Drop for RequestScope {
    fn drop(&mut self) {
        REQUEST.with(|r| r.set(None));
    }
}

/// Where env_logger writes each formatted line: stderr at once, or the server's writer thread
/// while `serve_batched` runs.
struct Sink;

/// The lines waiting for the server's writer thread, and whether it is running.
struct Batch {
    lines: Vec<u8>,
    /// The writer thread runs; lines go through `lines`.
    on: bool,
    /// The writer thread waits for a line (`LOG.wake`).
    idle: bool,
    /// `serve_batched`'s guard asks the writer to write what is left and stop.
    stop: bool,
    /// Threads waiting for room (`MAX_WAITING`).
    waiting: usize,
}

struct Log {
    batch: Mutex<Batch>,
    /// Wakes the writer thread (a first line, or stop).
    wake: Condvar,
    /// Wakes a thread waiting for room (`MAX_WAITING`) once the writer took the lines.
    room: Condvar,
}

static LOG: Log = Log {
    batch: Mutex::new(Batch {
        lines: Vec::new(),
        on: false,
        idle: false,
        stop: false,
        waiting: 0,
    }),
    wake: Condvar::new(),
    room: Condvar::new(),
};

/// How long the writer thread gathers lines after a write before the next one.
const BATCH_GAP: Duration = Duration::from_millis(5);
/// Most bytes waiting for the writer: past this, a thread logging waits for it (as it would
/// wait for a stderr that is slow to read).
const MAX_WAITING: usize = 1 << 20;

fn batch() -> MutexGuard<'static, Batch> {
    LOG.batch.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut b = batch();
        loop {
            if !b.on {
                // Written under the lock, so a line never lands between two of a batch. Also
                // after waiting for room: the writer thread may have stopped meanwhile, and a
                // line left in `lines` then would never be written.
                write_to_stderr(buf);
                return Ok(buf.len());
            }
            if b.lines.len() < MAX_WAITING {
                break;
            }
            b.waiting += 1;
            b = LOG.room.wait(b).unwrap_or_else(PoisonError::into_inner);
            b.waiting -= 1;
        }
        b.lines.extend_from_slice(buf);
        if b.idle {
            b.idle = false;
            LOG.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `lines` to stderr whole. A stderr that is full and non-blocking (`O_NONBLOCK`, set by
/// whatever shares it) is waited for, like a blocking one: giving up there would drop the rest
/// of a batch and leave its first line torn, the next write then continuing that line. When
/// stderr is gone the lines are dropped: nothing else can be done with them.
fn write_to_stderr(lines: &[u8]) {
    write_patiently(&mut std::io::stderr().lock(), lines, || {
        let mut fd = libc::pollfd {
            fd: libc::STDERR_FILENO,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call. An error or a timeout only
        // means the write is tried again.
        unsafe { libc::poll(&mut fd, 1, 100) };
    });
}

/// Writes all of `buf` to `out`, calling `wait` whenever it would block; stops at any other
/// error or when `out` takes nothing.
fn write_patiently(out: &mut impl std::io::Write, mut buf: &[u8], mut wait: impl FnMut()) {
    while !buf.is_empty() {
        match out.write(buf) {
            Ok(0) => return,
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Until the guard is dropped, log lines go to stderr through a writer thread of this
/// process (see the module's text). Dropping the guard writes every line still waiting.
pub fn serve_batched() -> std::io::Result<BatchedLog> {
    batch().on = true;
    let writer = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(write_batches)
        .inspect_err(|_| batch().on = false)?;
    Ok(BatchedLog {
        writer: Some(writer),
    })
}

fn write_batches() {
    let mut taken = Vec::new();
    loop {
        {
            let mut b = batch();
            while b.lines.is_empty() && !b.stop {
                b.idle = true;
                b = LOG.wake.wait(b).unwrap_or_else(PoisonError::into_inner);
            }
            b.idle = false;
            if b.lines.is_empty() {
                // Stopped with nothing left: lines are written directly from now on.
                b.on = false;
                b.stop = false;
                LOG.room.notify_all();
                return;
            }
            std::mem::swap(&mut taken, &mut b.lines);
            LOG.room.notify_all();
        }
        write_to_stderr(&taken);
        taken.clear();
        std::thread::sleep(BATCH_GAP);
    }
}

/// See `serve_batched`.
pub struct BatchedLog {
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for BatchedLog {
    fn drop(&mut self) {
        batch().stop = true;
        LOG.wake.notify_one();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Tells the logger whether a progress line without a line end is on stderr.
pub fn set_progress_open(open: bool) {
    PROGRESS_OPEN.store(open, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn line(msg: &str, request: Option<(u64, Option<i64>)>, close: bool) -> String {
        let mut out = Vec::new();
        write_line(
            &mut out,
            time::macros::datetime!(2026-11-26 07:00:00 UTC),
            Level::Info,
            "keyrack::http",
            &format_args!("{msg}"),
            request,
            close,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// A line whose thread waited for room while the server's writer thread stopped is written
    /// (directly, as batching is over), not left in a batch nobody writes any more. The writer's
    /// steps are taken by hand: it took the lines and woke the waiting thread, then found
    /// nothing left and stopped, all before the waiting thread ran again.
    #[test]
    fn a_line_waiting_for_room_when_the_writer_stops_is_written() {
        {
            let mut b = batch();
            b.on = true;
            b.lines = vec![b'.'; MAX_WAITING];
        }
        let logging = std::thread::spawn(|| {
            Sink.write_all(b"(a logging unit test's line, written directly)\n")
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while batch().waiting == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "never waited for room"
            );
            std::thread::yield_now();
        }
        {
            let mut b = batch();
            b.lines.clear();
            LOG.room.notify_all();
            b.on = false;
        }
        logging.join().unwrap().unwrap();
        let b = batch();
        assert!(b.lines.is_empty(), "{} bytes left behind", b.lines.len());
        assert_eq!(b.waiting, 0);
    }

    /// A stderr that takes a few bytes at a time and would block every other write (full and
    /// non-blocking) gets every byte, in order, once.
    #[test]
    fn a_full_non_blocking_stderr_is_waited_for() {
        struct Slow {
            got: Vec<u8>,
            calls: usize,
        }
        impl std::io::Write for Slow {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.calls += 1;
                if self.calls % 2 == 0 {
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                let n = buf.len().min(7);
                self.got.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines: Vec<u8> = (0..100)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut out = Slow {
            got: Vec::new(),
            calls: 0,
        };
        let mut waits = 0;
        write_patiently(&mut out, &lines, || waits += 1);
        assert_eq!(
            String::from_utf8_lossy(&out.got),
            String::from_utf8_lossy(&lines)
        );
        assert!(waits > 0);
    }

    /// The time as `time` formats it whole, whatever second the thread formatted last.
    #[test]
    fn the_time_is_the_same_as_formatted_whole() {
        let whole = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let start = time::macros::datetime!(2026-12-31 23:59:58.000 UTC);
        for ms in [
            0, 1, 9, 10, 99, 100, 998, 999, 1000, 1001, 1999, 2000, 2001, 5, 61_000,
        ] {
            let at = start + time::Duration::milliseconds(ms);
            let mut out = Vec::new();
            write_time(&mut out, at).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), at.format(&whole).unwrap());
        }
    }

    #[test]
    fn one_line_with_level_and_target() {
        assert_eq!(
            line("GET /healthz 200 0.1ms", None, false),
            "2026-11-26T07:00:00.000Z [INFO  keyrack::http] GET /healthz 200 0.1ms\n"
        );
        for (level, shown) in [
            (Level::Error, "[ERROR keyrack] x"),
            (Level::Warn, "[WARN  keyrack] x"),
            (Level::Debug, "[DEBUG keyrack] x"),
        ] {
            let mut out = Vec::new();
            write_line(
                &mut out,
                time::macros::datetime!(2026-11-26 07:00:00 UTC),
                level,
                "keyrack",
                &format_args!("x"),
                None,
                false,
            )
            .unwrap();
            let out = String::from_utf8(out).unwrap();
            assert!(out.ends_with(&format!(" {shown}\n")), "{out:?}");
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        let l = line("GET /a\r2026 FAKE\x1b[2Kb 404", None, false);
        assert_eq!(l.matches('\n').count(), 1, "{l:?}");
        assert!(!l.contains('\r') && !l.contains('\x1b'), "{l:?}");
        assert!(l.contains(r"/a\r2026 FAKE\u{1b}[2Kb"), "{l:?}");
    }

    #[test]
    fn line_separators_and_bidirectional_overrides_are_escaped() {
        // U+2028/U+2029 end a line in editors and log viewers; U+202E and the other bidi
        // controls reorder what a terminal shows, so a line could pass for another. Neither is a
        // `char::is_control` character.
        let l = line(
            "GET /a\u{2028}2026 FAKE\u{2029}\u{202e}x\u{2066}\u{200f} 404",
            None,
            false,
        );
        for c in ['\u{2028}', '\u{2029}', '\u{202e}', '\u{2066}', '\u{200f}'] {
            assert!(!l.contains(c), "{c:?} in {l:?}");
        }
        assert!(
            l.contains(r"/a\u{2028}2026 FAKE\u{2029}\u{202e}x\u{2066}\u{200f} 404"),
            "{l:?}"
        );
    }

    #[test]
    fn control_characters_are_found_in_the_bytes() {
        for c in (0..=0x10ffff_u32).filter_map(char::from_u32) {
            let s = format!("a{c}b");
            assert_eq!(has_control(&s), escaped(c), "{c:?}");
        }
    }

    #[test]
    fn request_and_user_ids_end_the_line() {
        assert!(line("GET /user/me 200", Some((7, Some(3))), false)
            .ends_with("GET /user/me 200 request=7 user=3\n"));
        assert!(line("GET /healthz 200", Some((8, None)), false)
            .ends_with("GET /healthz 200 request=8\n"));
    }

    #[test]
    fn an_open_progress_line_is_ended_first() {
        assert!(line("x", None, true).starts_with("\n2026-"));
        assert!(line("x", None, false).starts_with("2026-"));
    }

    #[test]
    fn request_scope_sets_and_clears() {
        let scope = begin_request();
        set_user(5);
        assert_eq!(current(), Some((scope.id, Some(5))));
        let next = begin_request();
        assert!(next.id > scope.id);
        drop(next);
        drop(scope);
        assert_eq!(current(), None);
        set_user(6);
        assert_eq!(current(), None);
    }
}
