//! The QEMU command line: snapshots of representative machines, and proof that real
//! `qemu-system-x86_64` accepts every device combination the builder can emit.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use qemu_worker::config::FirmwareConfig;
use qemu_worker::image::{BootDisk, DiskFormat, DiskLayer, KernelFiles};
use qemu_worker::job::{
    Chipset, CpuModel, Firmware, GraphicsDevice, Identity, InitrdMember, KernelMember,
    KeyboardDevice, KeyboardLayout, Machine, MachineDefinition, MachineLayers, MachineLimits,
    MouseDevice, NetworkDevice, SoundDevice, StorageDevice, TabletDevice, UsbController,
    load_machine_json,
};
use qemu_worker::vm::{Accelerator, NetworkAttachment, RunDir, VmSpec, qemu_argv};
use test_support::{require, require_file};

use crate::qmp::TestQmp;

const LIMITS: MachineLimits = MachineLimits {
    max_memory: 256,
    max_cpus: 2,
    default_threads: 1,
};

/// taskcluster-worker's version 1 example machine.json.
const TASKCLUSTER_V1: &str = r#"{
    "version": 1, "uuid": "52bab607-10f1-4049-a0f8-ee4725cb715b",
    "chipset": "pc-i440fx-2.8", "cpu": "host", "flags": [],
    "usb": "nec-usb-xhci", "network": "e1000", "mac": "aa:54:1a:30:5c:de",
    "storage": "virtio-blk-pci", "graphics": "qxl-vga", "vgaMemory": 16,
    "graphicsRam": 64, "graphicsVRam": 32, "sound": "hda-duplex/intel-hda",
    "keyboard": "usb-kbd", "keyboardLayout": "en-us", "mouse": "usb-mouse",
    "tablet": "usb-tablet"
}"#;

struct Representative {
    name: &'static str,
    machine: MachineDefinition,
    kernel: bool,
    initrd: bool,
    layers: &'static [DiskFormat],
    network: Network,
    accelerator: Accelerator,
}

#[derive(Clone, Copy)]
enum Network {
    User,
    Tap,
}

fn representatives() -> Vec<Representative> {
    vec![
        Representative {
            name: "builtin-default",
            machine: MachineDefinition::default(),
            kernel: false,
            initrd: false,
            // taskcluster-worker's layout: disk.img + layer.qcow2, under the job overlay.
            layers: &[DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Qcow2],
            network: Network::User,
            accelerator: Accelerator::Tcg,
        },
        Representative {
            name: "taskcluster-v1",
            machine: load_machine_json(TASKCLUSTER_V1).expect("taskcluster example loads"),
            kernel: false,
            initrd: false,
            layers: &[DiskFormat::Qcow2, DiskFormat::Qcow2],
            network: Network::Tap,
            accelerator: Accelerator::Kvm,
        },
        Representative {
            name: "microvm-kernel-initrd",
            machine: MachineDefinition {
                chipset: Some(Chipset::Microvm),
                graphics: Some(GraphicsDevice::None),
                guest_agent: Some(false),
                kernel: Some(KernelMember::Kernel),
                initrd: Some(InitrdMember::Initrd),
                cmdline: Some("console=ttyS0 tsc_early_khz=2000000 no_timer_check".into()),
                ..Default::default()
            },
            kernel: true,
            initrd: true,
            layers: &[DiskFormat::Qcow2, DiskFormat::Qcow2],
            network: Network::User,
            accelerator: Accelerator::Tcg,
        },
        Representative {
            name: "q35-uefi",
            machine: MachineDefinition {
                chipset: Some(Chipset::Q35),
                firmware: Some(Firmware::Uefi),
                ..Default::default()
            },
            kernel: false,
            initrd: false,
            layers: &[DiskFormat::Qcow2, DiskFormat::Qcow2],
            network: Network::User,
            accelerator: Accelerator::Tcg,
        },
        Representative {
            name: "q35-nvme-kernel",
            machine: MachineDefinition {
                chipset: Some(Chipset::Q35),
                cpu: Some(CpuModel::Qemu64),
                storage: Some(StorageDevice::Nvme),
                graphics: Some(GraphicsDevice::VirtioVga),
                sound: Some(SoundDevice::Ac97),
                usb: Some(UsbController::QemuXhci),
                tablet: Some(TabletDevice::UsbTablet),
                keyboard_layout: Some(KeyboardLayout::DeCh),
                kernel: Some(KernelMember::Kernel),
                memory: Some(128),
                ..Default::default()
            },
            kernel: true,
            initrd: false,
            layers: &[DiskFormat::Qcow2, DiskFormat::Qcow2],
            network: Network::User,
            accelerator: Accelerator::Tcg,
        },
    ]
}

fn resolve(definition: &MachineDefinition) -> Machine {
    let layers = MachineLayers {
        image: definition.clone(),
        ..Default::default()
    };
    layers
        .resolve(&LIMITS, &Identity::derive("argv-test", 0))
        .unwrap_or_else(|issues| panic!("representative machine is invalid: {issues:?}"))
}

/// Builds the argv of `rep` with its files under `dir`.
fn argv_for(rep: &Representative, machine: &Machine, dir: &Path, files: &DiskFiles) -> Vec<String> {
    argv_resuming(rep, machine, dir, files, None)
}

fn argv_resuming(
    rep: &Representative,
    machine: &Machine,
    dir: &Path,
    files: &DiskFiles,
    resume: Option<&str>,
) -> Vec<String> {
    let run_dir = RunDir::new(&dir.join("run")).expect("short run dir");
    let disk = BootDisk {
        layers: rep
            .layers
            .iter()
            .enumerate()
            .map(|(index, format)| DiskLayer {
                path: files.layer_path(index, *format),
                format: *format,
            })
            .collect(),
    };
    let kernel = rep.kernel.then(|| KernelFiles {
        kernel: files.kernel.clone(),
        initrd: rep.initrd.then(|| files.initrd.clone()),
    });
    let network = match rep.network {
        Network::User => NetworkAttachment::User {
            guestfwd_command: vec![
                "/usr/libexec/qemu-worker".into(),
                "metadata-splice".into(),
                run_dir.metadata_socket(),
            ],
        },
        Network::Tap => NetworkAttachment::Tap {
            ifname: "tap0".into(),
            netns: "qw-test".into(),
        },
    };
    qemu_argv(&VmSpec {
        name: rep.name,
        machine,
        run_dir: &run_dir,
        disk: &disk,
        kernel: kernel.as_ref(),
        ovmf_code: &FirmwareConfig::default().ovmf_code,
        network: &network,
        accelerator: rep.accelerator,
        resume,
    })
}

/// Paths of the files a VM is given; for snapshots they need not exist.
struct DiskFiles {
    dir: PathBuf,
    kernel: String,
    initrd: String,
}

impl DiskFiles {
    fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            kernel: dir.join("kernel").display().to_string(),
            initrd: dir.join("initrd").display().to_string(),
        }
    }

    fn layer_path(&self, index: usize, format: DiskFormat) -> String {
        let ext = match format {
            DiskFormat::Raw => "img",
            DiskFormat::Qcow2 => "qcow2",
        };
        self.dir
            .join(format!("layer{index}.{ext}"))
            .display()
            .to_string()
    }
}

/// A VM resumed from a boot snapshot loads the saved state through a shell-quoted
/// `cat`; nothing else changes (the worker's console capture appends to the console the
/// snapshot's was copied into). The console is a socket the worker reads and caps, never
/// a file QEMU writes.
#[test]
fn a_resumed_vm_only_adds_its_incoming_state() {
    let rep = &representatives()[0];
    let machine = resolve(&rep.machine);
    let dir = tempfile::tempdir().expect("tempdir");
    let files = make_files(dir.path(), rep);
    let cold = argv_for(rep, &machine, dir.path(), &files);
    let resumed = argv_resuming(
        rep,
        &machine,
        dir.path(),
        &files,
        Some("/snap shots/it's/vmstate"),
    );
    let at = resumed
        .iter()
        .position(|a| a == "-incoming")
        .expect("-incoming");
    assert_eq!(resumed[at + 1], r"exec:cat '/snap shots/it'\''s/vmstate'");
    let serial = cold
        .iter()
        .find(|a| a.contains("id=serial0,"))
        .expect("serial chardev");
    assert!(
        serial.starts_with("socket,id=serial0,path=")
            && serial.ends_with("/serial.sock,server=on,wait=off"),
        "{serial}"
    );
    let mut rest = resumed.clone();
    rest.drain(at..at + 2);
    assert_eq!(rest, cold);
}

#[test]
fn argv_snapshots() {
    let dir = Path::new("/var/lib/qemu-worker/run/job-1");
    for rep in representatives() {
        let machine = resolve(&rep.machine);
        let argv = argv_for(&rep, &machine, dir, &DiskFiles::at(dir));
        insta::assert_snapshot!(rep.name, argv.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------
// Real QEMU.

/// Creates real backing chains with qemu-img and placeholder kernel files. With `-S` the
/// guest never runs, so the kernel only has to be a file QEMU can load: a bzImage header
/// (boot protocol 2.06, which may take an initrd) and zeros. The real kernel is tested
/// with the test image.
fn make_files(dir: &Path, rep: &Representative) -> DiskFiles {
    let files = DiskFiles::at(dir);
    for (index, format) in rep.layers.iter().enumerate() {
        let path = files.layer_path(index, *format);
        let mut cmd = Command::new("qemu-img");
        cmd.arg("create").arg("-q");
        match (index, format) {
            (0, DiskFormat::Raw) => cmd.args(["-f", "raw", &path, "16M"]),
            (0, DiskFormat::Qcow2) => cmd.args(["-f", "qcow2", &path, "16M"]),
            (_, _) => {
                let below = rep.layers[index - 1];
                let below_fmt = if below == DiskFormat::Raw {
                    "raw"
                } else {
                    "qcow2"
                };
                cmd.args(["-f", "qcow2", "-F", below_fmt, "-b"])
                    .arg(files.layer_path(index - 1, below))
                    .arg(&path)
            }
        };
        let status = cmd.status().expect("qemu-img runs");
        assert!(status.success(), "qemu-img create {path} failed");
    }
    std::fs::write(&files.kernel, placeholder_bzimage()).expect("write kernel");
    std::fs::write(&files.initrd, b"initrd").expect("write initrd");
    files
}

fn placeholder_bzimage() -> Vec<u8> {
    let mut image = vec![0u8; 64 << 10];
    image[0x1f1] = 4; // setup sectors
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes()); // protocol version
    image[0x211] = 1; // LOADED_HIGH
    image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    image[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    image
}

/// Starts QEMU with `argv` and returns its status from QMP `query-status`, or QEMU's
/// complaint. QEMU is always reaped.
fn qemu_status(argv: &[String], dir: &Path) -> Result<String, String> {
    std::fs::create_dir_all(dir.join("run")).map_err(|e| e.to_string())?;
    let stderr_path = dir.join("qemu.stderr");
    let stderr = File::create(&stderr_path).map_err(|e| e.to_string())?;
    let mut child = Command::new("qemu-system-x86_64")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("failed to start qemu-system-x86_64: {e}"))?;
    let result = query_status(&mut child, &dir.join("run/qmp.sock"));
    let _ = child.kill();
    let _ = child.wait();
    result.map_err(|e| {
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        format!("{e}; QEMU said: {}", stderr.trim())
    })
}

fn query_status(child: &mut Child, socket: &Path) -> Result<String, String> {
    let mut qmp = TestQmp::connect(child, socket, Duration::from_secs(30))?;
    let status = qmp.execute("query-status")?;
    let _ = qmp.execute("quit");
    status["status"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("query-status without a status: {status}"))
}

/// One case: a representative machine with at most one field changed.
struct Case {
    label: String,
    rep_index: usize,
    machine: MachineDefinition,
}

/// Every value of every device enum, each on the representative where it makes sense.
fn cases(reps: &[Representative]) -> Vec<Case> {
    let mut cases: Vec<Case> = reps
        .iter()
        .enumerate()
        .map(|(i, rep)| Case {
            label: rep.name.to_owned(),
            rep_index: i,
            machine: rep.machine.clone(),
        })
        .collect();
    let on_default = |label: String, machine: MachineDefinition| Case {
        label,
        rep_index: 0,
        machine,
    };
    let base = MachineDefinition::default;
    for &chipset in Chipset::ALL {
        // microvm is covered by its own representative (it needs a kernel).
        if chipset != Chipset::Microvm {
            cases.push(on_default(
                format!("chipset={chipset}"),
                MachineDefinition {
                    chipset: Some(chipset),
                    ..base()
                },
            ));
        }
    }
    for &firmware in Firmware::ALL {
        cases.push(on_default(
            format!("firmware={firmware}"),
            MachineDefinition {
                firmware: Some(firmware),
                ..base()
            },
        ));
    }
    // OVMF boots a kernel directly too (fw_cfg), on both chipsets.
    let kernel_rep = reps
        .iter()
        .position(|rep| rep.name == "q35-nvme-kernel")
        .expect("the kernel representative");
    for chipset in [Chipset::Q35, Chipset::Pc] {
        cases.push(Case {
            label: format!("firmware=uefi chipset={chipset} kernel"),
            rep_index: kernel_rep,
            machine: MachineDefinition {
                firmware: Some(Firmware::Uefi),
                chipset: Some(chipset),
                ..reps[kernel_rep].machine.clone()
            },
        });
    }
    for &cpu in CpuModel::ALL {
        cases.push(on_default(
            format!("cpu={cpu}"),
            MachineDefinition {
                cpu: Some(cpu),
                ..base()
            },
        ));
    }
    let usb_devices = MachineDefinition {
        keyboard: Some(KeyboardDevice::UsbKbd),
        mouse: Some(MouseDevice::UsbMouse),
        tablet: Some(TabletDevice::UsbTablet),
        ..base()
    };
    for &usb in UsbController::ALL {
        let machine = if usb == UsbController::None {
            MachineDefinition {
                usb: Some(usb),
                ..base()
            }
        } else {
            MachineDefinition {
                usb: Some(usb),
                ..usb_devices.clone()
            }
        };
        cases.push(on_default(format!("usb={usb}"), machine));
    }
    for &network in NetworkDevice::ALL {
        cases.push(on_default(
            format!("network={network}"),
            MachineDefinition {
                network: Some(network),
                ..base()
            },
        ));
    }
    for &storage in StorageDevice::ALL {
        cases.push(on_default(
            format!("storage={storage}"),
            MachineDefinition {
                storage: Some(storage),
                ..base()
            },
        ));
        cases.push(on_default(
            format!("q35 storage={storage}"),
            MachineDefinition {
                storage: Some(storage),
                chipset: Some(Chipset::Q35),
                ..base()
            },
        ));
    }
    for &graphics in GraphicsDevice::ALL {
        cases.push(on_default(
            format!("graphics={graphics}"),
            MachineDefinition {
                graphics: Some(graphics),
                ..base()
            },
        ));
    }
    for &sound in SoundDevice::ALL {
        cases.push(on_default(
            format!("sound={sound}"),
            MachineDefinition {
                sound: Some(sound),
                ..base()
            },
        ));
    }
    for &layout in KeyboardLayout::ALL {
        cases.push(on_default(
            format!("keyboardLayout={layout}"),
            MachineDefinition {
                keyboard_layout: Some(layout),
                ..base()
            },
        ));
    }
    for flag in [false, true] {
        cases.push(on_default(
            format!("serialConsole={flag} guestAgent={flag}"),
            MachineDefinition {
                serial_console: Some(flag),
                guest_agent: Some(flag),
                ..base()
            },
        ));
    }
    cases
}

#[test]
fn qemu_accepts_every_emitted_device_combination() {
    require("qemu-system-x86_64", "qemu-system-x86");
    require("qemu-img", "qemu-utils");
    let reps = representatives();
    let cases = cases(&reps);
    let scratch = tempfile::Builder::new()
        .prefix("qw-argv")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let failures = Mutex::new(Vec::new());
    let next = Mutex::new(0usize);

    // Two QEMUs at a time: these machines have two cores.
    std::thread::scope(|scope| {
        for worker in 0..2 {
            let (cases, reps, failures, next, scratch) =
                (&cases, &reps, &failures, &next, scratch.path());
            scope.spawn(move || {
                loop {
                    let index = {
                        let mut n = next.lock().expect("lock");
                        *n += 1;
                        *n - 1
                    };
                    let Some(case) = cases.get(index) else { break };
                    let rep = &reps[case.rep_index];
                    let dir = scratch.join(format!("w{worker}-{index}"));
                    std::fs::create_dir_all(&dir).expect("case dir");
                    let files = make_files(&dir, rep);
                    let machine = resolve(&case.machine);
                    if machine.firmware == Firmware::Uefi {
                        give_uefi_vars(&dir);
                    }
                    let argv = argv_for(rep, &machine, &dir, &files);
                    // Tap devices need a prepared netdev; QEMU's acceptance of the rest of
                    // the argv is what this test is about, so swap in user networking.
                    let argv = without_tap(argv);
                    let argv = if rep.accelerator == Accelerator::Kvm {
                        tcg_instead_of_kvm(argv)
                    } else {
                        argv
                    };
                    match qemu_status(&argv, &dir) {
                        Ok(status) if status == "prelaunch" => {}
                        Ok(status) => failures.lock().expect("lock").push(format!(
                            "{}: status {status}, expected prelaunch",
                            case.label
                        )),
                        Err(e) => failures
                            .lock()
                            .expect("lock")
                            .push(format!("{}: {e}", case.label)),
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                }
            });
        }
    });
    let failures = failures.into_inner().expect("lock");
    assert!(
        failures.is_empty(),
        "QEMU rejected {} of {} argv variants:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The run dir's copy of OVMF's variable store, as `prepare_launch` makes it.
fn give_uefi_vars(dir: &Path) {
    let template = FirmwareConfig::default().ovmf_vars;
    require_file(&template, "ovmf");
    std::fs::create_dir_all(dir.join("run")).expect("run dir");
    std::fs::copy(&template, dir.join("run/uefi-vars.fd")).expect("copy OVMF's variables");
}

fn without_tap(argv: Vec<String>) -> Vec<String> {
    argv.into_iter()
        .map(|arg| {
            if arg.starts_with("tap,id=net0") {
                "user,id=net0,restrict=on".to_owned()
            } else {
                arg
            }
        })
        .collect()
}

/// KVM guests hang on these machines; the device model is the same under TCG, except
/// that `host` is a KVM-only CPU model.
fn tcg_instead_of_kvm(argv: Vec<String>) -> Vec<String> {
    argv.into_iter()
        .map(|arg| match arg.as_str() {
            "kvm" => "tcg".to_owned(),
            "host" => "max".to_owned(),
            _ => arg,
        })
        .collect()
}
