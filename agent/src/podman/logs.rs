//! A container's log as libpod's `GET /containers/{id}/logs` sends it.
//!
//! Without a terminal the stream is multiplexed: each piece of output comes
//! in a frame with an 8-byte header (stream: 0 stdin, 1 stdout, 2 stderr;
//! three zero bytes; the payload's length as a big-endian u32). A container
//! with a terminal sends its output raw. Both are read here (pure, so every
//! case is unit-tested).

/// The payloads of a multiplexed stream, in order; `None` when `data` is not
/// one (a header with an unknown stream or non-zero padding). A payload cut
/// short at the end is kept as far as it goes.
fn demux(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 8 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() < 8 || rest[0] > 2 || rest[1..4] != [0, 0, 0] {
            return None;
        }
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let end = (8 + len).min(rest.len());
        out.extend_from_slice(&rest[8..end]);
        rest = &rest[end..];
    }
    Some(out)
}

/// Splits a multiplexed stream into its frames as the bytes come, in
/// pieces of any size: `push` returns every (stream, payload) completed.
/// A stream that does not start like a frame is raw terminal output, all
/// of it stdout.
#[derive(Default)]
pub struct Demuxer {
    buf: Vec<u8>,
    raw: Option<bool>,
}

impl Demuxer {
    pub fn push(&mut self, data: &[u8]) -> Vec<(u8, Vec<u8>)> {
        self.buf.extend_from_slice(data);
        if self.raw.is_none() {
            if self.buf.len() < 4 {
                return vec![];
            }
            self.raw = Some(self.buf[0] > 2 || self.buf[1..4] != [0, 0, 0]);
        }
        if self.raw == Some(true) {
            return vec![(1, std::mem::take(&mut self.buf))];
        }
        let mut out = vec![];
        let mut at = 0;
        while self.buf.len() - at >= 8 {
            let h = &self.buf[at..at + 8];
            let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
            if self.buf.len() - at - 8 < len {
                break;
            }
            out.push((h[0], self.buf[at + 8..at + 8 + len].to_vec()));
            at += 8 + len;
        }
        self.buf.drain(..at);
        out
    }
}

/// Cuts `line` to at most `max` bytes (on a character boundary), marking the cut.
pub fn truncate(mut line: String, max: usize) -> String {
    if line.len() > max {
        let mut end = max;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

/// The last `max_lines` lines of a log body (framed or raw), each cut to
/// `max_line_bytes`; invalid UTF-8 is replaced, line ends are dropped.
pub fn last_lines(data: &[u8], max_lines: usize, max_line_bytes: usize) -> Vec<String> {
    let text = match demux(data) {
        Some(payload) => String::from_utf8_lossy(&payload).into_owned(),
        None => String::from_utf8_lossy(data).into_owned(),
    };
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    let skip = lines.len().saturating_sub(max_lines);
    lines
        .into_iter()
        .skip(skip)
        .map(|l| truncate(l.strip_suffix('\r').unwrap_or(l).to_string(), max_line_bytes))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One frame of Podman's multiplexed log stream (also used by the
    /// streams' tests).
    pub(crate) fn frame(stream: u8, payload: &str) -> Vec<u8> {
        let mut f = vec![stream, 0, 0, 0];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload.as_bytes());
        f
    }

    #[test]
    fn framed_stdout_and_stderr_in_order() {
        let mut data = frame(1, "starting\n");
        data.extend(frame(2, "error: port taken\n"));
        data.extend(frame(1, "exiting\n"));
        assert_eq!(last_lines(&data, 20, 300), ["starting", "error: port taken", "exiting"]);
    }

    #[test]
    fn a_line_split_over_frames_is_one_line() {
        let mut data = frame(1, "hel");
        data.extend(frame(1, "lo\nworld"));
        assert_eq!(last_lines(&data, 20, 300), ["hello", "world"]);
    }

    #[test]
    fn raw_terminal_output() {
        assert_eq!(last_lines(b"one\r\ntwo\r\n", 20, 300), ["one", "two"]);
        // Text that happens to start like no header is raw.
        assert_eq!(
            last_lines(b"GET / 200\nGET /x 404\n", 20, 300),
            ["GET / 200", "GET /x 404"]
        );
        assert!(last_lines(b"", 20, 300).is_empty());
        assert_eq!(last_lines(b"short", 20, 300), ["short"]);
    }

    #[test]
    fn a_bad_header_later_means_raw() {
        let mut data = frame(1, "ok\n");
        data.extend_from_slice(b"\x07\x00\x00\x00garbage\n");
        let lines = last_lines(&data, 20, 300);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].ends_with("garbage"), "{lines:?}");
    }

    #[test]
    fn a_frame_cut_short_keeps_what_came() {
        let mut data = frame(1, "first\n");
        let mut cut = frame(2, "second line\n");
        cut.truncate(8 + 6);
        data.extend(cut);
        assert_eq!(last_lines(&data, 20, 300), ["first", "second"]);
    }

    #[test]
    fn the_demuxer_takes_frames_in_any_pieces() {
        let mut data = frame(1, "hello\n");
        data.extend(frame(2, "oops\n"));
        data.extend(frame(1, ""));
        for cut in 0..data.len() {
            let mut d = Demuxer::default();
            let mut got = d.push(&data[..cut]);
            got.extend(d.push(&data[cut..]));
            let got: Vec<(u8, String)> = got
                .into_iter()
                .map(|(s, p)| (s, String::from_utf8(p).unwrap()))
                .collect();
            assert_eq!(
                got,
                [
                    (1, "hello\n".to_string()),
                    (2, "oops\n".to_string()),
                    (1, String::new())
                ],
                "cut at {cut}"
            );
        }
        let mut raw = Demuxer::default();
        assert_eq!(raw.push(b"$ "), vec![]);
        assert_eq!(raw.push(b"ls\r\n"), vec![(1, b"$ ls\r\n".to_vec())]);
        assert_eq!(raw.push(b"x"), vec![(1, b"x".to_vec())]);
    }

    #[test]
    fn bounded_in_lines_and_bytes() {
        let mut data = vec![];
        for i in 0..50 {
            data.extend(frame(1, &format!("line {i}\n")));
        }
        let lines = last_lines(&data, 20, 300);
        assert_eq!(lines.len(), 20);
        assert_eq!(lines[0], "line 30");
        assert_eq!(lines[19], "line 49");

        let long = "é".repeat(400); // 800 bytes
        let lines = last_lines(&frame(1, &format!("{long}\n")), 20, 300);
        assert!(lines[0].len() <= 300 + '…'.len_utf8(), "{}", lines[0].len());
        assert!(lines[0].ends_with('…'));
        assert!(lines[0].starts_with("éé"));
        // Invalid UTF-8 does not fail.
        assert_eq!(last_lines(&frame(1, "a\u{FFFD}b\n"), 20, 300), ["a\u{FFFD}b"]);
        let mut bad = frame(1, "xx\n");
        bad[8] = 0xff;
        assert_eq!(last_lines(&bad, 20, 300), ["\u{FFFD}x"]);
    }
}
