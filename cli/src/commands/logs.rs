//! `berth logs` and `berth exec`.

use crate::args::{ExecArgs, LogsArgs};
use anyhow::{bail, Context};
use berth_client::{AdminClient, ExecQuery, LogsQuery};
use berth_protocol::stream::{ExecControl, LogLine, EXEC_STDERR};
use futures_util::{SinkExt, StreamExt};
use std::io::{IsTerminal, Write};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

const COLOURS: [&str; 6] = ["36", "33", "35", "32", "34", "31"];

/// A stable colour per replica name.
fn colour(replica: &str) -> &'static str {
    let h = replica
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    COLOURS[h % COLOURS.len()]
}

fn render(l: &LogLine, timestamps: bool, tty: bool) -> String {
    let who = if tty {
        format!("\x1b[{}m{}\x1b[0m", colour(&l.replica), l.replica)
    } else {
        l.replica.clone()
    };
    match (&l.line, &l.notice) {
        (Some(line), _) => match (&l.ts, timestamps) {
            (Some(ts), true) => format!("{who} {ts} | {line}"),
            _ => format!("{who} | {line}"),
        },
        (None, Some(n)) => format!("{who} -- {n}"),
        (None, None) => format!("{who} |"),
    }
}

pub async fn logs(api: &AdminClient, a: LogsArgs) -> anyhow::Result<()> {
    let q = LogsQuery {
        follow: a.follow,
        since: a.since,
        tail: a.tail,
        replica: a.replica,
    };
    print_lines(a.json, a.timestamps, |each| api.service_logs(&a.service, &q, each)).await
}

/// Prints the lines `read` passes on, as text or JSON.
pub async fn print_lines<'a, F, Fut>(json: bool, timestamps: bool, read: F) -> anyhow::Result<()>
where
    F: FnOnce(Box<dyn FnMut(LogLine) + Send + 'a>) -> Fut,
    Fut: std::future::Future<Output = berth_client::Result<()>>,
{
    let tty = std::io::stdout().is_terminal();
    let mut closed = false;
    read(Box::new(move |l: LogLine| {
        if closed {
            return;
        }
        let text = if json {
            serde_json::to_string(&l).unwrap_or_default()
        } else {
            render(&l, timestamps, tty)
        };
        // A closed pipe (`| head`) ends the command quietly.
        let mut out = std::io::stdout().lock();
        closed = writeln!(out, "{text}").and_then(|_| out.flush()).is_err();
    }))
    .await?;
    Ok(())
}

/// Puts the terminal in raw mode until dropped.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &self.0);
    }
}

fn window_size() -> (u16, u16) {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .map(|w| (w.ws_row, w.ws_col))
        .unwrap_or((24, 80))
}

fn control(c: &ExecControl) -> Message {
    Message::text(serde_json::to_string(c).unwrap_or_default())
}

pub async fn exec(api: &AdminClient, a: ExecArgs) -> anyhow::Result<i32> {
    let (service, replica) = match a.target.split_once('/') {
        Some((s, r)) => (s.to_string(), Some(r.to_string())),
        None => (a.target.clone(), None),
    };
    if a.tty && !std::io::stdin().is_terminal() {
        bail!("-t: stdin is not a terminal (leave -t out to run with pipes)");
    }
    let (rows, cols) = if a.tty { window_size() } else { (0, 0) };
    let q = ExecQuery {
        replica,
        cmd: a.cmd,
        tty: a.tty,
        interactive: a.interactive,
        rows,
        cols,
    };
    let ws = api.exec_socket(&service, &q).await?;
    let raw = if a.tty { Some(RawMode::enter()?) } else { None };
    let code = relay(ws, a.interactive, a.tty).await;
    drop(raw);
    code
}

async fn relay(ws: berth_client::ExecSocket, interactive: bool, tty: bool) -> anyhow::Result<i32> {
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(16);
    if interactive {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(control(&ExecControl::Eof)).await;
                        return;
                    }
                    Ok(n) => {
                        if tx.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    if tty {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                let (rows, cols) = window_size();
                if tx.send(control(&ExecControl::Resize { rows, cols })).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            Some(m) = rx.recv() => {
                if sink.send(m).await.is_err() {
                    bail!("the stream to the replica broke");
                }
            }
            m = stream.next() => match m {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let w: &mut dyn Write = if b[0] == EXEC_STDERR { &mut stderr } else { &mut stdout };
                    let _ = w.write_all(&b[1..]).and_then(|_| w.flush());
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ExecControl>(&t) {
                    Ok(ExecControl::Exit { code }) => return Ok(code),
                    Ok(ExecControl::Error { message }) => bail!("exec: {message}"),
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None => bail!("the stream ended before the command did"),
                Some(Err(e)) => bail!("the stream to the replica broke: {e}"),
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_notices_render_after_their_replica() {
        let mut l = LogLine::notice("web-1", "ended");
        assert_eq!(render(&l, false, false), "web-1 -- ended");
        l.notice = None;
        l.line = Some("GET / 200".into());
        l.ts = Some("2026-12-06T22:00:00Z".into());
        assert_eq!(render(&l, false, false), "web-1 | GET / 200");
        assert_eq!(render(&l, true, false), "web-1 2026-12-06T22:00:00Z | GET / 200");
        let coloured = render(&l, false, true);
        assert!(
            coloured.starts_with("\x1b[") && coloured.contains("web-1\x1b[0m | GET"),
            "{coloured:?}"
        );
        assert_eq!(colour("web-1"), colour("web-1"));
    }
}
