//! The benchmark's baseline: the smallest tiny_http server of the same shape as keyrack (the
//! same patched tiny_http, a listener of its own, a fixed pool of workers on `recv`), answering
//! GET /healthz with keyrack's body and nothing else. keyrack's throughputs are reported as
//! ratios of this one, measured in the same run.
//!
//!     cargo run --release --example baseline -- 127.0.0.1:0 WORKERS

use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let workers: usize = args.next().map_or(Ok(4), |w| w.parse())?;
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let server = Arc::new(tiny_http::Server::from_listener(listener, None)?);
    // The size of keyrack's own answer to GET /healthz.
    let body = br#"{"status":"ok","phase":"dual","version":"0.2.0","schema_version":5}"#;
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let server = server.clone();
            std::thread::spawn(move || {
                while let Ok(rq) = server.recv() {
                    let resp = tiny_http::Response::from_data(&body[..]).with_header(
                        tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"application/json"[..],
                        )
                        .expect("a valid header"),
                    );
                    let _ = rq.respond(resp);
                }
            })
        })
        .collect();
    println!("baseline listening on http://{local}");
    std::io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
