//! `--exit-with-parent` (`KEYRACK_EXIT_WITH_PARENT=1`): a server started by a test harness
//! stops when the harness is gone, however it ended (SIGKILL, a crash), instead of running on
//! as an orphan. Linux's parent-death signal (`PR_SET_PDEATHSIG`) sends this process SIGTERM
//! when its parent exits, and SIGTERM takes the ordinary graceful path: requests in flight are
//! answered, usage counters written, exit 0. The kernel sends it when the *thread* that started
//! keyrack ends, so a harness should start it from a thread that lives as long as the server
//! is wanted (its main thread, or the test's own).

use crate::Failure;

/// Asks for SIGTERM at the parent's exit; the signal handlers must already be installed. If the
/// parent is already gone (it is no longer `parent_at_start`), SIGTERM is raised at once.
#[cfg(target_os = "linux")]
pub(super) fn exit_with_parent(parent_at_start: u32) -> Result<(), Failure> {
    let sigterm = libc::SIGTERM as libc::c_ulong;
    // SAFETY: prctl(PR_SET_PDEATHSIG, signal) only changes this process's own attributes.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sigterm, 0, 0, 0) } != 0 {
        return Err(Failure::Runtime(format!(
            "--exit-with-parent: cannot ask for the parent-death signal: {}",
            std::io::Error::last_os_error()
        )));
    }
    // The parent may have exited before the signal was asked for: then none will come.
    if std::os::unix::process::parent_id() != parent_at_start {
        log::info!("the process that started keyrack is gone: stopping");
        signal_hook::low_level::raise(libc::SIGTERM)
            .map_err(|e| Failure::Runtime(format!("cannot raise SIGTERM: {e}")))?;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(super) fn exit_with_parent(_parent_at_start: u32) -> Result<(), Failure> {
    Err(Failure::Config(
        "--exit-with-parent / KEYRACK_EXIT_WITH_PARENT works on Linux only".to_owned(),
    ))
}
