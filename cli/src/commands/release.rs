//! `berth release keygen|sign`: offline, no control plane needed.

use crate::args::ReleaseCmd;
use crate::release::{keygen, load_key, sign};

pub fn run(cmd: ReleaseCmd) -> anyhow::Result<()> {
    match cmd {
        ReleaseCmd::Keygen { out } => {
            let public = keygen(&out)?;
            println!(
                "release key: {} (keep it secret and off the control plane)",
                out.display()
            );
            println!("public key:  {}", public.display());
        }
        ReleaseCmd::Sign {
            key,
            dir,
            version,
            arch,
            no_latest,
            binaries,
        } => {
            let key = load_key(&key)?;
            let signed = sign(&key, &dir, &version, &arch, &binaries, !no_latest)?;
            for f in &signed.files {
                println!("signed {}", signed.dir.join(f).display());
            }
            if !no_latest {
                println!("{version} is now the latest release");
            }
        }
    }
    Ok(())
}
