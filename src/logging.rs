//! Logging to stderr, filtered by `RUST_LOG` syntax (env_filter), one `write` per line.
//!
//! Why not env_logger's formatter: the server writes one line per request, and under load
//! env_logger's styled formatting cost a tenth of the throughput of GET /healthz (profiled with
//! perf). This logger formats into a reused per-thread buffer and writes the finished line at
//! once. Line format: `2026-11-25T20:09:15.713Z INFO  keyrack::http] GET /healthz 200 0.1ms`.

use std::cell::RefCell;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

use crate::clock;

struct Logger {
    filter: env_filter::Filter,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(256));
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            clock::push_rfc3339_millis(&mut line, now.as_secs() as i64, now.subsec_millis());
            use std::fmt::Write as _;
            let _ = writeln!(
                line,
                " {:<5} {}] {}",
                record.level(),
                record.target(),
                record.args()
            );
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        });
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger with a `RUST_LOG`-style filter such as `info` or `warn,keyrack=debug`.
pub fn init(spec: &str) {
    let filter = env_filter::Builder::new().parse(spec).build();
    let level: LevelFilter = filter.filter();
    if log::set_boxed_logger(Box::new(Logger { filter })).is_ok() {
        log::set_max_level(level);
    }
}
