//! A WebSocket echo server (RFC 6455) for Berth's test image, with nothing
//! but the standard library: the opening handshake (SHA-1 and base64 of the
//! key, below), masked client frames, fragmented messages, text (checked to be
//! UTF-8) and binary messages echoed back whole, ping answered with pong, and
//! the close handshake. Protocol errors close the connection with the status
//! code RFC 6455 gives them (1002, 1007, 1009).
//!
//! The 101 response carries `X-Echo-Hostname` (the container's host name), so
//! a client behind a proxy can tell which replica answered.

use std::io::{self, BufReader, Cursor, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

/// Largest message (and frame) accepted; a bigger one closes with 1009.
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest request head of the opening handshake.
const MAX_HEAD: usize = 16 << 10;
/// How long the opening handshake may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A WebSocket that moves nothing for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a closed session waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// RFC 6455, section 1.3.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// SHA-1 (FIPS 180-4) of `data`.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (o, hv) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&hv.to_be_bytes());
    }
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648, with padding).
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = u32::from(c[0]) << 16 | u32::from(*c.get(1).unwrap_or(&0)) << 8 | u32::from(*c.get(2).unwrap_or(&0));
        let sextet = |shift: u32| B64[(n >> shift) as usize & 63] as char;
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if c.len() > 1 { sextet(6) } else { '=' });
        out.push(if c.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    base64(&sha1(format!("{key}{WS_GUID}").as_bytes()))
}

/// A key is the base64 of 16 bytes: 22 characters and `==`.
fn valid_key(key: &str) -> bool {
    key.len() == 24 && key.ends_with("==") && key.bytes().take(22).all(|b| B64.contains(&b))
}

/// The request line and headers of the opening handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// Values of every header called `name` (case-insensitive).
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// True if a comma-separated header `name` lists `token`.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Parses an HTTP/1.1 request head (without the blank line).
pub fn parse_request(head: &[u8]) -> Result<Request, &'static str> {
    let head = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version), None) = (first.next(), first.next(), first.next(), first.next())
    else {
        return Err("malformed request line");
    };
    if version != "HTTP/1.1" {
        return Err("WebSocket needs HTTP/1.1");
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("malformed header line")?;
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err("malformed header name");
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
    })
}

/// Why a handshake is refused: status code, reason phrase, body.
pub type Refusal = (u16, &'static str, &'static str);

/// Checks an opening handshake; `Ok` holds the `Sec-WebSocket-Accept` value.
pub fn check_handshake(req: &Request) -> Result<String, Refusal> {
    if !req.has_token("upgrade", "websocket") {
        return Err((426, "Upgrade Required", "berth-ws-echo only speaks WebSocket\n"));
    }
    if req.method != "GET" {
        return Err((405, "Method Not Allowed", "a WebSocket handshake is a GET\n"));
    }
    if !req.has_token("connection", "upgrade") {
        return Err((400, "Bad Request", "Connection: upgrade is missing\n"));
    }
    if !req.values("sec-websocket-version").any(|v| v == "13") {
        return Err((426, "Upgrade Required", "only WebSocket version 13 is supported\n"));
    }
    let mut keys = req.values("sec-websocket-key");
    match (keys.next(), keys.next()) {
        (Some(key), None) if valid_key(key) => Ok(accept_key(key)),
        _ => Err((400, "Bad Request", "Sec-WebSocket-Key is missing or invalid\n")),
    }
}

/// What ends a session other than a clean close.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// Close with this status code and reason.
    Protocol(u16, &'static str),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Protocol(code, why) => write!(f, "closed with {code}: {why}"),
        }
    }
}

/// One frame, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Reads one client frame (which must be masked) and unmasks its payload.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Frame, Error> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let fin = h[0] & 0x80 != 0;
    if h[0] & 0x70 != 0 {
        return Err(Error::Protocol(1002, "reserved bits set"));
    }
    let opcode = h[0] & 0x0f;
    if h[1] & 0x80 == 0 {
        return Err(Error::Protocol(1002, "client frames must be masked"));
    }
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Err(Error::Protocol(1002, "frame length has its top bit set"));
            }
            n
        }
        n => u64::from(n),
    };
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(Error::Protocol(
            1002,
            "control frames must be final and at most 125 bytes",
        ));
    }
    if len > max as u64 {
        return Err(Error::Protocol(1009, "message too big"));
    }
    let mut mask = [0u8; 4];
    r.read_exact(&mut mask)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(Frame { fin, opcode, payload })
}

/// A final, unmasked (server to client) frame.
pub fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// Status codes a peer may send in a close frame (RFC 6455 section 7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// The payload of our answer to a close frame: its status code, if any.
fn close_reply(payload: &[u8]) -> Result<Vec<u8>, Error> {
    match payload {
        [] => Ok(vec![]),
        [_] => Err(Error::Protocol(1002, "close frame with a 1-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !valid_close_code(code) {
                return Err(Error::Protocol(1002, "invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Error::Protocol(1007, "close reason is not UTF-8"));
            }
            Ok(code.to_be_bytes().to_vec())
        }
    }
}

fn deliver(w: &mut impl Write, opcode: u8, data: &[u8]) -> Result<(), Error> {
    if opcode == OP_TEXT && std::str::from_utf8(data).is_err() {
        return Err(Error::Protocol(1007, "text message is not UTF-8"));
    }
    w.write_all(&encode_frame(opcode, data))?;
    Ok(())
}

/// Echoes messages from `r` to `w` until the client closes (`Ok`, after our
/// close frame is written) or breaks the protocol.
pub fn session(r: &mut impl Read, w: &mut impl Write) -> Result<(), Error> {
    let mut partial: Option<(u8, Vec<u8>)> = None;
    loop {
        let f = read_frame(r, MAX_MESSAGE)?;
        match f.opcode {
            OP_CONTINUATION => {
                let Some((_, data)) = partial.as_mut() else {
                    return Err(Error::Protocol(1002, "continuation frame without a message"));
                };
                if data.len() + f.payload.len() > MAX_MESSAGE {
                    return Err(Error::Protocol(1009, "message too big"));
                }
                data.extend_from_slice(&f.payload);
                if f.fin {
                    if let Some((opcode, data)) = partial.take() {
                        deliver(w, opcode, &data)?;
                    }
                }
            }
            OP_TEXT | OP_BINARY => {
                if partial.is_some() {
                    return Err(Error::Protocol(1002, "new message before the last one ended"));
                }
                if f.fin {
                    deliver(w, f.opcode, &f.payload)?;
                } else {
                    partial = Some((f.opcode, f.payload));
                }
            }
            OP_CLOSE => {
                let reply = close_reply(&f.payload)?;
                w.write_all(&encode_frame(OP_CLOSE, &reply))?;
                w.flush()?;
                return Ok(());
            }
            OP_PING => w.write_all(&encode_frame(OP_PONG, &f.payload))?,
            OP_PONG => {}
            _ => return Err(Error::Protocol(1002, "unknown opcode")),
        }
    }
}

/// Reads up to the end of the request head; returns the head and whatever
/// came after it.
fn read_head(stream: &mut TcpStream) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn refuse(stream: &mut TcpStream, (code, reason, body): Refusal) -> io::Result<()> {
    let upgrade = if code == 426 { "Upgrade: websocket\r\n" } else { "" };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Sec-WebSocket-Version: 13\r\n{upgrade}Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// Serves one connection: the opening handshake, then the echo session.
pub fn handle(mut stream: TcpStream, hostname: &str) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HEAD_TIMEOUT))?;
    let (head, rest) = read_head(&mut stream)?;
    let accept = match parse_request(&head) {
        Ok(req) => check_handshake(&req),
        Err(why) => Err((400, "Bad Request", why)),
    };
    let accept = match accept {
        Ok(a) => a,
        Err(refusal) => return Ok(refuse(&mut stream, refusal)?),
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nX-Echo-Hostname: {hostname}\r\n\r\n"
    );
    stream.write_all(resp.as_bytes())?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(Cursor::new(rest).chain(&stream));
    let mut writer = &stream;
    let result = session(&mut reader, &mut writer);
    if let Err(Error::Protocol(code, why)) = &result {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(why.as_bytes());
        let _ = writer.write_all(&encode_frame(OP_CLOSE, &payload));
    }
    // Close our side, then read (briefly) until the client closes too:
    // closing with unread input would send a reset, and the client could
    // lose our close frame to it.
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER));
    let _ = io::copy(&mut (&stream).take(1 << 20), &mut io::sink());
    result
}

/// The host name (of the container's UTS namespace), as a header value.
pub fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name.trim().chars().filter(|c| c.is_ascii_graphic()).collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

/// Accepts connections forever, one thread each.
pub fn serve(listener: TcpListener) -> io::Result<()> {
    let hostname = hostname();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait a little.
                eprintln!("berth-ws-echo: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let hostname = hostname.clone();
        let spawned = std::thread::Builder::new().spawn(move || match handle(stream, &hostname) {
            Ok(()) => {}
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => eprintln!("berth-ws-echo: {peer}: {e}"),
        });
        if let Err(e) = spawned {
            eprintln!("berth-ws-echo: spawning a thread: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha1_known_answers() {
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(hex(&sha1(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(
            hex(&sha1(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        assert_eq!(
            hex(&sha1(&vec![b'a'; 1_000_000])),
            "34aa973cd4c4daa4f61eeb2bdbad27316534016f"
        );
    }

    #[test]
    fn base64_known_answers() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn accept_key_of_rfc_6455() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    fn request(extra: &str) -> Request {
        parse_request(
            format!("GET /chat HTTP/1.1\r\nHost: x\r\n{extra}")
                .trim_end()
                .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn handshakes_checked() {
        let good = "Upgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
                    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        assert_eq!(check_handshake(&request(good)).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(check_handshake(&request("")).unwrap_err().0, 426);
        assert_eq!(
            check_handshake(&request(&good.replace("Version: 13", "Version: 8")))
                .unwrap_err()
                .0,
            426
        );
        assert_eq!(
            check_handshake(&request(&good.replace("keep-alive, Upgrade", "close")))
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            check_handshake(&request(&good.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")))
                .unwrap_err()
                .0,
            400
        );
        assert!(parse_request(b"GET / HTTP/1.0").is_err());
        assert!(parse_request(b"GET /\r\nHost: x").is_err());
        assert!(parse_request(b"GET / HTTP/1.1\r\nno colon").is_err());
    }

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Reads one server frame (unmasked).
    fn server_frame(r: &mut impl Read) -> Frame {
        let mut h = [0u8; 2];
        r.read_exact(&mut h).unwrap();
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                r.read_exact(&mut b).unwrap();
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                r.read_exact(&mut b).unwrap();
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).unwrap();
        Frame {
            fin: h[0] & 0x80 != 0,
            opcode: h[0] & 0x0f,
            payload,
        }
    }

    fn server() -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || serve(l));
        addr
    }

    /// Connects and completes the opening handshake; returns the 101 head.
    fn connect(addr: SocketAddr) -> (TcpStream, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"GET /echo HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        (s, String::from_utf8(head).unwrap())
    }

    #[test]
    fn echoes_messages_pings_and_closes() {
        let addr = server();
        let (mut s, head) = connect(addr);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{head}"
        );
        assert!(head.contains("X-Echo-Hostname: "), "{head}");

        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let medium = vec![b'm'; 300];
        for (opcode, payload) in [
            (OP_TEXT, "hello".as_bytes()),
            (OP_TEXT, "grüße, 世界".as_bytes()),
            (OP_TEXT, b"".as_slice()),
            (OP_BINARY, &[0u8, 1, 2, 255][..]),
            (OP_BINARY, medium.as_slice()),
            (OP_BINARY, big.as_slice()),
        ] {
            s.write_all(&client_frame(true, opcode, payload)).unwrap();
            let f = server_frame(&mut s);
            assert_eq!((f.fin, f.opcode, f.payload.as_slice()), (true, opcode, payload));
        }

        // A fragmented message with a ping in the middle: the pong first,
        // then the whole message.
        s.write_all(&client_frame(false, OP_TEXT, b"frag")).unwrap();
        s.write_all(&client_frame(true, OP_PING, b"are you there")).unwrap();
        s.write_all(&client_frame(false, OP_CONTINUATION, b"men")).unwrap();
        s.write_all(&client_frame(true, OP_CONTINUATION, b"ted")).unwrap();
        let pong = server_frame(&mut s);
        assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"are you there"[..]));
        let f = server_frame(&mut s);
        assert_eq!((f.opcode, f.payload.as_slice()), (OP_TEXT, &b"fragmented"[..]));

        // Close: the status code comes back, then the connection ends.
        s.write_all(&client_frame(true, OP_CLOSE, b"\x03\xe8bye")).unwrap();
        let f = server_frame(&mut s);
        assert_eq!((f.opcode, f.payload.as_slice()), (OP_CLOSE, &b"\x03\xe8"[..]));
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
    }

    fn closed_with(frame: &[u8]) -> u16 {
        let (mut s, _) = connect(server());
        s.write_all(frame).unwrap();
        let f = server_frame(&mut s);
        assert_eq!(f.opcode, OP_CLOSE);
        u16::from_be_bytes([f.payload[0], f.payload[1]])
    }

    #[test]
    fn protocol_errors_close_with_their_codes() {
        // Unmasked client frame.
        assert_eq!(closed_with(b"\x81\x02hi"), 1002);
        assert_eq!(closed_with(&client_frame(true, OP_TEXT, b"\xff\xfe")), 1007);
        assert_eq!(closed_with(&client_frame(true, 0x3, b"x")), 1002);
        assert_eq!(closed_with(&client_frame(true, OP_CONTINUATION, b"x")), 1002);
        assert_eq!(closed_with(&client_frame(false, OP_PING, b"x")), 1002);
        assert_eq!(closed_with(&client_frame(true, OP_CLOSE, b"\x03")), 1002);
        assert_eq!(closed_with(&client_frame(true, OP_CLOSE, b"\x03\xed")), 1002);
        let mut too_big = vec![0x82, 0x80 | 127];
        too_big.extend_from_slice(&(MAX_MESSAGE as u64 + 1).to_be_bytes());
        assert_eq!(closed_with(&too_big), 1009);
    }

    #[test]
    fn plain_http_gets_426() {
        let mut s = TcpStream::connect(server()).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{resp}");
        assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"), "{resp}");
    }
}
