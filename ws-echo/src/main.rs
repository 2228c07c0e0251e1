//! `berth-ws-echo [PORT | ADDR:PORT]`: a WebSocket echo server (see lib.rs),
//! by default on port 8081 of every address. Berth's test image runs it next
//! to busybox httpd (scripts/make-test-image.sh).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::ExitCode;

const USAGE: &str = "usage: berth-ws-echo [PORT | ADDR:PORT]\n\
    WebSocket echo server (RFC 6455): every text and binary message comes back\n\
    unchanged, pings get pongs. Default: port 8081 on every address.\n";

/// `[::]:port` (dual stack), or `0.0.0.0:port` where IPv6 is off.
fn bind_any(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listener = match args.as_slice() {
        [] => bind_any(8081),
        [a] if a == "-h" || a == "--help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        [a] => {
            if let Ok(port) = a.parse::<u16>() {
                bind_any(port)
            } else if let Ok(addr) = a.parse::<SocketAddr>() {
                TcpListener::bind(addr)
            } else {
                eprint!("berth-ws-echo: not a port or address: {a}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            eprintln!("berth-ws-echo: listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        eprintln!("berth-ws-echo: listening on {addr}");
    }
    match berth_ws_echo::serve(listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-ws-echo: {e}");
            ExitCode::FAILURE
        }
    }
}
