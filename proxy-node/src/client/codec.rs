//! HTTP/1.1 on the wire, without I/O: the request head and its framing, the
//! final head that may arrive while a request body is sent, and the response
//! head and how its body is delimited (RFC 9112).

use super::chunked::Chunk;
use super::Request;
use bytes::BytesMut;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode, Version};
use std::mem::MaybeUninit;

/// Largest response head accepted from an upstream.
pub(super) const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

/// How the request body is framed.
pub(super) enum ReqFraming {
    None,
    Length(u64),
    Chunked,
}

pub(super) fn encode_head(w: &mut Vec<u8>, req: &Request<'_>, framing: &ReqFraming) {
    w.clear();
    w.extend_from_slice(req.method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(req.target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        w.extend_from_slice(name.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(value.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    match framing {
        ReqFraming::None => {}
        ReqFraming::Length(n) => {
            w.extend_from_slice(b"content-length: ");
            w.extend_from_slice(n.to_string().as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        ReqFraming::Chunked => w.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    w.extend_from_slice(b"\r\n");
}

/// A final response head that arrived while the request body was sent.
pub(super) enum Early {
    /// 2xx/3xx without `Connection: close`.
    Success,
    /// Anything else, including a head that does not parse.
    Refusal,
}

/// Drops complete interim heads from the front of `buf` and says what the
/// final head there means for the request body; None while it is incomplete.
pub(super) fn final_head(buf: &mut BytesMut) -> Option<Early> {
    loop {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut r, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return None,
            _ => return Some(Early::Refusal),
        };
        let code = r.code.unwrap_or(0);
        if (100..200).contains(&code) && code != 101 {
            let _ = buf.split_to(len);
            continue;
        }
        let close = r.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        });
        return Some(if (200..400).contains(&code) && !close {
            Early::Success
        } else {
            Early::Refusal
        });
    }
}

pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) version: Version,
    pub(super) headers: HeaderMap,
}

/// Takes a complete response head off the front of `buf`: None (and `buf`
/// untouched) while it is incomplete. Header values share the head's bytes.
pub(super) fn take_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut r, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("malformed response head: bad status code")?;
    let version = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each name and value lies in `buf`, to slice them off the frozen head.
    let base = buf.as_ptr() as usize;
    let offset = |b: &[u8]| (b.as_ptr() as usize - base) as u32;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let n = r.headers.len();
    for (span, h) in spans.iter_mut().zip(r.headers.iter()) {
        *span = (
            offset(h.name.as_bytes()),
            h.name.len() as u32,
            offset(h.value),
            h.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(n);
    for &(ns, nl, vs, vl) in &spans[..n] {
        let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
        let name = HeaderName::from_bytes(&head[ns..ns + nl]).map_err(|_| {
            format!(
                "malformed response header name {:?}",
                String::from_utf8_lossy(&head[ns..ns + nl])
            )
        })?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
            .map_err(|_| format!("malformed value of response header {name}"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
    }))
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, PartialEq)]
pub(super) enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Eof,
    Done,
}

/// The response body's framing, and the response's Content-Length when it
/// has no Transfer-Encoding (which wins: the length is then not read).
pub(super) fn response_framing(method: &Method, head: &Head) -> Result<(Framing, Option<u64>), String> {
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok((body_framing(method, head, None)?, None));
    }
    let length = content_length(&head.headers)?;
    Ok((body_framing(method, head, length)?, length))
}

fn body_framing(method: &Method, head: &Head, length: Option<u64>) -> Result<Framing, String> {
    let s = head.status;
    if *method == Method::HEAD || s.is_informational() || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        // Any other coding would reach the client undecoded and unlabelled
        // (Transfer-Encoding is hop-by-hop): refused, as nginx does.
        let mut codings = head
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty());
        return match (codings.next(), codings.next()) {
            (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked(Chunk::Size)),
            _ => Err("upstream Transfer-Encoding other than chunked".into()),
        };
    }
    Ok(length.map_or(Framing::Eof, Framing::Length))
}

/// The Content-Length of a message: digits only; a list or repeated headers
/// must all agree (RFC 9110 §8.6).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, String> {
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let digits = part.trim_ascii();
            let n = std::str::from_utf8(digits)
                .ok()
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or_else(|| format!("bad Content-Length {v:?} from the upstream"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers from the upstream".into());
            }
            length = Some(n);
        }
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        take_head(&mut BytesMut::from(raw)).unwrap().unwrap()
    }

    #[test]
    fn heads_parse_and_partial_heads_wait() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabc";
        let mut buf = BytesMut::from(raw);
        let h = take_head(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..], b"abc", "the body stays");
        assert_eq!(h.status, 200);
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers["content-length"], "3");
        let xa: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
        let mut partial = BytesMut::from(&raw[..20]);
        assert!(take_head(&mut partial).unwrap().is_none());
        assert_eq!(partial.len(), 20, "nothing consumed");
        assert!(take_head(&mut BytesMut::from("HTTP/1.1 2000 OK\r\n\r\n")).is_err());
        assert!(take_head(&mut BytesMut::from("garbage\r\n\r\n")).is_err());
        assert_eq!(head("HTTP/1.0 200 OK\r\n\r\n").version, Version::HTTP_10);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let get = &Method::GET;
        let f = |m: &Method, raw: &str| response_framing(m, &head(raw)).map(|(f, _)| f);
        assert_eq!(
            f(get, "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            f(get, "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            f(get, "HTTP/1.1 200 OK\r\nContent-Length: 005\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert!(f(get, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_err());
        for bad in ["-1", "+5", "5 5", "", "0x10", "99999999999999999999"] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(f(get, &raw).is_err(), "Content-Length {bad:?}");
        }
        assert_eq!(
            f(
                get,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 5\r\n\r\n"
            ),
            Ok(Framing::Chunked(Chunk::Size)),
            "chunked wins over Content-Length"
        );
        for coding in ["gzip", "gzip, chunked", "chunked, chunked"] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n");
            assert!(f(get, &raw).is_err(), "Transfer-Encoding {coding:?}");
        }
        assert_eq!(f(get, "HTTP/1.1 200 OK\r\n\r\n"), Ok(Framing::Eof));
        assert_eq!(
            f(&Method::HEAD, "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"),
            Ok(Framing::Length(0))
        );
        assert_eq!(f(get, "HTTP/1.1 204 No Content\r\n\r\n"), Ok(Framing::Length(0)));
        assert_eq!(
            f(get, "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            Ok(Framing::Length(0))
        );
    }

    #[test]
    fn answers_during_an_upload_are_told_apart() {
        let early = |raw: &str| {
            let mut buf = BytesMut::from(raw);
            let r = final_head(&mut buf);
            (r, buf.len())
        };
        let interim = "HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n";
        assert!(
            matches!(early(interim), (None, 0)),
            "interim heads dropped, the body goes on"
        );
        assert!(matches!(early("HTTP/1.1 100 Cont"), (None, 17)), "a partial head waits");
        let refusal = "HTTP/1.1 413 Payload Too Large\r\n\r\n";
        let r = early(&format!("{interim}{refusal}"));
        assert!(
            matches!(r, (Some(Early::Refusal), n) if n == refusal.len()),
            "the final head stays for read_head"
        );
        assert!(matches!(early("HTTP/1.1 200 OK\r\n\r\n"), (Some(Early::Success), _)));
        let close = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
        assert!(matches!(early(close), (Some(Early::Refusal), _)));
        assert!(matches!(early("garbage\r\n\r\n"), (Some(Early::Refusal), _)));
    }

    #[test]
    fn request_heads_carry_their_own_framing() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a.example.com"));
        h.insert("content-length", HeaderValue::from_static("999"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let req = Request {
            method: &Method::POST,
            target: "/p?q=1",
            headers: &h,
            body: None,
        };
        let mut w = Vec::new();
        encode_head(&mut w, &req, &ReqFraming::Length(0));
        assert_eq!(
            String::from_utf8(w.clone()).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: a.example.com\r\ncontent-length: 0\r\n\r\n"
        );
        encode_head(&mut w, &req, &ReqFraming::Chunked);
        assert!(String::from_utf8(w.clone())
            .unwrap()
            .ends_with("host: a.example.com\r\ntransfer-encoding: chunked\r\n\r\n"));
    }
}
