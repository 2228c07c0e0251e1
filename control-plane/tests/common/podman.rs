//! Podman with a store of its own for the tests that push to the fleet
//! registry: vfs storage under a temporary directory, so the host's store
//! is left alone.

use std::path::Path;
use std::process::{Command, Output};

/// `podman` with its storage under `store`.
pub fn podman_in(store: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .args(["--storage-driver", "vfs"]);
    cmd
}

/// stdout and stderr, for failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Imports into `store`, as `name`, an image of one file `file` holding
/// `contents` (its tar made under `work`).
pub fn import_one_file_image(store: &Path, work: &Path, name: &str, file: &str, contents: &str) {
    let rootfs = work.join(format!("{file}-rootfs"));
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::write(rootfs.join(file), contents).unwrap();
    let tarball = work.join(format!("{file}.tar"));
    let out = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tarball)
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", text(&out));
    let out = podman_in(store).arg("import").arg(&tarball).arg(name).output().unwrap();
    assert!(out.status.success(), "podman import: {}", text(&out));
}
