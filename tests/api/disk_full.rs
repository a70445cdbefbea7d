//! A full disk, made real: the store on a small tmpfs that the test fills up and frees.
//! Mounting needs root (CI runs as root). Elsewhere the test fails rather than pass
//! without having run; set VERIGATE_SKIP_ROOT_TESTS=1 to skip it on purpose (never under
//! CI=true).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::helpers::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Self {
            path: path.to_owned(),
        })
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        for chunk in [1 << 20, 64 << 10, 4 << 10, 512, 1] {
            let bytes = vec![0u8; chunk];
            while file
                .write_all(&bytes)
                .and_then(|()| file.sync_all())
                .is_ok()
            {}
        }
        filler
    }
}

impl SmallDisk {
    /// Grows the filesystem, as an operator gives a volume more space.
    fn grow(&self, size: &str) {
        let grown = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(grown, "remounting {} with size {size}", self.path.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_the_store_unready_and_it_recovers_by_itself_when_space_returns() {
    let scratch = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&scratch.path().join("disk"), "24m") else {
        skip_or_fail(
            "cannot mount a tmpfs (needs root; CI runs as root)",
            "VERIGATE_SKIP_ROOT_TESTS",
        );
        return;
    };
    let store_path = disk.path.join("db");
    let app = spawn_app_with(|s| {
        s.store.path = store_path.clone();
        // Checkpoints every few events, so the index meets the full disk too.
        s.store.checkpoint_events = 4;
    })
    .await;
    // Acknowledged ids, with their numbers.
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    // Each verification has a number of its own, in a block of its own, so that the policy
    // allows every request and a deny can only be the answer on a store error.
    let number_of = |serial: usize| format!("+46701{serial:03}0001");
    let send = async |app: &TestApp,
                      serial: usize,
                      id: String,
                      acknowledged: &mut Vec<(String, String)>| {
        let number = number_of(serial);
        let request = app.post_callback(&request_event(&id, "sms", &number)).await;
        let result = app.post_callback(&result_event(&id, "SUCCESSFUL")).await;
        // While the disk is full a read may fail too (503): then it is not confirmed.
        let read = app
            .get(&format!("/v1/verifications/{id}"), Some(API_TOKEN))
            .await;
        let stored = read.status == 200 && read.json()["decision"]["on_error"] == false;
        if result.status == 200 && stored {
            acknowledged.push((id, number));
        }
        (request, result)
    };
    for i in 0..10 {
        let (request, _) = send(&app, i, format!("before-{i}"), &mut acknowledged).await;
        assert_eq!(request.json()["action"], "allow", "{}", request.text);
    }
    assert_eq!(acknowledged.len(), 10);

    let filler = disk.fill();
    // Writes fail now: requests get on_error (deny), results 503 so that Sinch retries.
    // The log or a checkpoint into the index may meet the full disk first (the log's last
    // page may still have room, and a store whose index cannot be written refuses before
    // it logs), so the failures are counted over both stages. Send until one callback
    // pair has been refused whole: the log's prepared segments (up to 1 MiB, on disk
    // already) take a few hundred more first.
    let write_failures = async |app: &TestApp| {
        let mut failures = 0.0;
        for stage in ["wal", "checkpoint"] {
            failures += app
                .metric(&format!(
                    "verigate_store_write_failures_total{{stage=\"{stage}\"}}"
                ))
                .await;
        }
        failures
    };
    let mut refused = false;
    for i in 0..2000 {
        let (request, result) = send(&app, 100 + i, format!("full-{i}"), &mut acknowledged).await;
        assert_eq!(request.status, 200, "a request is always answered");
        if result.status != 200 {
            assert_eq!(result.status, 503, "{}", result.text);
            assert_eq!(result.error_code(), "store_unavailable", "{}", result.text);
        }
        if result.status == 503 && request.json()["action"] == "deny" {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "a full disk never made the store refuse a callback"
    );
    assert!(
        write_failures(&app).await >= 1.0,
        "no failed write was counted"
    );
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_ne!(ready.json()["checks"]["store"], "ok", "{}", ready.text);
    assert_eq!(app.metric("verigate_store_ready").await, 0.0);

    std::fs::remove_file(&filler).unwrap();
    wait_for("readiness after freeing space", async || {
        app.get("/readyz", None).await.status == 200
    })
    .await;
    for i in 0..10 {
        let (request, _) = send(&app, 10 + i, format!("after-{i}"), &mut acknowledged).await;
        assert_eq!(request.json()["action"], "allow", "{}", request.text);
    }
    assert!(
        acknowledged
            .iter()
            .filter(|(id, _)| id.starts_with("after-"))
            .count()
            == 10,
        "not every event after recovery was acknowledged: {acknowledged:?}"
    );
    assert_eq!(app.metric("verigate_store_ready").await, 1.0);

    // Nothing acknowledged was lost, before or after a restart.
    for (id, _) in &acknowledged {
        let record = app.record(id).await;
        assert!(
            record.is_some_and(|r| r["result"]["status"] == "SUCCESSFUL"),
            "{id} lost"
        );
    }
    let app = app.restart().await;
    for (id, _) in &acknowledged {
        assert!(app.record(id).await.is_some(), "{id} lost after a restart");
    }
    // The number index came through the failed checkpoints whole as well.
    for (id, number) in &acknowledged {
        let listed = app
            .get(
                &format!("/v1/verifications?number={}", number.replace('+', "%2B")),
                Some(API_TOKEN),
            )
            .await
            .json();
        let listed: Vec<&str> = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(listed, [id.as_str()], "{id} not found by its number");
    }
    app.stop().await;
    drop(disk);
}

/// The disk fills with the default settings (result events with a long reference, one
/// after another), and the operator grows the filesystem instead of deleting anything:
/// within seconds the store is ready and acknowledges again, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_disk_filled_recovers_when_the_filesystem_grows() {
    let scratch = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&scratch.path().join("disk"), "6m") else {
        skip_or_fail(
            "cannot mount a tmpfs (needs root; CI runs as root)",
            "VERIGATE_SKIP_ROOT_TESTS",
        );
        return;
    };
    let store_path = disk.path.join("db");
    let app = spawn_app_with(|s| s.store.path = store_path.clone()).await;
    let result_with_reference = |id: &str| {
        let mut event: serde_json::Value =
            serde_json::from_str(&result_event(id, "SUCCESSFUL")).unwrap();
        event["reference"] = serde_json::Value::String(format!("{id}-{}", "r".repeat(1500)));
        event.to_string()
    };
    let mut acknowledged = Vec::new();
    let mut refused = false;
    for i in 0..20_000 {
        let id = format!("grow-{i}");
        let answer = app.post_callback(&result_with_reference(&id)).await;
        match answer.status {
            200 => acknowledged.push(id),
            503 => {
                assert_eq!(answer.error_code(), "store_unavailable", "{}", answer.text);
                refused = true;
                break;
            }
            other => panic!("{other}: {}", answer.text),
        }
    }
    assert!(refused, "6 MB never filled up");
    let ready = app.get("/readyz", None).await;
    assert_eq!(ready.status, 503, "{}", ready.text);

    disk.grow("120m");
    wait_for("readiness after the filesystem grew", async || {
        app.get("/readyz", None).await.status == 200
    })
    .await;
    for i in 0..20 {
        let id = format!("grown-{i}");
        let answer = app.post_callback(&result_with_reference(&id)).await;
        assert_eq!(answer.status, 200, "{id}: {}", answer.text);
        acknowledged.push(id);
    }
    for id in &acknowledged {
        assert!(app.record(id).await.is_some(), "{id} lost");
    }
    let app = app.restart().await;
    for id in &acknowledged {
        assert!(app.record(id).await.is_some(), "{id} lost after a restart");
    }
    // A failed index is left behind until the restart, which deletes its folder.
    let index_folders = std::fs::read_dir(&store_path)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir() && e.file_name().to_string_lossy().starts_with("index"))
        .count();
    assert_eq!(index_folders, 1);
    app.stop().await;
    drop(disk);
}
