//! End-to-end: schemathesis (PyPI, pinned; `scripts/schemathesis.sh`
//! installs it into `target/venv`) fuzzes a lab's control plane from the
//! control plane's own `/v1/openapi.json`, as the admin: no answer is a
//! 5xx (`not_a_server_error`), and every 4xx is an ApiError naming the
//! input it refuses (`api_error_names_a_field`, tests/openapi/hooks.py).
//!
//! Left out: `DELETE /v1/nodes/{name}` and `POST /v1/nodes/upgrade`, which
//! would remove or upgrade the lab's node under the run. The hooks drop
//! `follow` from queries, so no log or event stream stays open.

use berth_tests::*;
use std::path::Path;
use std::process::Command;

/// Test cases per operation; with 2 workers the run takes well under a
/// minute on 2 cores.
const MAX_EXAMPLES: &str = "20";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_every_4xx_names_its_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let install = Command::new("bash")
        .arg(root.join("scripts/schemathesis.sh"))
        .output()
        .expect("run scripts/schemathesis.sh");
    assert!(
        install.status.success(),
        "installing schemathesis: {}",
        String::from_utf8_lossy(&install.stderr)
    );
    let bin = String::from_utf8(install.stdout).unwrap().trim().to_string();

    let lab = lab_up(215, 1).await;
    let cfg = lab.client_config();
    let token = std::fs::read_to_string(&cfg.admin_token_file).unwrap();
    let started = std::time::Instant::now();
    let out = Command::new("timeout")
        .arg("600")
        .arg(&bin)
        .arg("--config-file")
        .arg(root.join("tests/openapi/schemathesis.toml"))
        .args(["run", &format!("{}/v1/openapi.json", cfg.url)])
        .arg("--tls-verify")
        .arg(&cfg.ca_file)
        .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
        .args(["--checks", "not_a_server_error,api_error_names_a_field"])
        .args([
            "--max-examples",
            MAX_EXAMPLES,
            "--workers",
            "2",
            "--request-timeout",
            "30",
        ])
        .args([
            "--exclude-path",
            "/v1/nodes/{name}",
            "--exclude-path",
            "/v1/nodes/upgrade",
        ])
        // Nothing kept between runs, nothing written outside the clone.
        .args(["--generation-database", "none", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", root.join("tests/openapi/hooks.py"))
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .output()
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}\nschemathesis took {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "schemathesis found problems ({}):\n{report}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // It ran, and tested every operation it selected (all but the two).
    let count = |label: &str| {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|v| v.trim().split('/').next()?.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no {label:?} in the report:\n{report}"))
    };
    let (selected, tested) = (count("Selected:"), count("Tested:"));
    assert!(tested > 0 && tested == selected, "selected {selected}, tested {tested}");
    drop(lab);
}
