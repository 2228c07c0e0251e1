//! The one lab guard (needs root and the workspace's binaries): a dropped
//! guard removes its lab, a lab handed out by `into_lab` stays, and an
//! existing lab is refused with `LabExists` unless it is to be replaced.

use berth_lab::net::LabNet;
use berth_lab::{destroy_by_id, Lab, LabExists, LabGuard, LabSpec};
use std::time::Duration;

fn spec(id: u8) -> LabSpec {
    LabSpec {
        converge_within: Duration::from_secs(60),
        ..LabSpec::new(id, std::env::temp_dir().join(format!("berth-lab-guard-{id}")), 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_guard_removes_the_lab_and_into_lab_keeps_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s = spec(245);
    let lab = LabGuard::up(&s).await.expect("lab up");
    assert_eq!(lab.admin().unwrap().list_nodes().await.unwrap().len(), 1);
    drop(lab);
    assert!(!LabNet { id: 245 }.exists(), "the network is gone");
    assert!(!s.dir.exists(), "the lab dir is gone");

    let kept = LabGuard::up(&s).await.expect("lab up").into_lab();
    let still = Lab::load(&s.dir).expect("the lab is still there");
    assert_eq!(still.admin().unwrap().list_nodes().await.unwrap().len(), 1);

    let refused = LabSpec {
        replace: false,
        ..s.clone()
    };
    let err = LabGuard::up(&refused).await.err().expect("an existing lab is refused");
    assert_eq!(err.downcast_ref::<LabExists>().map(|e| e.id), Some(245));
    assert!(LabNet { id: 245 }.exists(), "refusing leaves the lab alone");

    kept.destroy(false).unwrap();
    assert!(!LabNet { id: 245 }.exists());
    let _ = destroy_by_id(245, &s.dir, false);
}
