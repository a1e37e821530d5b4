//! Start-up, for the benchmark: the time from starting a server process (fork and exec) to its
//! ready line on stdout, RUNS times for each server given, the servers taken in turn (so a
//! slow moment of a shared machine falls on all of them alike). `{n}` in a server's arguments
//! becomes the run's number, so each run can have a fresh database file. After its ready line
//! each server gets SIGTERM and is waited for (not timed).
//!
//!     cargo run --release --example start_to_ready -- RUNS NAME=CMD ARG... -- NAME=CMD ARG...
//!
//! Prints one line per server: `NAME median_ms min_ms max_ms` (milliseconds).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    name: String,
    program: String,
    args: Vec<String>,
    times: Vec<Duration>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().ok_or("give RUNS")?.parse()?;
    let rest: Vec<String> = args.collect();
    let mut servers = Vec::new();
    for part in rest.split(|a| a == "--") {
        let (first, more) = part.split_first().ok_or("give a server after --")?;
        let (name, program) = first
            .split_once('=')
            .ok_or("give each server as NAME=CMD")?;
        servers.push(Server {
            name: name.to_owned(),
            program: program.to_owned(),
            args: more.to_vec(),
            times: Vec::with_capacity(runs),
        });
    }
    // One start of each first, not counted: the binaries and libraries come into the page cache.
    for warm in [true, false] {
        for n in 0..if warm { 1 } else { runs } {
            for s in &mut servers {
                let tag = if warm {
                    format!("warm{n}")
                } else {
                    n.to_string()
                };
                let args: Vec<String> = s.args.iter().map(|a| a.replace("{n}", &tag)).collect();
                let t = start_once(&s.program, &args)?;
                if !warm {
                    s.times.push(t);
                }
            }
        }
    }
    for s in &mut servers {
        s.times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{} {:.2} {:.2} {:.2}",
            s.name,
            ms(s.times[s.times.len() / 2]),
            ms(s.times[0]),
            ms(s.times[s.times.len() - 1])
        );
    }
    Ok(())
}

/// Starts the server, reads its first line, stops it; the time to that line.
fn start_once(program: &str, args: &[String]) -> Result<Duration, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let elapsed = start.elapsed();
    if !line.contains("listening on") {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{program}: no ready line (got {line:?})").into());
    }
    // SAFETY: kill(2) on the child's own pid, which is not yet waited for.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    child.wait()?;
    Ok(elapsed)
}
