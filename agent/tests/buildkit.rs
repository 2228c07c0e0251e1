//! The BuildKit engine against a stand-in `buildctl` (a shell script first
//! in PATH): BuildKit is not packaged for Debian, so no real buildkitd runs
//! here. The stand-in records what it was given and checks, while it runs,
//! that the context is unpacked and the secrets and the Docker config are
//! in place; what a real buildctl does with them is not tested.

use berth_agent::build::buildkit;
use berth_agent::podman::BuildParams;
use berth_protocol::RegistryAccess;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes the stand-in: `debug workers` answers; `build` prints progress,
/// copies what it sees into `$REC`, and exits `$EXIT`.
fn stand_in(bin: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    let script = bin.join("buildctl");
    std::fs::write(
        &script,
        r##"#!/bin/sh
case "$3" in
  debug) echo "ID  PLATFORMS"; exit 0 ;;
esac
printf '%s\n' "$@" > "$REC/args"
cp "$DOCKER_CONFIG/config.json" "$REC/config.json"
ctx=$(printf '%s\n' "$@" | sed -n 's/^context=//p')
cat "$ctx/Dockerfile" > "$REC/dockerfile"
src=$(printf '%s\n' "$@" | sed -n 's/^id=NPM_TOKEN,src=//p')
cat "$src" > "$REC/secret"
echo "#1 [internal] load build definition from Dockerfile" >&2
echo "#2 DONE 0.1s"
[ "$EXIT" = 0 ] || echo "ERROR: process \"/bin/sh -c false\" did not complete successfully: exit code: 1" >&2
exit "$EXIT"
"##,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn buildctl_gets_the_context_secrets_and_credentials_and_its_output_is_streamed() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    stand_in(&bin);
    let rec = tmp.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    // One test in this binary: PATH is the process's.
    std::env::set_var("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()));
    std::env::set_var("REC", &rec);

    // No buildkitd needed to answer `debug workers` here; a missing
    // buildctl is a clear error.
    buildkit::available(buildkit::DEFAULT_ADDR).await.unwrap();

    let ctx = tmp.path().join("src");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
    let tar = tmp.path().join("ctx.tar");
    let st = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&ctx)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let params = BuildParams {
        dockerfile: "Dockerfile".into(),
        tag: "cp:5000/site:build-4".into(),
        build_args: BTreeMap::new(),
        target: None,
        platform: None,
        registry_config: None,
        secrets: BTreeMap::from([("NPM_TOKEN".into(), "s3cret-value".into())]),
    };
    let access = RegistryAccess {
        host: "cp:5000".into(),
        username: "build.4".into(),
        password: "pw".into(),
    };
    let names = vec!["cp:5000/site:build-4".to_string()];
    let run = |exit: &str| {
        std::env::set_var("EXIT", exit);
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let work = tmp.path().join(format!("work-{exit}"));
        let (params, access, names, tar) = (params.clone(), access.clone(), names.clone(), tar.clone());
        async move {
            let r = buildkit::build(buildkit::DEFAULT_ADDR, &params, &access, &names, &tar, &work, tx).await;
            let mut out = String::new();
            while let Ok(l) = rx.try_recv() {
                out.push_str(&l);
            }
            (r, out)
        }
    };

    let (r, out) = run("0").await;
    r.unwrap();
    assert!(
        out.contains("#1 [internal] load build definition") && out.contains("#2 DONE"),
        "{out}"
    );
    let read = |f: &str| std::fs::read_to_string(rec.join(f)).unwrap();
    assert_eq!(read("dockerfile"), "FROM scratch\n", "the context was not unpacked");
    assert_eq!(read("secret"), "s3cret-value");
    let config: serde_json::Value = serde_json::from_str(&read("config.json")).unwrap();
    assert_eq!(config["auths"]["cp:5000"]["auth"], "YnVpbGQuNDpwdw==", "build.4:pw");
    let args = read("args");
    assert!(
        args.contains("type=image,\"name=cp:5000/site:build-4\",push=true"),
        "{args}"
    );
    assert!(!args.contains("s3cret-value"), "{args}");

    let (r, _) = run("1").await;
    let e = r.unwrap_err();
    assert!(
        e.contains("buildctl build failed") && e.contains("did not complete successfully"),
        "{e}"
    );

    std::env::set_var("PATH", "/nonexistent");
    let e = buildkit::available(buildkit::DEFAULT_ADDR).await.unwrap_err();
    assert!(e.contains("is BuildKit installed"), "{e}");
}
