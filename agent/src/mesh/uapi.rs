//! A small client for WireGuard's cross-platform UAPI: the text protocol a
//! userspace implementation (here `wireguard-go`) speaks on its socket
//! `/var/run/wireguard/<if>.sock`. Used to probe a daemon and to set the
//! private key and listen port without touching the peers (defguard's
//! `configure_interface` always sends `replace_peers=true`).

use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context};

/// Where `wireguard-go` (and every other UAPI implementation) puts its sockets.
const DIR: &str = "/var/run/wireguard";
/// How long one UAPI request may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The UAPI socket of interface `ifname`. The path is global, not per
/// network namespace, so interface names must be unique on the host.
pub fn path(ifname: &str) -> PathBuf {
    Path::new(DIR).join(format!("{ifname}.sock"))
}

/// What is behind an interface's UAPI socket path.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Probe {
    /// Answers `get=1` with `errno=0`.
    Alive,
    /// The socket file exists but nobody listens on it.
    Stale,
    /// No socket file.
    Absent,
}

pub(super) async fn probe(ifname: &str) -> anyhow::Result<Probe> {
    let name = ifname.to_owned();
    tokio::task::spawn_blocking(move || {
        let path = path(&name);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(Probe::Absent);
        }
        match request(&name, "get=1\n\n") {
            Ok(response) => match errno(&response) {
                Some(0) => Ok(Probe::Alive),
                errno => Err(anyhow!("UAPI get on {} answered errno {errno:?}", path.display())),
            },
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => Ok(Probe::Stale),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Probe::Absent),
            // Not a socket at all (a leftover regular file): as good as stale.
            Err(err) if err.raw_os_error() == Some(libc::ENOTSOCK) => Ok(Probe::Stale),
            // Anything else (e.g. a timeout) may be a live but busy daemon:
            // never remove its socket.
            Err(err) => Err(err).with_context(|| format!("probing {}", path.display())),
        }
    })
    .await?
}

/// One UAPI request; returns the response up to (not including) the blank
/// line that ends it.
fn request(ifname: &str, request: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path(ifname))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut response = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\n" {
            break;
        }
        response.push_str(&line);
    }
    Ok(response)
}

fn errno(response: &str) -> Option<i64> {
    response
        .lines()
        .find_map(|line| line.strip_prefix("errno="))
        .and_then(|value| value.trim().parse().ok())
}

/// A UAPI `set` of `body` (lines ending in `\n`), which must report errno 0.
/// Without `replace_peers=true` no peer is touched.
pub(super) fn set(ifname: &str, body: &str) -> anyhow::Result<()> {
    let response = request(ifname, &format!("set=1\n{body}\n"))
        .with_context(|| format!("UAPI set on {}", path(ifname).display()))?;
    match errno(&response) {
        Some(0) => Ok(()),
        errno => bail!("UAPI set on {ifname} failed: errno {errno:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_parsing() {
        assert_eq!(errno("listen_port=1\nerrno=0\n"), Some(0));
        assert_eq!(errno("errno=22\n"), Some(22));
        assert_eq!(errno("listen_port=1\n"), None);
    }
}
