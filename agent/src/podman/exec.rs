//! Exec sessions and followed logs: the libpod calls behind `berth exec`
//! and `berth logs`.
//!
//! `exec/ID/start` hijacks its connection: after the response head
//! (`101 UPGRADED` when asked with `Upgrade: tcp`), the socket carries the
//! command's stdin one way and its output the other, raw with a terminal
//! and multiplexed (the 8-byte frames of [`super::logs`]) without. That is
//! spoken here on a plain unix socket, since hyper's client hands a
//! hijacked connection over only after a 101 it checks itself.

use super::transport::{self, encode};
use super::{Error, Podman, Result, API, CALL_TIMEOUT};
use hyper::body::Incoming;
use hyper::{Method, Response};
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest response head accepted on a hijacked connection.
const MAX_HEAD: usize = 16 * 1024;

/// How a finished exec session ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExecState {
    pub running: bool,
    pub exit_code: i32,
}

impl Podman {
    /// Creates an exec session in container `name`; returns its ID.
    pub async fn exec_create(&self, name: &str, cmd: &[String], tty: bool, stdin: bool) -> Result<String> {
        let body = json!({
            "Cmd": cmd, "Tty": tty, "AttachStdin": stdin,
            "AttachStdout": true, "AttachStderr": true,
        });
        let path = format!("{API}/containers/{}/exec", encode(name, b""));
        let r = self.call(Method::POST, &path, Some(&body), CALL_TIMEOUT).await?.ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.data).map_err(|e| Error::Decode(e.to_string()))?;
        v["Id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Decode(format!("exec create answered without an Id: {v}")))
    }

    /// Starts exec session `id` and returns the hijacked connection, plus
    /// any output that came with the response head.
    pub async fn exec_start(&self, id: &str, tty: bool) -> Result<(UnixStream, Vec<u8>)> {
        let socket = self.socket();
        let mut stream = UnixStream::connect(socket).await.map_err(|e| Error::Connect {
            socket: socket.to_path_buf(),
            source: e,
        })?;
        let body = json!({ "Detach": false, "Tty": tty }).to_string();
        let head = format!(
            "POST {API}/exec/{}/start HTTP/1.1\r\nHost: podman\r\nContent-Type: application/json\r\n\
             Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: {}\r\n\r\n{body}",
            encode(id, b""),
            body.len()
        );
        let io = |e: std::io::Error| Error::Decode(format!("exec start: {e}"));
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        let mut buf = Vec::with_capacity(1024);
        let (status, head_len) = loop {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(CALL_TIMEOUT, stream.read(&mut chunk))
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("POST exec/{id}/start"),
                    after: CALL_TIMEOUT,
                })?
                .map_err(io)?;
            if n == 0 {
                return Err(Error::Decode("exec start: Podman closed before answering".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => break (resp.code.unwrap_or(0), len),
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
                _ => return Err(Error::Decode("exec start: not an HTTP answer".into())),
            }
        };
        if status != 101 && status != 200 {
            // An error answer is JSON with Podman's message.
            let text = String::from_utf8_lossy(&buf[head_len..]).into_owned();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(Error::Api { status, message });
        }
        Ok((stream, buf.split_off(head_len)))
    }

    /// Resizes the terminal of exec session `id`.
    pub async fn exec_resize(&self, id: &str, rows: u16, cols: u16) -> Result<()> {
        let path = format!("{API}/exec/{}/resize?h={rows}&w={cols}", encode(id, b""));
        self.call(Method::POST, &path, None, CALL_TIMEOUT).await?.ok()?;
        Ok(())
    }

    pub async fn exec_inspect(&self, id: &str) -> Result<ExecState> {
        let path = format!("{API}/exec/{}/json", encode(id, b""));
        let r = self.call(Method::GET, &path, None, CALL_TIMEOUT).await?.ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.data).map_err(|e| Error::Decode(e.to_string()))?;
        Ok(ExecState {
            running: v["Running"].as_bool().unwrap_or(false),
            exit_code: v["ExitCode"].as_i64().unwrap_or(-1) as i32,
        })
    }

    /// The exit code of exec session `id` once it ended, waiting up to `wait`.
    pub async fn exec_wait(&self, id: &str, wait: Duration) -> Result<ExecState> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let state = self.exec_inspect(id).await?;
            if !state.running || tokio::time::Instant::now() >= deadline {
                return Ok(state);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Container `name`'s log with timestamps, multiplexed, as it streams:
    /// the last `tail` lines since `since` (Unix seconds), then, with
    /// `follow`, on until the container stops.
    pub async fn logs_stream(
        &self,
        name: &str,
        follow: bool,
        since: Option<i64>,
        tail: Option<u32>,
    ) -> Result<Response<Incoming>> {
        let mut path = format!(
            "{API}/containers/{}/logs?stdout=true&stderr=true&timestamps=true&follow={follow}",
            encode(name, b"")
        );
        if let Some(s) = since {
            path.push_str(&format!("&since={s}"));
        }
        if let Some(t) = tail {
            path.push_str(&format!("&tail={t}"));
        }
        let mut resp = transport::send(self.socket(), Method::GET, &path, None).await?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let data = transport::read_all(resp.body_mut(), &path).await.unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&data)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&data).into_owned());
            return Err(Error::Api { status, message });
        }
        Ok(resp)
    }
}

/// The next data chunk of a streaming body (see [`transport::next_chunk`]).
pub async fn next_chunk(body: &mut Incoming) -> Option<std::result::Result<hyper::body::Bytes, hyper::Error>> {
    transport::next_chunk(body).await
}
