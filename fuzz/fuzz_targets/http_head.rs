//! The HTTP layer over a real socket: arbitrary bytes are sent to the patched tiny_http server
//! (the one keyrack runs, with short deadlines), then the client closes its sending half. The
//! server must not panic, must answer with an HTTP/1.x status line or close without a word,
//! and must close the connection within the head deadline (plus a margin): never hang.
//!
//!     RUSTC_BOOTSTRAP=1 cargo fuzz run http_head -- -max_total_time=600
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tiny_http::{ConnectionOptions, Response, Server};

const HEAD_TIMEOUT: Duration = Duration::from_millis(1500);

fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = Server::from_listener_with_options(
            listener,
            None,
            ConnectionOptions {
                read_timeout: Some(HEAD_TIMEOUT),
                write_timeout: Some(HEAD_TIMEOUT),
                max_connections: 256,
                head_timeout: Some(HEAD_TIMEOUT),
                idle_timeout: Some(HEAD_TIMEOUT),
                ..ConnectionOptions::default()
            },
        )
        .expect("server");
        let server = std::sync::Arc::new(server);
        for _ in 0..2 {
            let server = server.clone();
            std::thread::spawn(move || {
                while let Ok(mut rq) = server.recv() {
                    // As keyrack does: read at most 64 KiB + 1 of the body, then answer.
                    let mut body = Vec::new();
                    let _ = rq.as_reader().take(64 * 1024 + 1).read_to_end(&mut body);
                    let close = body.len() > 64 * 1024;
                    let mut resp = Response::from_string(format!("{} bytes", body.len()));
                    if close {
                        if let Ok(h) = tiny_http::Header::from_bytes(&b"Connection"[..], &b"close"[..]) {
                            resp.add_header(h);
                        }
                    }
                    let _ = rq.respond(resp);
                }
            });
        }
        addr
    })
}

fuzz_target!(|data: &[u8]| {
    let addr = server();
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(HEAD_TIMEOUT * 3)).expect("timeout");
    let start = Instant::now();
    let _ = c.write_all(data);
    let _ = c.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    match c.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => {}
        Err(e) => panic!(
            "no close after {:?} ({e}); input {:?}, read {:?}",
            start.elapsed(),
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(&out)
        ),
    }
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
        "not an HTTP/1.x answer: {:?}",
        String::from_utf8_lossy(&out)
    );
});
