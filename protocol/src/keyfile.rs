//! Private files on disk: written atomically with mode 0600, and 32-byte
//! keys kept as base64, made on first use. Shared by the agent (its node
//! keys) and the control plane (its CA key, admin token, secrets key).

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use std::io::{Error, ErrorKind, Result, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

fn context(path: &Path, e: Error) -> Error {
    Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Writes `data` to `path` atomically (temp file, fsync, rename) with mode 0600.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| context(&tmp, e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| context(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| context(path, e))
}

/// Reads a 32-byte base64 key from `path`, or makes one and stores it.
/// A file that exists but does not hold a key is an error, never replaced:
/// a corrupt key must not silently become a new identity.
pub fn load_or_create_key(path: &Path) -> Result<[u8; 32]> {
    match std::fs::read_to_string(path) {
        Ok(s) => B64
            .decode(s.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidData,
                    format!("{} is not 32 bytes of base64", path.display()),
                )
            }),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let k: [u8; 32] = rand::random();
            write_private(path, format!("{}\n", B64.encode(k)).as_bytes())?;
            Ok(k)
        }
        Err(e) => Err(context(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_once_0600_and_corruption_is_an_error() {
        let dir = std::env::temp_dir().join(format!("berth-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k.key");
        let a = load_or_create_key(&p).unwrap();
        assert_eq!(load_or_create_key(&p).unwrap(), a);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&p, "garbage").unwrap();
        let err = load_or_create_key(&p).unwrap_err();
        assert!(err.to_string().contains("k.key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
