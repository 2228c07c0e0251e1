//! The chunked transfer coding (RFC 9112 §7.1): the decoder of response
//! bodies, and the chunk framing of request bodies of unknown length.

use bytes::{Bytes, BytesMut};

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

/// Where a chunked body's decoder is.
#[derive(Debug, PartialEq)]
pub(super) enum Chunk {
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    Trailers,
}

/// One step of the chunked decoder over `buf`.
#[derive(Debug, PartialEq)]
pub(super) enum Decoded {
    Data(Bytes),
    End,
    NeedMore,
}

fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(format!("chunked body: line longer than {MAX_LINE} bytes")),
        None => Ok(None),
    }
}

// Its one caller, `ResponseBody::poll_frame`, is in another module (and so
// may be in another codegen unit): the hint keeps it inlined there, as it
// was when both were in one file.
#[inline]
pub(super) fn decode_chunked(buf: &mut BytesMut, st: &mut Chunk) -> Result<Decoded, String> {
    loop {
        match st {
            Chunk::Size => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Decoded::NeedMore);
                };
                let end = line.iter().position(|&b| b == b';' || b == b' ' || b == b'\t');
                let digits = &line[..end.unwrap_or(line.len())];
                if digits.is_empty() || digits.len() > 16 {
                    return Err("chunked body: bad chunk size".into());
                }
                let mut n: u64 = 0;
                for &d in digits {
                    let v = (d as char).to_digit(16).ok_or("chunked body: bad chunk size")?;
                    n = (n << 4) | u64::from(v);
                }
                *st = if n == 0 { Chunk::Trailers } else { Chunk::Data(n) };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                let data = buf.split_to(n as usize).freeze();
                if *left == 0 {
                    *st = Chunk::DataEnd;
                }
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Decoded::NeedMore);
                };
                if !line.is_empty() {
                    return Err("chunked body: no CRLF after chunk data".into());
                }
                *st = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Decoded::NeedMore);
                };
                if line.is_empty() {
                    return Ok(Decoded::End);
                }
            }
        }
    }
}

pub(super) fn chunk(data: &[u8]) -> Bytes {
    let mut c = Vec::with_capacity(data.len() + 20);
    c.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    c.extend_from_slice(data);
    c.extend_from_slice(b"\r\n");
    c.into()
}

pub(super) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<Vec<u8>, String> {
        let mut buf = BytesMut::new();
        let mut st = Chunk::Size;
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match decode_chunked(&mut buf, &mut st)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::End => return Ok(out),
                    Decoded::NeedMore => break,
                }
            }
        }
        Err("incomplete".into())
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            assert_eq!(decode_all(wire, step).unwrap(), b"hello 0123456789", "step {step}");
        }
        assert_eq!(decode_all(b"0\r\n\r\n", 1).unwrap(), b"");
        assert_eq!(decode_all(b"3\nabc\n0\n\n", 1).unwrap(), b"abc", "bare LF accepted");
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        assert!(decode_all(b"zz\r\n", 4).unwrap_err().contains("chunk size"));
        assert!(decode_all(b"\r\n", 4).unwrap_err().contains("chunk size"));
        assert!(decode_all(b"11111111111111111\r\n", 64)
            .unwrap_err()
            .contains("chunk size"));
        assert!(decode_all(b"3\r\nabcX\r\n", 64).unwrap_err().contains("CRLF"));
        let long = vec![b'1'; MAX_LINE + 1];
        assert!(decode_all(&long, 8192).unwrap_err().contains("longer"));
    }
}
