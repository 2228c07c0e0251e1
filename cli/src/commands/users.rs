//! `berth users add|list|remove`: who may sign in to the web dashboard.

use crate::args::UsersCmd;
use crate::output::json_or;
use anyhow::{bail, Context};
use berth_client::AdminClient;
use berth_protocol::time::Utc;
use berth_protocol::user::{validate_password, validate_user_name};
use std::io::{BufRead, IsTerminal, Read, Write};

pub async fn run(api: &AdminClient, cmd: UsersCmd) -> anyhow::Result<()> {
    match cmd {
        UsersCmd::Add { name, password_stdin } => {
            // Refuse a bad name before asking for a password.
            validate_user_name(&name)?;
            let password = if password_stdin {
                password_from_stdin()?
            } else {
                password_from_terminal()?
            };
            validate_password(&password)?;
            let u = api.add_user(&name, &password).await?;
            println!("added user {}", u.name);
        }
        UsersCmd::List { json } => {
            let users = api.list_users().await?;
            json_or(json, &users, |users| {
                println!("{:<24} CREATED (UTC)", "NAME");
                for u in users {
                    println!("{:<24} {}", u.name, Utc::from_secs(u.created_at).date_time(' '));
                }
            })?;
        }
        UsersCmd::Remove { name } => {
            let r = api.remove_user(&name).await?;
            println!("removed user {} ({} sessions ended)", r.removed, r.sessions_ended);
        }
    }
    Ok(())
}

/// All of stdin, less one trailing newline.
fn password_from_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("--password-stdin: reading stdin")?;
    let s = s.strip_suffix('\n').unwrap_or(&s);
    Ok(s.strip_suffix('\r').unwrap_or(s).to_string())
}

/// Asks twice on the terminal, with echo off.
fn password_from_terminal() -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("stdin is not a terminal: pass the password with --password-stdin");
    }
    let first = prompt_hidden("Password: ")?;
    let again = prompt_hidden("Password (again): ")?;
    if first != again {
        bail!("the passwords differ");
    }
    Ok(first)
}

fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    let mut err = std::io::stderr();
    write!(err, "{prompt}")?;
    err.flush()?;
    let line = {
        let _quiet = NoEcho::enter()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line
    };
    // The Enter key was not echoed either.
    writeln!(err)?;
    let line = line.strip_suffix('\n').unwrap_or(&line);
    Ok(line.strip_suffix('\r').unwrap_or(line).to_string())
}

/// Turns the terminal's echo off until dropped (also on an error or Ctrl-D).
struct NoEcho(rustix::termios::Termios);

impl NoEcho {
    fn enter() -> anyhow::Result<NoEcho> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal's mode")?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet)
            .context("turning the terminal's echo off")?;
        Ok(NoEcho(saved))
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &self.0);
    }
}
