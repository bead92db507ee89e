//! `stereo-recon healthcheck`: is the server in this container ready? For
//! Docker's exec-form `HEALTHCHECK` and Kubernetes exec probes, in an image
//! that has no shell and no curl.
//!
//! It asks the port the server *really* listens on: the listening TCP socket
//! owned by the server process (PID 1 in a container), found through
//! `/proc/<pid>/fd` and `/proc/<pid>/net/tcp{,6}`. So `serve --port 5078` in
//! the container's arguments, `STEREO_RECON_PORT`, or even `--port 0` are all
//! followed without the health check parsing anything of the server's set-up.
//! Only when that cannot be read (no /proc, another user) does it fall back to
//! the port `serve` would take from this environment.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// A listening TCP socket: its address and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listener {
    address: SocketAddr,
    inode: u64,
}

/// Parses `/proc/net/tcp` or `tcp6` text: the sockets in state LISTEN (0A).
fn listening_sockets(table: &str) -> Vec<Listener> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "0A" {
                return None;
            }
            let (ip, port) = fields[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = parse_proc_ip(ip)?;
            let inode = fields[9].parse().ok()?;
            Some(Listener { address: SocketAddr::new(ip, port), inode })
        })
        .collect()
}

/// The kernel writes addresses as 32-bit words in host byte order (little-endian here).
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<u32>> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()).collect();
    let bytes: Vec<u8> = words?.iter().flat_map(|w| w.to_le_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))),
        _ => None,
    }
}

/// The address `pid` listens on (its first listening TCP socket), from /proc.
fn listening_address_of(proc_root: &Path, pid: u32) -> Option<SocketAddr> {
    let process = proc_root.join(pid.to_string());
    let inodes: Vec<u64> = std::fs::read_dir(process.join("fd"))
        .ok()?
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let text = target.to_string_lossy().into_owned();
            text.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(process.join("net").join(table)).ok())
        .flat_map(|text| listening_sockets(&text))
        .find(|listener| inodes.contains(&listener.inode))
        .map(|listener| listener.address)
}

/// Where to connect for a server listening on `address`: loopback for a wildcard.
fn connect_address(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), address.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), address.port()),
        _ => address,
    }
}

/// The HTTP status of `GET path` at `address`.
fn status_of(address: SocketAddr, path: &str, timeout: Duration) -> Result<u16, String> {
    let mut stream =
        TcpStream::connect_timeout(&address, timeout).map_err(|e| format!("cannot connect to {address}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nUser-Agent: stereo-recon-healthcheck\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(|e| format!("cannot send to {address}: {e}"))?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).map_err(|e| format!("no answer from {address}: {e}"))?;
    let text = String::from_utf8_lossy(&head);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer from {address}: {text:?}"))
}

/// What to check.
#[derive(Debug, Clone)]
pub struct Check {
    /// A port given on the command line: no discovery.
    pub port: Option<u16>,
    /// The server process to follow.
    pub server_pid: u32,
    /// What `serve` would listen on from this environment (the fallback).
    pub fallback: SocketAddr,
    pub path: String,
    pub timeout: Duration,
}

/// Runs the check; `Ok` with a line to print when healthy.
pub fn run(check: &Check) -> Result<String, String> {
    let address = match check.port {
        Some(port) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
        None => listening_address_of(Path::new("/proc"), check.server_pid).unwrap_or(check.fallback),
    };
    let address = connect_address(address);
    match status_of(address, &check.path, check.timeout)? {
        200 => Ok(format!("healthy: {address}{} answered 200", check.path)),
        status => Err(format!("unhealthy: {address}{} answered {status}", check.path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_sockets_from_the_kernel_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                   0: 00000000:13BA 00000000:0000 0A 00000000:00000000 00:00000000 00000000 10001        0 424242 1 0 100 0 0 10 0\n   \
                   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000 10001        0 777 1 0 20 4 30 10 -1\n";
        let listeners = listening_sockets(tcp);
        assert_eq!(listeners, vec![Listener { address: "0.0.0.0:5050".parse().unwrap(), inode: 424242 }]);
        let tcp6 = "header\n   0: 00000000000000000000000001000000:13BA 00000000000000000000000000000000:0000 0A 0 0 0 0 0 9 0 99\n";
        assert_eq!(listening_sockets(tcp6)[0].address, "[::1]:5050".parse().unwrap());
        assert_eq!(parse_proc_ip("0100007F"), Some(Ipv4Addr::LOCALHOST.into()));
    }

    #[test]
    fn wildcards_are_checked_on_loopback() {
        assert_eq!(connect_address("0.0.0.0:5000".parse().unwrap()), "127.0.0.1:5000".parse().unwrap());
        assert_eq!(connect_address("[::]:5000".parse().unwrap()), "[::1]:5000".parse().unwrap());
        assert_eq!(connect_address("10.0.0.5:5000".parse().unwrap()), "10.0.0.5:5000".parse().unwrap());
    }

    #[test]
    fn finds_the_port_this_process_listens_on() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let found = listening_address_of(Path::new("/proc"), std::process::id());
        assert_eq!(found, Some(listener.local_addr().unwrap()));
    }
}
