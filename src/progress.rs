//! Progress of a long command (`migrate`, `rotate-encryption-key`) on stderr, only when stderr
//! is a terminal: `migrate: 12000/20000 rows (60%), 34000 rows/s, 0:00:01 left`, redrawn in
//! place. The logger ends an open progress line before it writes, so log lines never glue on.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::logging;

pub(crate) struct Progress {
    on: bool,
    start: Instant,
    what: &'static str,
    total: u64,
}

impl Progress {
    /// `total`: the number of rows the command expects to go through.
    pub(crate) fn new(what: &'static str, total: u64) -> Progress {
        Progress {
            on: std::io::stderr().is_terminal(),
            start: Instant::now(),
            what,
            total,
        }
    }

    pub(crate) fn update(&self, done: u64) {
        if self.on {
            let text = line(self.what, done, self.total, self.start.elapsed());
            let mut err = std::io::stderr().lock();
            // `\x1b[K` clears what a longer earlier line left behind.
            let _ = write!(err, "\r{text}\x1b[K");
            let _ = err.flush();
            logging::set_progress_open(true);
        }
    }

    pub(crate) fn finish(&self) {
        if self.on {
            logging::set_progress_open(false);
            eprintln!();
        }
    }
}

/// The text of one progress line.
pub(crate) fn line(what: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / secs;
    // Rows can be added while the command runs: never show more done than total.
    let total = total.max(done);
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    let left = if done == 0 || rate <= 0.0 {
        "time left unknown".to_owned()
    } else {
        let s = ((total - done) as f64 / rate).ceil() as u64;
        format!("{}:{:02}:{:02} left", s / 3600, s % 3600 / 60, s % 60)
    };
    format!("{what}: {done}/{total} rows ({percent}%), {rate:.0} rows/s, {left}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_done_total_rate_and_time_left() {
        assert_eq!(
            line("migrate", 12_000, 20_000, Duration::from_secs(2)),
            "migrate: 12000/20000 rows (60%), 6000 rows/s, 0:00:02 left"
        );
        assert_eq!(
            line("migrate", 0, 20_000, Duration::from_secs(1)),
            "migrate: 0/20000 rows (0%), 0 rows/s, time left unknown"
        );
        assert_eq!(
            line("rotate-encryption-key", 10, 10, Duration::from_secs(1)),
            "rotate-encryption-key: 10/10 rows (100%), 10 rows/s, 0:00:00 left"
        );
        assert_eq!(
            line("migrate", 1, 7_201, Duration::from_secs(1)),
            "migrate: 1/7201 rows (0%), 1 rows/s, 2:00:00 left"
        );
    }
}
