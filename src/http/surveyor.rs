//! The background survey behind `keyrack_undecryptable_keys` in `GET /metrics`. Counting the
//! values that do not open means opening every one (0.1 s and more per 100,000 keys); a scrape
//! did it on a reader thread, any number of scrapes at once. Here one thread of its own does it,
//! at most one survey at a time: at start, then whenever the database's data version changed
//! (a commit by this process or any other) and at least `every` has passed since the last one.
//! A scrape reads the count kept (`metrics::undecryptable`), which therefore lags a change by at
//! most `every` plus a second plus one survey's time (`KEYRACK_METRICS_REFRESH`, 30 s by
//! default, at most 60).

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::app::App;

/// The running survey thread; `stop` ends it.
pub(super) struct Surveyor {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// Starts the thread: it opens its connection, and its first survey runs at once.
pub(super) fn start(app: Arc<App>, every: Duration) -> std::io::Result<Surveyor> {
    let (stop, stopped) = mpsc::channel::<()>();
    // The data version is looked at this often; a survey runs only when it moved.
    let check = every.min(Duration::from_secs(1));
    let thread = thread::Builder::new()
        .name("surveyor".into())
        .spawn(move || {
            let mut store = loop {
                match app.store() {
                    Ok(store) => break store,
                    Err(f) => {
                        log::warn!("cannot open the survey's connection yet: {}", f.message());
                        match stopped.recv_timeout(Duration::from_secs(1)) {
                            Err(RecvTimeoutError::Timeout) => continue,
                            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                }
            };
            // The data version the count kept was surveyed at, and when.
            let mut last: Option<(Option<u32>, Instant)> = None;
            loop {
                let due = match last {
                    None => true,
                    Some((version, at)) => {
                        at.elapsed() >= every
                            && (version.is_none() || store.data_version().ok().flatten() != version)
                    }
                };
                if due {
                    match store.undecryptable() {
                        Ok((count, version)) => {
                            crate::metrics::set_undecryptable(count);
                            last = Some((version, Instant::now()));
                        }
                        Err(e) => log::warn!(
                            "could not count the undecryptable values for the metrics yet: {}",
                            crate::error_chain(&e)
                        ),
                    }
                }
                match stopped.recv_timeout(check) {
                    Err(RecvTimeoutError::Timeout) => continue,
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
    Ok(Surveyor { stop, thread })
}

impl Surveyor {
    /// Ends the thread (after the survey in progress, if any).
    pub(super) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
