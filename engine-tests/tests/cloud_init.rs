//! A stock cloud image runs a job unchanged (images/recipes/debian-12-cloud.yml: Debian
//! 12 with cloud-init and no guest tools inside, a UEFI disk). Its own cloud-init finds
//! the VM's metadata service through the SMBIOS serial, runs the worker's user-data
//! (which fetches, checks and starts the guest tools) and the payload's, and the first
//! job saves a boot snapshot once cloud-init is done; the next job resumes it.

use engine_tests::{Job, Worker, assets, base_config, with_setting};
use qemu_worker::job::ResultState;

fn worker() -> Worker {
    let config = with_setting(
        &base_config(),
        "limits",
        "{maxMemory: 512, maxCPUs: 1, defaultThreads: 1}",
    );
    let config = with_setting(
        &config,
        "timeouts",
        "{guestReadySeconds: 420, heartbeatSeconds: 1, leaseSeconds: 10, graceSeconds: 2, shutdownSeconds: 5}",
    );
    Worker::with_config(&format!(
        "{config}snapshots: {{enabled: true}}\ncloudInit: {{guestTools: {:?}}}\n",
        assets::guest_tools().display().to_string()
    ))
}

/// The payload's own part: a script cloud-init runs before the task.
const USER_DATA: &str =
    "userData: |\n  #!/bin/sh\n  echo \"written by the payload's user-data\" > /root/marker.txt\n";

const PROBE: &str = r#"set -e
mkdir -p /root/out
test -f /root/marker.txt && echo "marker present when the task started"
cp /root/marker.txt /root/out/marker.txt
cloud-init status --long > /root/out/cloud-init-status.txt || true
echo "host=$(hostname)"
echo "instances=$(ls /var/lib/cloud/instances | wc -l)"
echo "tools=$(systemctl show -p FragmentPath --value qemu-worker-guest.service)"
"#;

fn job(image: &str) -> Job {
    Job::script(PROBE)
        .image(image)
        .max_run_time(300)
        .extra(USER_DATA)
        .file_artifact("/root/out/cloud-init-status.txt", "cloud-init-status.txt")
        .directory_artifact("/root/out", "out")
}

fn line<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} line in {log}"))
}

#[test]
fn a_stock_cloud_image_runs_a_job_through_its_own_cloud_init_and_the_next_job_resumes() {
    let worker = worker();
    let image = assets::debian_cloud_image().display().to_string();

    let first = job(&image).run(&worker);
    assert_eq!(first.state(), ResultState::Completed, "{first}");
    let log = first.log();
    assert!(
        log.contains("marker present when the task started"),
        "{log}"
    );
    assert!(log.contains("saved boot snapshot"), "{log}");
    // The worker's tools, installed by the user-data, not the image's.
    assert_eq!(
        line(&log, "tools="),
        "/etc/systemd/system/qemu-worker-guest.service"
    );
    let status = String::from_utf8(
        first
            .artifact("cloud-init-status.txt")
            .expect("cloud-init-status.txt"),
    )
    .expect("utf-8");
    assert!(status.contains("status: done"), "{status}");
    assert!(status.contains("DataSourceNoCloud"), "{status}");
    assert!(
        status.contains("http://169.254.169.254/nocloud/"),
        "{status}"
    );
    assert_eq!(
        first.artifact("out/marker.txt"),
        Some(b"written by the payload's user-data\n".to_vec())
    );
    let first_host = line(&log, "host=").to_owned();

    let second = job(&image).run(&worker);
    assert_eq!(second.state(), ResultState::Completed, "{second}");
    let log = second.log();
    assert!(log.contains("resumed from boot snapshot"), "{log}");
    // cloud-init ran once, in the boot the snapshot was saved from; the tools gave the
    // resumed VM its own job's host name.
    assert_eq!(line(&log, "instances="), "1");
    assert_ne!(line(&log, "host="), first_host);
    let status = second
        .artifact("cloud-init-status.txt")
        .expect("cloud-init-status.txt");
    assert!(
        String::from_utf8_lossy(&status).contains("status: done"),
        "{status:?}"
    );
    worker.assert_clean();
}
