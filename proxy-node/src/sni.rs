//! Reading and parsing a TLS ClientHello from raw bytes, before any TLS
//! library sees them: the SNI decides between passthrough and termination,
//! and the bytes read are kept so they can be replayed to either.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest ClientHello accepted (handshake message plus record headers).
pub const MAX_HELLO: usize = 64 * 1024;

const ACME_TLS_1: &[u8] = b"acme-tls/1";

/// What the proxy needs from a ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HelloInfo {
    /// The server name, lowercased; None when absent or not a host name.
    pub sni: Option<String>,
    /// The client offered ALPN `acme-tls/1`.
    pub acme_tls: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HelloError {
    NotTls,
    Malformed(&'static str),
    TooLarge,
}

impl std::fmt::Display for HelloError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HelloError::NotTls => f.write_str("not a TLS handshake"),
            HelloError::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            HelloError::TooLarge => write!(f, "ClientHello larger than {MAX_HELLO} bytes"),
        }
    }
}

impl std::error::Error for HelloError {}

/// Parses the ClientHello at the start of `buf` (TLS records).
/// Ok(None): more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<HelloInfo>, HelloError> {
    // Reassemble the handshake message from as many records as it spans.
    let mut msg: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        if rest.is_empty() {
            return Ok(None);
        }
        if rest[0] != 22 {
            return Err(if msg.is_empty() {
                HelloError::NotTls
            } else {
                HelloError::Malformed("record is not a handshake")
            });
        }
        if rest.len() < 5 {
            return Ok(None);
        }
        if rest[1] != 3 {
            return Err(HelloError::NotTls);
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 {
            return Err(HelloError::Malformed("empty record"));
        }
        if rest.len() < 5 + len {
            return Ok(None);
        }
        msg.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        if msg.len() >= 4 {
            if msg[0] != 1 {
                return Err(HelloError::Malformed("first handshake message is not a ClientHello"));
            }
            let body_len = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
            if body_len + 4 > MAX_HELLO {
                return Err(HelloError::TooLarge);
            }
            if msg.len() >= 4 + body_len {
                return parse_client_hello(&msg[4..4 + body_len]).map(Some);
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)? as usize;
        self.take(n, what)
    }
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
}

fn parse_client_hello(body: &[u8]) -> Result<HelloInfo, HelloError> {
    let mut r = Reader(body);
    r.take(2, "version")?;
    r.take(32, "random")?;
    r.vec8("session id")?;
    r.vec16("cipher suites")?;
    r.vec8("compression methods")?;
    let mut info = HelloInfo::default();
    if r.0.is_empty() {
        return Ok(info); // no extensions at all
    }
    let mut exts = Reader(r.vec16("extensions")?);
    while !exts.0.is_empty() {
        let typ = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        match typ {
            0 => info.sni = parse_sni(data)?,
            16 => {
                let mut list = Reader(Reader(data).vec16("ALPN list")?);
                while !list.0.is_empty() {
                    if list.vec8("ALPN protocol")? == ACME_TLS_1 {
                        info.acme_tls = true;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut list = Reader(Reader(data).vec16("server name list")?);
    while !list.0.is_empty() {
        let typ = list.u8("server name type")?;
        let name = list.vec16("server name")?;
        if typ == 0 {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*'));
            if !ok {
                return Ok(None);
            }
            let mut s = String::from_utf8_lossy(name).into_owned();
            s.make_ascii_lowercase();
            if s.ends_with('.') {
                s.pop();
            }
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// Reads from `io` into `buf` until a whole ClientHello is there, and parses it.
/// Every byte read stays in `buf` (it may hold more than the ClientHello).
pub async fn read_client_hello<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Vec<u8>) -> io::Result<HelloInfo> {
    let mut chunk = [0u8; 2048];
    loop {
        match parse(buf) {
            Ok(Some(info)) => return Ok(info),
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        if buf.len() >= MAX_HELLO {
            return Err(io::Error::new(io::ErrorKind::InvalidData, HelloError::TooLarge));
        }
        let want = chunk.len().min(MAX_HELLO - buf.len());
        let n = io.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the ClientHello was complete",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, captured from a real client.
    pub(crate) fn real_client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        use rustls::pki_types::ServerName;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(cfg), ServerName::try_from(sni.to_string()).unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn parses_sni_and_alpn_from_a_real_hello() {
        let hello = real_client_hello("App.Example.com", &[b"h2", b"acme-tls/1"]);
        let info = parse(&hello).unwrap().unwrap();
        assert_eq!(info.sni.as_deref(), Some("app.example.com"));
        assert!(info.acme_tls);
        let hello = real_client_hello("a.example.com", &[b"h2", b"http/1.1"]);
        let info = parse(&hello).unwrap().unwrap();
        assert_eq!(info.sni.as_deref(), Some("a.example.com"));
        assert!(!info.acme_tls);
    }

    #[test]
    fn incomplete_hello_asks_for_more() {
        let hello = real_client_hello("a.example.com", &[]);
        for cut in [0, 1, 4, 5, 40, hello.len() - 1] {
            assert_eq!(parse(&hello[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn hello_split_over_two_records() {
        let hello = real_client_hello("split.example.com", &[]);
        let payload = &hello[5..];
        let (a, b) = payload.split_at(30);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[22, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(parse(&two).unwrap().unwrap().sni.as_deref(), Some("split.example.com"));
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotTls));
        let mut hello = real_client_hello("a.example.com", &[]);
        // Claim an extension block longer than the message.
        let n = hello.len();
        hello.truncate(n - 3);
        let l = (hello.len() - 5) as u16;
        hello[3..5].copy_from_slice(&l.to_be_bytes());
        let hl = (hello.len() - 9) as u32;
        hello[6..9].copy_from_slice(&hl.to_be_bytes()[1..]);
        assert!(matches!(parse(&hello), Err(HelloError::Malformed(_))));
        // Every truncation of every byte flip must not panic.
        let hello = real_client_hello("b.example.com", &[b"h2"]);
        for i in 0..hello.len() {
            let mut h = hello.clone();
            h[i] ^= 0xff;
            let _ = parse(&h);
        }
    }

    #[test]
    fn no_sni() {
        // A ClientHello without extensions (TLS 1.2 style, hand-made).
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        let mut msg = vec![1, 0, 0, body.len() as u8];
        msg.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1, 0, msg.len() as u8];
        rec.extend_from_slice(&msg);
        assert_eq!(parse(&rec).unwrap().unwrap(), HelloInfo::default());
    }
}
