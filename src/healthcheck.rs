//! `keyrack healthcheck [--url URL]`: one plain HTTP GET of `/healthz`, for container images
//! without curl. Uses no database and no encryption key; exit 0 when the server answers 200.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::Failure;

/// The URL to check when `--url` is not given: `/healthz` on the listen address, with an
/// unspecified address (`0.0.0.0`, `::`) replaced by the loopback one.
pub fn default_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/healthz", SocketAddr::new(ip, listen.port()))
}

/// `http://HOST[:PORT][/PATH]` split into the authority and the path; a URL without a path (or
/// with `/`) checks `/healthz`.
fn split_url(url: &str) -> Result<(&str, String), Failure> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        Failure::Config(format!(
            "--url {url:?} is not valid; give http://HOST:PORT (plain HTTP, as keyrack serves)"
        ))
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains(['@', ' ']) {
        return Err(Failure::Config(format!(
            "--url {url:?} is not valid; give http://HOST:PORT"
        )));
    }
    let path = if path.is_empty() || path == "/" {
        "/healthz".to_owned()
    } else {
        path.to_owned()
    };
    Ok((authority, path))
}

/// GETs the URL; `Ok` when the answer's status is 200.
pub fn check(url: &str, timeout: Duration) -> Result<(), Failure> {
    let (authority, path) = split_url(url)?;
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'))
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let down = |what: String| Failure::Runtime(format!("{url}: {what}"));
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| down(format!("cannot resolve {authority}: {e}")))?
        .next()
        .ok_or_else(|| down(format!("{authority} has no address")))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| down(format!("cannot connect: {e}")))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| down(format!("cannot set a timeout: {e}")))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| down(format!("cannot send the request: {e}")))?;
    let mut head = Vec::new();
    let _ = stream.take(4096).read_to_end(&mut head);
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.to_owned(),
        _ => return Err(down("no HTTP answer".to_owned())),
    };
    if status == "200" {
        Ok(())
    } else {
        Err(down(format!("answered {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:8080").unwrap(),
            ("127.0.0.1:8080", "/healthz".to_owned())
        );
        assert_eq!(split_url("http://h/x").unwrap(), ("h", "/x".to_owned()));
        assert!(split_url("https://h").is_err());
        assert!(split_url("http://").is_err());
        assert_eq!(
            default_url("0.0.0.0:9000".parse().unwrap()),
            "http://127.0.0.1:9000/healthz"
        );
        assert_eq!(
            default_url("[::]:9000".parse().unwrap()),
            "http://[::1]:9000/healthz"
        );
    }
}
