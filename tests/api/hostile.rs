//! Hostile input: oversized heads, slow clients, trickled bodies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn oversized_request_line_is_414_and_headers_431() {
    let s = Env::new().serve();
    let long_path = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(10_000));
    let ans = exchange(&s.addr, long_path.as_bytes());
    assert!(ans.starts_with("HTTP/1.1 414"), "{ans}");
    assert!(ans.contains("uri_too_long"));

    let long_header = format!(
        "GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(10_000)
    );
    let ans = exchange(&s.addr, long_header.as_bytes());
    assert!(ans.starts_with("HTTP/1.1 431"), "{ans}");
    assert!(ans.contains("headers_too_large"));

    let mut many = String::from("GET /healthz HTTP/1.1\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let ans = exchange(&s.addr, many.as_bytes());
    assert!(ans.starts_with("HTTP/1.1 431"), "{ans}");

    // A line that never ends is cut off, not buffered without bound.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        .unwrap();
    let chunk = vec![b'z'; 64 * 1024];
    for _ in 0..16 {
        if c.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"));

    // A malformed chunked body: 400, not a dropped connection.
    let ans = exchange(
        &s.addr,
        b"POST /auth/login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
    );
    assert!(ans.starts_with("HTTP/1.1 400"), "{ans}");

    assert_eq!(s.get("/healthz", None).status, 200);
}

#[test]
fn slow_clients_do_not_hold_the_server() {
    let s = Env::new().serve_with(&["--workers", "4"]);
    let pid = s.child.id();
    // 200 connections that send part of a head and then nothing; 20 that send a head and
    // part of a small body, and 20 part of a chunked body.
    let mut slow = Vec::new();
    for i in 0..200 {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.write_all(format!("GET /healthz HTTP/1.1\r\nX-Slow-{i}: ").as_bytes())
            .unwrap();
        slow.push(c);
    }
    for _ in 0..20 {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.write_all(b"POST /auth/login HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"email\":")
            .unwrap();
        slow.push(c);
    }
    for _ in 0..20 {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.write_all(
            b"POST /auth/login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n{\"email\":",
        )
        .unwrap();
        slow.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    // A healthy client is answered at once, on a new connection, several times.
    for _ in 0..5 {
        healthz_answers_within_a_second(&s.base, Duration::from_secs(5));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (threads, rss_kib) = (field("Threads:"), field("VmRSS:"));
    eprintln!("with 240 slow connections: {threads} threads, {rss_kib} KiB resident");
    // One thread per open connection (bounded by the connection limit), plus a few.
    assert!(threads <= 240 + 32, "{threads} threads");
    assert!(rss_kib < 64 * 1024, "{rss_kib} KiB");
    drop(slow);
}

#[test]
fn a_trickled_head_is_cut_off_at_the_deadline() {
    let s = Env::new().var("KEYRACK_HEAD_TIMEOUT", "0.5").serve();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let start = Instant::now();
    let mut closed = false;
    // A byte every 0.1 s: each read of the server succeeds, so only the head deadline ends it.
    for b in b"GET /healthz HTTP/1.1\r\nX-Trickle: "
        .iter()
        .cycle()
        .take(40)
    {
        if c.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match c.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(closed, "still open after {:?}", start.elapsed());
    // Each byte came well within the socket timeout (10 s): only the head deadline (0.5 s
    // from the first byte) ends it, and not before.
    assert!(
        start.elapsed() >= Duration::from_millis(500) && start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(s.get("/healthz", None).status, 200);
}

/// A raw connection whose receive buffer is as small as the kernel allows (about 4 KiB): its
/// answers pile up on the server's side as soon as it stops reading.
fn connect_with_small_receive_buffer(addr: &str) -> TcpStream {
    use std::os::unix::io::AsRawFd;
    let c = TcpStream::connect(addr).unwrap();
    let size: libc::c_int = 4096;
    // SAFETY: a valid socket and a pointer to a c_int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    c
}

/// A connection that sends 400 pipelined requests for a 25 KB answer (16 KB sent) and never
/// reads a byte of the answers.
fn never_reading(addr: &str) -> TcpStream {
    let mut c = connect_with_small_receive_buffer(addr);
    c.write_all(&b"GET /openapi.yaml HTTP/1.1\r\n\r\n".repeat(400))
        .unwrap();
    c
}

/// `VmRSS` of a process, in KiB.
fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_client_that_never_reads_its_answers_holds_no_worker() {
    // A long socket timeout: a worker waiting to write to the attacker would wait that long.
    let env = Env::new().var("KEYRACK_SOCKET_TIMEOUT", "60");
    let s = env.serve_with(&["--workers", "2"]);
    // 400 pipelined requests for a 25 KB answer (16 KB sent), and never a byte read.
    let attacker = never_reading(&s.addr);
    // The answers have filled every buffer between the server and the attacker.
    assert!(
        poll_until(Duration::from_secs(20), || {
            s.logs().matches("GET /openapi.yaml 200").count() >= 5
        }),
        "{}",
        s.logs()
    );
    std::thread::sleep(Duration::from_millis(300));
    // Every other client is still served at once, over and over.
    for _ in 0..5 {
        healthz_answers_within_a_second(&s.base, Duration::from_secs(10));
    }
    drop(attacker);
}

#[test]
fn an_answer_that_was_never_read_is_logged_as_not_delivered() {
    let env = Env::new().var("KEYRACK_SOCKET_TIMEOUT", "1");
    let s = env.serve_with(&["--workers", "2"]);
    let attacker = never_reading(&s.addr);
    // The answer the attacker's buffers could not take is logged as such once the write
    // timeout ends the connection; the answers before it as delivered; none after it.
    assert!(
        poll_until(Duration::from_secs(20), || s
            .logs()
            .contains("GET /openapi.yaml 200 not delivered")),
        "{}",
        s.logs()
    );
    let logs = s.logs();
    let delivered = logs.matches("GET /openapi.yaml 200 ").count()
        - logs.matches("GET /openapi.yaml 200 not delivered").count();
    assert_eq!(logs.matches("not delivered").count(), 1, "{logs}");
    assert!(delivered < 399, "{delivered} answers logged as delivered");
    assert_eq!(s.get("/healthz", None).status, 200);
    drop(attacker);
}

#[test]
fn a_pipelined_flood_on_one_connection_does_not_grow_the_server() {
    let s = Env::new().serve_with(&["--workers", "2"]);
    let pid = s.child.id();
    let idle = resident_kib(pid);
    // First a connection that stops reading its answers (it held every worker before).
    let stuck = never_reading(&s.addr);
    // Then up to 16 MiB of pipelined requests (about 650,000) for 5 s, never reading an answer:
    // the server reads them only as fast as their answers leave, so the writes soon wait.
    let mut flood = connect_with_small_receive_buffer(&s.addr);
    flood
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let chunk = b"GET /healthz HTTP/1.1\r\n\r\n".repeat(1_000);
    let start = Instant::now();
    let mut sent = 0;
    while sent < 16 << 20 && start.elapsed() < Duration::from_secs(5) {
        match flood.write(&chunk) {
            Ok(n) => sent += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("the server closed the connection: {e}"),
        }
    }
    let mut peak = 0;
    poll_until(Duration::from_secs(1), || {
        peak = peak.max(resident_kib(pid));
        false
    });
    eprintln!("sent {sent} bytes; resident {idle} KiB idle, {peak} KiB after the flood");
    assert!(
        peak < idle + 64 * 1024,
        "{idle} KiB idle, {peak} KiB after {sent} bytes"
    );
    healthz_answers_within_a_second(&s.base, Duration::from_secs(10));
    drop((flood, stuck));
}

/// Failed on be4b7c9 (answered after 29.9 s, the attackers' write timeout): a connection waiting
/// for an answer its client does not read was neither idle nor reading a head, so the accept
/// thread never made room from it. Such a connection is now `Answering` in the tracker, made
/// room from after a second like a slow head.
#[test]
fn at_the_cap_connections_whose_clients_do_not_read_make_room() {
    // A long socket timeout: a connection writing an answer nobody reads holds its thread that
    // long. The cap is 4 connections (debug builds only).
    let env = Env::new()
        .var("KEYRACK_SOCKET_TIMEOUT", "30")
        .var("KEYRACK_TEST_MAX_CONNECTIONS", "4");
    let s = env.serve_with(&["--workers", "2"]);
    // As many connections as the cap, each pipelining 400 requests for a 25 KB answer and never
    // reading one: each connection's thread is soon left writing an answer its client does not
    // take (neither idle nor reading a head).
    let mut attackers = Vec::new();
    for _ in 0..4 {
        attackers.push(never_reading(&s.addr));
    }
    // Every attacker's buffers are full: the count of answers written stops growing.
    let mut last = 0;
    assert!(poll_until(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = s.logs().matches("GET /openapi.yaml 200").count();
        let settled = now >= 4 * 5 && now == last;
        last = now;
        settled
    }));
    // A healthy client is not left in the backlog until an attacker's write timeout (30 s):
    // like a slow head, a connection that has spent over a second writing an answer its client
    // does not read makes room.
    let start = Instant::now();
    let (ans, _) = exchange_within(
        &s.addr,
        b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(30),
    );
    let took = start.elapsed();
    assert!(ans.starts_with("HTTP/1.1 200"), "{ans:?} after {took:?}");
    assert!(
        took < within(Duration::from_secs(2)),
        "answered after {took:?}"
    );
    drop(attackers);
}
