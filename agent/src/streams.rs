//! `berth logs` and `berth exec` on this node: the agent long-polls the
//! control plane for stream jobs and answers each with a WebSocket of its
//! own (docs/logs.md). Output is read from Podman only as fast as the
//! socket takes it, so a slow reader costs the agent no memory.

use crate::client::{Client, StreamSocket};
use crate::containers::create_spec::container_name;
use crate::podman::logs::Demuxer;
use crate::podman::{next_chunk, ContainerState, Podman};
use berth_protocol::stream::{ExecControl, ExecRequest, LogLine, LogsRequest, StreamJob, StreamKind, EXEC_STDERR};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Largest message sent: lines are batched up to this size.
const MAX_BATCH: usize = 64 * 1024;
/// Longest log line carried; the rest is cut (a line is one message's worth
/// even with every byte escaped).
const MAX_LINE: usize = 8 * 1024;
/// How long a followed log waits for a new replica's container to appear.
const WAIT_FOR_CONTAINER: Duration = Duration::from_secs(60);

/// Where `berth nodes logs` reads the agent's own log from.
#[derive(Debug, Clone, Default)]
pub struct AgentLog {
    /// The file the agent's output goes to (`--log-file`).
    pub file: Option<std::path::PathBuf>,
    /// The agent runs under systemd with its log in the journal.
    pub journal: bool,
}

/// Takes stream jobs until the agent stops.
pub async fn run(client: Arc<Client>, podman: Podman, own_log: AgentLog) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match client.next_streams(25).await {
            Ok(jobs) => {
                backoff = Duration::from_millis(250);
                for job in jobs {
                    tokio::spawn(serve(client.clone(), podman.clone(), own_log.clone(), job));
                }
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "stream poll failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

async fn serve(client: Arc<Client>, podman: Podman, own_log: AgentLog, job: StreamJob) {
    let _open = crate::metrics::StreamOpen::new();
    let mut ws = match client.stream_socket(&job.id).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::warn!(replica = %job.replica, error = %format!("{e:#}"), "opening a stream failed");
            return;
        }
    };
    match job.kind {
        StreamKind::Logs(req) => logs(&podman, &job.replica, &req, &mut ws).await,
        StreamKind::Exec(req) => {
            tracing::info!(replica = %job.replica, cmd = ?req.cmd, "exec");
            exec(&podman, &job.replica, &req, &mut ws).await
        }
        StreamKind::AgentLog(req) => agent_log(&own_log, &job.replica, &req, &mut ws).await,
    }
    let _ = ws.close(None).await;
}

/// Lines of a log, as NDJSON [`LogLine`]s in batches.
struct LineBatcher {
    replica: String,
    demux: Demuxer,
    partial: [Vec<u8>; 3],
}

impl LineBatcher {
    fn new(replica: &str) -> Self {
        LineBatcher {
            replica: replica.to_string(),
            demux: Demuxer::default(),
            partial: Default::default(),
        }
    }

    fn line(&self, out: &mut Vec<u8>, stream: u8, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        // Podman puts the time first: `2026-12-06T22:00:00.123456789Z text`.
        let (ts, line) = match text.split_once(' ') {
            Some((ts, rest)) if ts.len() >= 20 && ts.as_bytes()[0].is_ascii_digit() && ts.contains('T') => {
                (Some(ts.to_string()), rest)
            }
            _ => (None, text),
        };
        let l = LogLine {
            replica: self.replica.clone(),
            stream: Some(if stream == EXEC_STDERR { "stderr" } else { "stdout" }.to_string()),
            ts,
            line: Some(crate::podman::logs::truncate(line.to_string(), MAX_LINE)),
            notice: None,
        };
        if serde_json::to_writer(&mut *out, &l).is_ok() {
            out.push(b'\n');
        }
    }

    /// The complete lines in `data`, NDJSON.
    fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (stream, payload) in self.demux.push(data) {
            let s = (stream as usize).min(2);
            let mut buf = std::mem::take(&mut self.partial[s]);
            buf.extend_from_slice(&payload);
            let mut start = 0;
            while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
                self.line(&mut out, stream, &buf[start..start + nl]);
                start += nl + 1;
            }
            self.partial[s] = buf.split_off(start);
        }
        out
    }

    /// What is left at the end: lines without a newline.
    fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for s in 0..3 {
            let rest = std::mem::take(&mut self.partial[s]);
            if !rest.is_empty() {
                self.line(&mut out, s as u8, &rest);
            }
        }
        out
    }
}

/// Sends NDJSON in messages of at most [`MAX_BATCH`], cut at line ends.
async fn send_lines(ws: &mut StreamSocket, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        let mut end = data.len().min(MAX_BATCH);
        if end < data.len() {
            end = data[..end].iter().rposition(|b| *b == b'\n').map_or(end, |p| p + 1);
        }
        let text = String::from_utf8_lossy(&data[..end]).into_owned();
        if ws.send(Message::text(text)).await.is_err() {
            return false;
        }
        data = &data[end..];
    }
    true
}

async fn notice(ws: &mut StreamSocket, replica: &str, what: String) {
    let mut v = serde_json::to_vec(&LogLine::notice(replica, what)).unwrap_or_default();
    v.push(b'\n');
    send_lines(ws, &v).await;
}

async fn logs(podman: &Podman, replica: &str, req: &LogsRequest, ws: &mut StreamSocket) {
    let name = container_name(replica);
    let deadline = tokio::time::Instant::now() + if req.follow { WAIT_FOR_CONTAINER } else { Duration::ZERO };
    // A new replica's container may not exist or run yet, and following a
    // container that does not run ends at once: wait for it to start.
    while req.follow && tokio::time::Instant::now() < deadline {
        match podman.inspect(&name).await {
            Ok(c)
                if matches!(
                    c.state,
                    ContainerState::Running | ContainerState::Exited | ContainerState::Stopped
                ) =>
            {
                break
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut resp = match podman.logs_stream(&name, req.follow, req.since, req.tail).await {
        Ok(r) => r,
        Err(e) => return notice(ws, replica, format!("no log: {e}")).await,
    };
    let mut lines = LineBatcher::new(replica);
    loop {
        tokio::select! {
            chunk = next_chunk(resp.body_mut()) => match chunk {
                Some(Ok(data)) => {
                    let out = lines.push(&data);
                    if !send_lines(ws, &out).await {
                        return;
                    }
                }
                Some(Err(e)) => {
                    notice(ws, replica, format!("log stream broke: {e}")).await;
                    break;
                }
                None => break,
            },
            // The control plane closes when the admin leaves.
            m = ws.next() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
        }
    }
    let rest = lines.finish();
    send_lines(ws, &rest).await;
}

/// Most of the log file read for a tail.
const MAX_TAIL_BYTES: u64 = 4 << 20;

/// `text` without terminal colour codes (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One line of the agent's own log as a [`LogLine`]: the time it starts
/// with (the text format's first field) goes to `ts`.
fn own_line(label: &str, raw: &str) -> LogLine {
    let text = strip_ansi(raw.trim_end_matches('\r'));
    let (ts, line) = match text.trim_start().split_once(' ') {
        Some((ts, rest)) if ts.len() >= 20 && ts.as_bytes()[0].is_ascii_digit() && ts.contains('T') => {
            (Some(ts.to_string()), rest.trim_start().to_string())
        }
        _ => (None, text.clone()),
    };
    LogLine {
        replica: label.to_string(),
        stream: Some("stdout".into()),
        ts,
        line: Some(crate::podman::logs::truncate(line, MAX_LINE)),
        notice: None,
    }
}

async fn send_own(ws: &mut StreamSocket, label: &str, lines: &[&str], since: Option<&str>) -> bool {
    let mut out = Vec::new();
    for l in lines {
        let line = own_line(label, l);
        // RFC 3339 times in UTC sort as text.
        if since.is_some_and(|s| line.ts.as_deref().is_some_and(|t| t < s)) {
            continue;
        }
        if serde_json::to_writer(&mut out, &line).is_ok() {
            out.push(b'\n');
        }
    }
    send_lines(ws, &out).await
}

/// `berth nodes logs`: the agent's log file (tail, then followed), or the
/// journal through journalctl.
async fn agent_log(own: &AgentLog, label: &str, req: &LogsRequest, ws: &mut StreamSocket) {
    let since = req
        .since
        .map(|t| berth_protocol::time::Utc::from_secs(t).date_time('T'));
    if let Some(path) = &own.file {
        use tokio::io::AsyncSeekExt;
        let Ok(mut file) = tokio::fs::File::open(path).await else {
            return notice(ws, label, format!("no log: cannot open {}", path.display())).await;
        };
        let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(MAX_TAIL_BYTES);
        let _ = file.seek(std::io::SeekFrom::Start(start)).await;
        let mut data = Vec::new();
        let _ = (&mut file).take(MAX_TAIL_BYTES).read_to_end(&mut data).await;
        let text = String::from_utf8_lossy(&data).into_owned();
        let mut lines: Vec<&str> = text.split('\n').collect();
        let partial = lines.pop().unwrap_or_default().to_string();
        if start > 0 && !lines.is_empty() {
            lines.remove(0); // begun mid-line
        }
        let skip = req.tail.map_or(0, |t| lines.len().saturating_sub(t as usize));
        if !send_own(ws, label, &lines[skip..], since.as_deref()).await || !req.follow {
            return;
        }
        let mut pos = start + data.len() as u64;
        let mut rest = partial.into_bytes();
        loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    let len = tokio::fs::metadata(path).await.map(|m| m.len()).unwrap_or(0);
                    if len < pos {
                        // Truncated or replaced: read it again from the start.
                        let Ok(f) = tokio::fs::File::open(path).await else { continue };
                        file = f;
                        pos = 0;
                        rest.clear();
                    }
                    let mut buf = Vec::new();
                    if file.seek(std::io::SeekFrom::Start(pos)).await.is_err() {
                        continue;
                    }
                    let _ = (&mut file).take(MAX_TAIL_BYTES).read_to_end(&mut buf).await;
                    pos += buf.len() as u64;
                    rest.extend_from_slice(&buf);
                    if let Some(end) = rest.iter().rposition(|b| *b == b'\n') {
                        let done: Vec<u8> = rest.drain(..=end).collect();
                        let text = String::from_utf8_lossy(&done).into_owned();
                        let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
                        if !send_own(ws, label, &lines, None).await {
                            return;
                        }
                    }
                }
            }
        }
    } else if own.journal {
        let mut cmd = tokio::process::Command::new("journalctl");
        cmd.args([
            "-u",
            "berth-agent.service",
            "-o",
            "short-iso-precise",
            "--no-pager",
            "-q",
        ]);
        if let Some(t) = req.tail {
            cmd.arg(format!("--lines={t}"));
        }
        if let Some(s) = req.since {
            cmd.arg(format!("--since=@{s}"));
        }
        if req.follow {
            cmd.arg("--follow");
        }
        let mut child = match cmd.stdout(std::process::Stdio::piped()).kill_on_drop(true).spawn() {
            Ok(c) => c,
            Err(e) => return notice(ws, label, format!("no log: journalctl: {e}")).await,
        };
        let Some(stdout) = child.stdout.take() else { return };
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        loop {
            tokio::select! {
                m = ws.next() => match m {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    _ => {}
                },
                l = lines.next_line() => match l {
                    Ok(Some(l)) => {
                        // short-iso-precise: `2026-12-06T23:16:52.123456+0000 host berth-agent[42]: text`.
                        let text = l.split_once("]: ").map_or(l.as_str(), |(_, t)| t);
                        let ts = l.split_whitespace().next().unwrap_or_default();
                        let mut line = own_line(label, text);
                        line.ts = Some(ts.to_string());
                        let mut v = serde_json::to_vec(&line).unwrap_or_default();
                        v.push(b'\n');
                        if !send_lines(ws, &v).await {
                            return;
                        }
                    }
                    _ => return,
                },
            }
        }
    } else {
        notice(
            ws,
            label,
            "no log: the agent runs outside systemd and without --log-file".to_string(),
        )
        .await;
    }
}

async fn control(ws: &mut StreamSocket, c: &ExecControl) -> bool {
    ws.send(Message::text(serde_json::to_string(c).unwrap_or_default()))
        .await
        .is_ok()
}

async fn exec(podman: &Podman, replica: &str, req: &ExecRequest, ws: &mut StreamSocket) {
    let name = container_name(replica);
    let id = match podman.exec_create(&name, &req.cmd, req.tty, req.interactive).await {
        Ok(id) => id,
        Err(e) => {
            control(ws, &ExecControl::Error { message: e.to_string() }).await;
            return;
        }
    };
    let (conn, early) = match podman.exec_start(&id, req.tty).await {
        Ok(x) => x,
        Err(e) => {
            control(ws, &ExecControl::Error { message: e.to_string() }).await;
            return;
        }
    };
    if req.tty && req.rows > 0 && req.cols > 0 {
        // The session runs once start answered; a failed resize is cosmetic.
        let _ = podman.exec_resize(&id, req.rows, req.cols).await;
    }
    let (mut rd, mut wr) = conn.into_split();
    let mut demux = (!req.tty).then(Demuxer::default);
    let mut pending = early;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if !pending.is_empty() {
            let frames = match &mut demux {
                Some(d) => d.push(&pending),
                None => vec![(1, std::mem::take(&mut pending))],
            };
            pending.clear();
            for (stream, data) in frames {
                let mut msg = Vec::with_capacity(data.len() + 1);
                msg.push(stream);
                msg.extend_from_slice(&data);
                if ws.send(Message::binary(msg)).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            },
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) if wr.write_all(&b).await.is_err() => break,
                Some(Ok(Message::Binary(_))) => {}
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ExecControl>(&t) {
                    Ok(ExecControl::Resize { rows, cols }) => {
                        let _ = podman.exec_resize(&id, rows, cols).await;
                    }
                    // Half-close: the command sees the end of its stdin.
                    Ok(ExecControl::Eof) => {
                        let _ = wr.shutdown().await;
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
        }
    }
    let end = match podman.exec_wait(&id, Duration::from_secs(5)).await {
        Ok(s) if !s.running => ExecControl::Exit { code: s.exit_code },
        Ok(_) => ExecControl::Error {
            message: "the command's output ended but it still runs".into(),
        },
        Err(e) => ExecControl::Error { message: e.to_string() },
    };
    control(ws, &end).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podman::logs::tests::frame;

    fn parse(ndjson: &[u8]) -> Vec<LogLine> {
        ndjson
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    #[test]
    fn the_agents_own_lines_lose_their_colours_and_keep_their_time() {
        let l = own_line(
            "n1",
            "\x1b[2m2026-12-06T23:16:52.123456Z\x1b[0m \x1b[32m INFO\x1b[0m applied revision=7",
        );
        assert_eq!(l.ts.as_deref(), Some("2026-12-06T23:16:52.123456Z"));
        assert_eq!(l.line.as_deref(), Some("INFO applied revision=7"));
        assert_eq!(l.replica, "n1");
        assert_eq!(own_line("n1", "plain").line.as_deref(), Some("plain"));
        // `since` compares as text with the lines' own stamps.
        let since = berth_protocol::time::Utc::from_secs(1_764_720_000).date_time('T');
        assert_eq!(since, "2025-12-03T00:00:00");
        assert!(since.as_str() < "2025-12-03T00:00:00.1Z");
    }

    #[test]
    fn lines_keep_their_stream_and_time_and_wait_for_their_end() {
        let mut b = LineBatcher::new("web-1");
        let mut data = frame(1, "2026-12-06T22:00:00.123456789Z hel");
        data.extend(frame(2, "2026-12-06T22:00:00.2Z oops\n"));
        let first = parse(&b.push(&data));
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(first[0].stream.as_deref(), Some("stderr"));
        assert_eq!(first[0].line.as_deref(), Some("oops"));
        assert_eq!(first[0].ts.as_deref(), Some("2026-12-06T22:00:00.2Z"));
        let second = parse(&b.push(&frame(1, "lo\r\n")));
        assert_eq!(second[0].line.as_deref(), Some("hello"));
        assert_eq!(second[0].ts.as_deref(), Some("2026-12-06T22:00:00.123456789Z"));
        assert_eq!(second[0].replica, "web-1");
        let tail = parse(&{
            b.push(&frame(1, "no newline"));
            b.finish()
        });
        assert_eq!(tail[0].line.as_deref(), Some("no newline"));
        assert_eq!(tail[0].ts, None);
    }
}
