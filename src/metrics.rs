//! Counters for `GET /metrics` (Prometheus text format): requests by route and status, request
//! durations, writes per group commit. Counting is a few relaxed atomic additions into arrays
//! sized once at start (no lock, no allocation per request); the text is written at scrape time,
//! together with the gauges read from the database (keys by store, the phase, legacy reads,
//! foreign column writes: counts only, `store::counts`) and the count of undecryptable values
//! kept by the background survey (`http::surveyor`): a scrape decrypts nothing.
//!
//! Written by hand rather than with `prometheus-client`: its labelled families look a label set
//! up under a lock on every request, and the text format of a handful of fixed series is short.
//! `promtool check metrics` checks the output in the test suite.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::phase::Phase;
use crate::store::counts::Counts;

/// Upper bounds of the request duration buckets, in seconds.
const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Upper bounds of the group commit size buckets, in writes.
const GROUP_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
/// Status codes 100 to 599 each have a slot.
const STATUSES: usize = 500;

/// A histogram of fixed buckets: counts per bucket (the last one past every bound), the sum in
/// millionths and the count.
struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    sum_micro: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut total = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            total += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {total}");
        }
        total += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let sum = self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {total}", braces(labels));
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// The request counters: one row per route (the last row for paths no route matches).
struct Requests {
    routes: Vec<&'static str>,
    by_status: Box<[AtomicU64]>,
    durations: Vec<Histogram>,
}

static REQUESTS: OnceLock<Requests> = OnceLock::new();
static GROUPS: OnceLock<Histogram> = OnceLock::new();

/// The label of requests to paths that no route matches.
const OTHER_ROUTE: &str = "other";

/// Sizes the request counters for these route patterns; called once before serving.
pub fn init(routes: &[&'static str]) {
    REQUESTS.get_or_init(|| {
        let mut names = routes.to_vec();
        names.push(OTHER_ROUTE);
        Requests {
            by_status: (0..names.len() * STATUSES)
                .map(|_| AtomicU64::new(0))
                .collect(),
            durations: names
                .iter()
                .map(|_| Histogram::new(&DURATION_BUCKETS))
                .collect(),
            routes: names,
        }
    });
}

/// Counts one answered request: `route` is the index of its route pattern (as given to
/// [`init`]), or `None` for a path no route matches.
pub fn request(route: Option<usize>, status: u16, elapsed: Duration) {
    let Some(r) = REQUESTS.get() else { return };
    let row = route
        .filter(|i| *i < r.routes.len() - 1)
        .unwrap_or(r.routes.len() - 1);
    if (100..600).contains(&status) {
        r.by_status[row * STATUSES + usize::from(status - 100)].fetch_add(1, Ordering::Relaxed);
    }
    r.durations[row].observe(elapsed.as_secs_f64());
}

/// Counts one group commit of `writes` writes.
pub fn group_commit(writes: usize) {
    GROUPS
        .get_or_init(|| Histogram::new(&GROUP_BUCKETS))
        .observe(writes as f64);
}

/// Logins and registrations waiting for the hashing pool (`http::hashing`).
static HASH_QUEUE: AtomicI64 = AtomicI64::new(0);

/// Counts requests entering (`1`) or leaving (`-1`) the hashing pool's queue.
pub(crate) fn hash_queue(change: i64) {
    HASH_QUEUE.fetch_add(change, Ordering::Relaxed);
}

/// The count of undecryptable values of the last background survey (`None` before the first),
/// and the condition a scrape waits on for the first one.
static UNDECRYPTABLE: (Mutex<Option<u64>>, Condvar) = (Mutex::new(None), Condvar::new());

/// Keeps the count of undecryptable values the background survey found.
pub(crate) fn set_undecryptable(count: u64) {
    *crate::lock(&UNDECRYPTABLE.0) = Some(count);
    UNDECRYPTABLE.1.notify_all();
}

/// The count of undecryptable values kept, waiting up to `wait` for the first survey (a scrape
/// right after start).
pub(crate) fn undecryptable(wait: Duration) -> Option<u64> {
    let kept = crate::lock(&UNDECRYPTABLE.0);
    let (kept, _) = UNDECRYPTABLE
        .1
        .wait_timeout_while(kept, wait, |n| n.is_none())
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *kept
}

/// The Prometheus text format of every metric, with the database's counts and the count of
/// undecryptable values the background survey kept (no sample before its first survey).
pub(crate) fn render(counts: &Counts, undecryptable: Option<u64>) -> String {
    let mut out = String::with_capacity(8192);
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };

    head(
        &mut out,
        "keyrack_http_requests_total",
        "counter",
        "HTTP requests answered, by route pattern and status code.",
    );
    if let Some(r) = REQUESTS.get() {
        for (row, route) in r.routes.iter().enumerate() {
            for code in 0..STATUSES {
                let n = r.by_status[row * STATUSES + code].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "keyrack_http_requests_total{{route=\"{route}\",status=\"{}\"}} {n}",
                        code + 100
                    );
                }
            }
        }
    }
    head(
        &mut out,
        "keyrack_http_request_duration_seconds",
        "histogram",
        "Time from reading a request to having written its answer, by route pattern.",
    );
    if let Some(r) = REQUESTS.get() {
        for (route, h) in r.routes.iter().zip(&r.durations) {
            if h.count() > 0 {
                h.render(
                    &mut out,
                    "keyrack_http_request_duration_seconds",
                    &format!("route=\"{route}\""),
                );
            }
        }
    }
    head(
        &mut out,
        "keyrack_group_commit_writes",
        "histogram",
        "Writes committed together in one transaction (one disk sync) by this process.",
    );
    GROUPS
        .get_or_init(|| Histogram::new(&GROUP_BUCKETS))
        .render(&mut out, "keyrack_group_commit_writes", "");

    head(
        &mut out,
        "keyrack_password_hash_slots",
        "gauge",
        "Passwords hashed or checked at once at most (the hashing pool's threads).",
    );
    let _ = writeln!(
        out,
        "keyrack_password_hash_slots {}",
        crate::auth::hash_slots()
    );
    head(
        &mut out,
        "keyrack_password_hashes_running",
        "gauge",
        "Passwords being hashed or checked now.",
    );
    let _ = writeln!(
        out,
        "keyrack_password_hashes_running {}",
        crate::auth::hashes_running()
    );
    head(
        &mut out,
        "keyrack_password_hash_queue",
        "gauge",
        "Logins and registrations waiting for the hashing pool.",
    );
    let _ = writeln!(
        out,
        "keyrack_password_hash_queue {}",
        HASH_QUEUE.load(Ordering::Relaxed).max(0)
    );

    let s = counts;
    head(
        &mut out,
        "keyrack_keys",
        "gauge",
        "Stored keys by store: the api_keys table and the legacy column users.openai_api_key.",
    );
    let _ = writeln!(out, "keyrack_keys{{store=\"api_keys\"}} {}", s.table_keys);
    let _ = writeln!(
        out,
        "keyrack_keys{{store=\"users_column\"}} {}",
        s.column_keys
    );
    head(
        &mut out,
        "keyrack_undecryptable_keys",
        "gauge",
        "Stored values that do not open with the configured keys, as of the last background survey.",
    );
    if let Some(n) = undecryptable {
        let _ = writeln!(out, "keyrack_undecryptable_keys {n}");
    }
    head(
        &mut out,
        "keyrack_users",
        "gauge",
        "Accounts in the database.",
    );
    let _ = writeln!(out, "keyrack_users {}", s.users);
    head(
        &mut out,
        "keyrack_phase",
        "gauge",
        "The migration phase: 1 for the current one, 0 for the others.",
    );
    for p in [Phase::Legacy, Phase::Dual, Phase::NewOnly] {
        let _ = writeln!(
            out,
            "keyrack_phase{{phase=\"{}\"}} {}",
            p.as_str(),
            u8::from(p == counts.phase)
        );
    }
    head(
        &mut out,
        "keyrack_legacy_reads_total",
        "counter",
        "Reads in phase dual that found a key only in the legacy column, since the phase last became dual.",
    );
    let _ = writeln!(
        out,
        "keyrack_legacy_reads_total {}",
        counts.evidence.legacy_reads
    );
    head(
        &mut out,
        "keyrack_foreign_column_writes_total",
        "counter",
        "Changes of the legacy column by anything other than keyrack, since the phase last became dual.",
    );
    let _ = writeln!(
        out,
        "keyrack_foreign_column_writes_total {}",
        counts.evidence.foreign_column_writes
    );
    head(
        &mut out,
        "keyrack_events_rows",
        "gauge",
        "Rows of the audit trail (repeated reads of one key by one actor are one row).",
    );
    let _ = writeln!(out, "keyrack_events_rows {}", counts.events.rows);
    head(
        &mut out,
        "keyrack_events_bytes",
        "gauge",
        "Bytes of the audit trail's table and indexes in the database file.",
    );
    let _ = writeln!(out, "keyrack_events_bytes {}", counts.events.bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&GROUP_BUCKETS);
        for v in [1.0, 1.0, 3.0, 500.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"128\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 505\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }
}
