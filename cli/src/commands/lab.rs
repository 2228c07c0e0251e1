//! `berth lab ARGS...` runs `berth-lab ARGS...`: the lab (namespaces,
//! Podman per node, Pebble) is a crate of its own, so the `berth` that
//! operators install carries none of it.

use anyhow::Context;
use std::path::PathBuf;

const LAB_BIN: &str = "berth-lab";

/// `berth-lab` beside this binary, else from PATH.
fn lab_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(LAB_BIN)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(LAB_BIN))
}

pub fn run(args: &[String]) -> anyhow::Result<i32> {
    let bin = lab_binary();
    let status = std::process::Command::new(&bin).args(args).status().with_context(|| {
        format!(
            "cannot run {}: the lab is not part of this build; build it with `cargo build -p berth-lab` \
             (it lands beside `berth` in target/<profile>/)",
            bin.display()
        )
    })?;
    Ok(status.code().unwrap_or(1))
}
