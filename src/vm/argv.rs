use std::path::Path;

use super::run_dir::RunDir;
use crate::image::{BootDisk, DiskFormat, KernelFiles};
use crate::job::{
    Chipset, CpuModel, DEFAULT_KERNEL_CMDLINE, Firmware, GraphicsDevice, KeyboardDevice, Machine,
    MouseDevice, NetworkDevice, SoundDevice, StorageDevice, TabletDevice, UsbController,
};

/// The guest's view of the user-mode network: a link-local /24 that contains the
/// metadata address, so that slirp accepts the guestfwd rule for 169.254.169.254:80.
const USER_NET: &str =
    "net=169.254.169.0/24,host=169.254.169.2,dns=169.254.169.3,dhcpstart=169.254.169.15";
pub(crate) const METADATA_ENDPOINT: &str = "tcp:169.254.169.254:80";
/// The virtio-serial port name of the guest tools' bulk channel.
pub use qemu_worker_protocol::agent::PORT_NAME as AGENT_PORT_NAME;
/// The virtio-serial port name qemu-ga looks for.
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// The accelerator chosen for one VM (after the `auto` probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    /// QEMU's name for it (`-accel`), also what logs and reports say.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// How the VM's NIC is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkAttachment {
    /// QEMU user-mode networking, restricted: the guest reaches nothing but
    /// 169.254.169.254:80, which runs `guestfwd_command` per connection (its stdio is the
    /// connection).
    User { guestfwd_command: Vec<String> },
    /// A tap device prepared by the worker in the VM's network namespace (`netns`),
    /// where QEMU runs.
    Tap { ifname: String, netns: String },
}

/// Everything the QEMU command line is built from.
#[derive(Debug, Clone)]
pub struct VmSpec<'a> {
    /// A short name for process listings, e.g. `qw-<job>-<run>`.
    pub name: &'a str,
    pub machine: &'a Machine,
    pub run_dir: &'a RunDir,
    pub disk: &'a BootDisk,
    pub kernel: Option<&'a KernelFiles>,
    /// OVMF's code (worker.yml `firmware.ovmfCode`), used when the machine is `uefi`; its
    /// variable store is the run dir's.
    pub ovmf_code: &'a Path,
    pub network: &'a NetworkAttachment,
    pub accelerator: Accelerator,
    /// A boot snapshot's saved state to load (`-incoming`) instead of booting; the
    /// worker's console capture then appends to the snapshot's console.
    pub resume: Option<&'a str>,
}

/// The QEMU command line (without the program name) for a VM: modern syntax only
/// (`-blockdev`, `-device`, `server=on,wait=off`), every socket in the run dir, started
/// paused (`-S`) so the host side can be made ready before `cont`.
pub fn qemu_argv(spec: &VmSpec<'_>) -> Vec<String> {
    let mut argv = Args::default();
    let m = spec.machine;

    argv.push(
        "-name",
        format!("guest={},debug-threads=on", escape(spec.name)),
    );
    argv.flag("-S");
    argv.flag("-nodefaults");
    argv.flag("-no-user-config");
    // spawn and elevateprivileges stay allowed: user-mode networking forks the guestfwd
    // helper per connection, and slirp's fork_exec calls setsid() in the child (with
    // elevateprivileges=deny the helper dies and the guest never gets an answer).
    argv.push("-sandbox", "on,obsolete=deny,resourcecontrol=deny");
    argv.push("-msg", "timestamp=on");
    let mut machine = machine_type(m.chipset).to_owned();
    if m.firmware == Firmware::Uefi {
        firmware_args(&mut argv, spec.ovmf_code, spec.run_dir);
        machine.push_str(",pflash0=firmware-code,pflash1=firmware-vars");
    }
    argv.push("-machine", machine);
    argv.push("-accel", spec.accelerator.as_str());
    argv.push("-cpu", cpu_model(m.cpu, spec.accelerator));
    let t = m.topology;
    argv.push(
        "-smp",
        format!(
            "cpus={},sockets={},cores={},threads={}",
            t.vcpus(),
            t.sockets,
            t.cores,
            t.threads
        ),
    );
    argv.push("-m", format!("{}M", m.memory));
    argv.push("-uuid", m.uuid.clone());
    if m.cloud_init {
        // What ds-identify reads from DMI: an unchanged cloud-init finds its datasource
        // with no kernel argument and no seed disk.
        argv.push(
            "-smbios",
            format!(
                "type=1,serial={}",
                escape(&crate::cloud_init::smbios_serial())
            ),
        );
    }

    if let Some(kernel) = spec.kernel {
        argv.push("-kernel", kernel.kernel.clone());
        if let Some(initrd) = &kernel.initrd {
            argv.push("-initrd", initrd.clone());
        }
        let cmdline = m
            .kernel
            .as_ref()
            .map_or(DEFAULT_KERNEL_CMDLINE, |k| k.cmdline.as_str());
        argv.push("-append", cmdline);
    }

    disk_args(&mut argv, spec.disk, m);
    network_args(&mut argv, spec.network, m);
    control_args(&mut argv, spec.run_dir, m);
    display_args(&mut argv, spec.run_dir, m);
    usb_args(&mut argv, m);
    sound_args(&mut argv, m);
    if let Some(vmstate) = spec.resume {
        argv.push("-incoming", format!("exec:cat {}", shell_quote(vmstate)));
    }
    argv.0
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn flag(&mut self, flag: &str) {
        self.0.push(flag.to_owned());
    }

    fn push(&mut self, flag: &str, value: impl Into<String>) {
        self.0.push(flag.to_owned());
        self.0.push(value.into());
    }
}

/// QEMU's option syntax splits on `,`; a literal comma is written twice.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn machine_type(chipset: Chipset) -> &'static str {
    match chipset {
        Chipset::Pc => "pc",
        Chipset::Q35 => "q35",
        // PCIe on microvm lets the same PCI devices serve every chipset.
        Chipset::Microvm => "microvm,pcie=on",
        Chipset::PcI440fx28 => "pc-i440fx-2.8",
    }
}

/// OVMF as the machine's two flash devices (`pflash0`, `pflash1` name the nodes): its
/// code read-only, the VM's own variable store writable, both raw (never probed). BIOS
/// needs nothing: SeaBIOS is QEMU's default.
fn firmware_args(argv: &mut Args, code: &Path, run_dir: &RunDir) {
    let vars = run_dir.uefi_vars();
    for (name, path, read_only) in [
        ("firmware-code", code.display().to_string(), true),
        ("firmware-vars", vars, false),
    ] {
        let file = serde_json::json!({
            "driver": "file",
            "filename": path,
            "node-name": format!("{name}-file"),
            "read-only": read_only,
        });
        let format = serde_json::json!({
            "driver": "raw",
            "file": format!("{name}-file"),
            "node-name": name,
            "read-only": read_only,
        });
        argv.push("-blockdev", file.to_string());
        argv.push("-blockdev", format.to_string());
    }
}

fn cpu_model(cpu: CpuModel, accelerator: Accelerator) -> &'static str {
    match (cpu, accelerator) {
        // `host` is KVM-only in QEMU; under TCG the closest is everything TCG can do.
        (CpuModel::Host, Accelerator::Tcg) => "max",
        (cpu, _) => cpu.as_str(),
    }
}

fn disk_args(argv: &mut Args, disk: &BootDisk, m: &Machine) {
    let top = disk.layers.len().saturating_sub(1);
    for (index, layer) in disk.layers.iter().enumerate() {
        let read_only = index != top;
        let file = serde_json::json!({
            "driver": "file",
            "filename": layer.path,
            "node-name": format!("layer{index}-file"),
            "read-only": read_only,
        });
        let mut format = serde_json::json!({
            "driver": layer.format.as_str(),
            "file": format!("layer{index}-file"),
            "node-name": format!("layer{index}"),
            "read-only": read_only,
        });
        if layer.format == DiskFormat::Qcow2 {
            format["backing"] = match index {
                0 => serde_json::Value::Null,
                _ => format!("layer{}", index - 1).into(),
            };
        }
        argv.push("-blockdev", file.to_string());
        argv.push("-blockdev", format.to_string());
    }
    let drive = format!("layer{top}");
    let serial = &m.disk_serial;
    match m.storage {
        StorageDevice::VirtioBlk => {
            argv.push(
                "-device",
                format!("virtio-blk-pci,drive={drive},serial={serial},bootindex=1"),
            );
        }
        StorageDevice::VirtioScsi => {
            argv.push("-device", "virtio-scsi-pci,id=scsi0");
            argv.push(
                "-device",
                format!("scsi-hd,bus=scsi0.0,drive={drive},serial={serial},bootindex=1"),
            );
        }
        StorageDevice::Nvme => {
            argv.push(
                "-device",
                format!("nvme,drive={drive},serial={serial},bootindex=1"),
            );
        }
        StorageDevice::IdeHd => {
            argv.push(
                "-device",
                format!("ide-hd,bus=ide.0,drive={drive},serial={serial},bootindex=1"),
            );
        }
    }
}

fn network_args(argv: &mut Args, network: &NetworkAttachment, m: &Machine) {
    match network {
        NetworkAttachment::User { guestfwd_command } => {
            let command: Vec<String> = guestfwd_command.iter().map(|a| shell_quote(a)).collect();
            argv.push(
                "-netdev",
                format!(
                    "user,id=net0,ipv6=off,restrict=on,{USER_NET},guestfwd={METADATA_ENDPOINT}-cmd:{}",
                    escape(&command.join(" "))
                ),
            );
        }
        NetworkAttachment::Tap { ifname, .. } => {
            argv.push(
                "-netdev",
                format!(
                    "tap,id=net0,ifname={},script=no,downscript=no",
                    escape(ifname)
                ),
            );
        }
    }
    let model = match m.network {
        NetworkDevice::VirtioNet => "virtio-net-pci",
        NetworkDevice::E1000 => "e1000",
        NetworkDevice::E1000e => "e1000e",
        NetworkDevice::Rtl8139 => "rtl8139",
    };
    // No option ROM: the guest never network-boots, and iPXE costs boot time.
    argv.push(
        "-device",
        format!("{model},netdev=net0,mac={},romfile=", m.mac),
    );
}

/// The guestfwd command is run by a shell; each argument is single-quoted.
pub(super) fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:@%+".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn unix_server(id: &str, path: &str) -> String {
    format!("socket,id={id},path={},server=on,wait=off", escape(path))
}

fn control_args(argv: &mut Args, run_dir: &RunDir, m: &Machine) {
    argv.push("-chardev", unix_server("qmp0", &run_dir.qmp_socket()));
    argv.push("-mon", "chardev=qmp0,mode=control");
    if m.serial_console {
        // A socket the worker reads and caps, never a file QEMU fills without bound.
        argv.push("-chardev", unix_server("serial0", &run_dir.serial_socket()));
        argv.push("-serial", "chardev:serial0");
    }
    argv.push("-device", "virtio-serial-pci,id=vser0");
    argv.push("-chardev", unix_server("agent0", &run_dir.agent_socket()));
    argv.push(
        "-device",
        format!("virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}"),
    );
    if m.guest_agent {
        argv.push("-chardev", unix_server("qga0", &run_dir.qga_socket()));
        argv.push(
            "-device",
            format!("virtserialport,bus=vser0.0,chardev=qga0,name={QGA_PORT_NAME}"),
        );
    }
}

fn display_args(argv: &mut Args, run_dir: &RunDir, m: &Machine) {
    argv.push("-display", "none");
    let device = match m.graphics {
        GraphicsDevice::None => return,
        GraphicsDevice::Vga => format!("VGA,vgamem_mb={}", m.vga_memory),
        GraphicsDevice::VmwareSvga => format!("vmware-svga,vgamem_mb={}", m.vga_memory),
        GraphicsDevice::QxlVga => format!(
            "qxl-vga,vgamem_mb={},ram_size_mb={},vram_size_mb={}",
            m.vga_memory, m.graphics_ram, m.graphics_vram
        ),
        GraphicsDevice::VirtioVga => "virtio-vga".to_owned(),
        GraphicsDevice::BochsDisplay => format!("bochs-display,vgamem={}M", m.vga_memory),
    };
    argv.push("-device", device);
    // VNC only on a unix socket in the run dir: never reachable over the network.
    argv.push("-vnc", format!("unix:{}", escape(&run_dir.vnc_socket())));
    argv.push("-k", m.keyboard_layout.as_str());
}

fn usb_args(argv: &mut Args, m: &Machine) {
    let controller = match m.usb {
        UsbController::None => return,
        UsbController::Piix3Uhci => "piix3-usb-uhci",
        UsbController::Piix4Uhci => "piix4-usb-uhci",
        UsbController::Ehci => "usb-ehci",
        UsbController::NecXhci => "nec-usb-xhci",
        UsbController::QemuXhci => "qemu-xhci",
    };
    argv.push("-device", format!("{controller},id=usb0"));
    let devices = [
        (m.keyboard == KeyboardDevice::UsbKbd).then_some("usb-kbd"),
        (m.mouse == MouseDevice::UsbMouse).then_some("usb-mouse"),
        (m.tablet == TabletDevice::UsbTablet).then_some("usb-tablet"),
    ];
    for device in devices.into_iter().flatten() {
        argv.push("-device", format!("{device},bus=usb0.0"));
    }
}

fn sound_args(argv: &mut Args, m: &Machine) {
    let (controller, codec) = match m.sound {
        SoundDevice::None => return,
        SoundDevice::Ac97 => ("AC97", None),
        SoundDevice::Es1370 => ("ES1370", None),
        SoundDevice::HdaDuplexIntel => ("intel-hda", Some("hda-duplex")),
        SoundDevice::HdaMicroIntel => ("intel-hda", Some("hda-micro")),
        SoundDevice::HdaOutputIntel => ("intel-hda", Some("hda-output")),
        SoundDevice::HdaDuplexIch9 => ("ich9-intel-hda", Some("hda-duplex")),
        SoundDevice::HdaMicroIch9 => ("ich9-intel-hda", Some("hda-micro")),
        SoundDevice::HdaOutputIch9 => ("ich9-intel-hda", Some("hda-output")),
    };
    // Guests may play sound; the host never does.
    argv.push("-audiodev", "none,id=audio0");
    match codec {
        None => argv.push("-device", format!("{controller},audiodev=audio0")),
        Some(codec) => {
            argv.push("-device", format!("{controller},id=sound0"));
            argv.push("-device", format!("{codec},bus=sound0.0,audiodev=audio0"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_are_doubled() {
        assert_eq!(escape("/a,b/c"), "/a,,b/c");
    }

    #[test]
    fn shell_quoting_keeps_arguments_whole() {
        assert_eq!(shell_quote("/usr/bin/qemu-worker"), "/usr/bin/qemu-worker");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn host_cpu_becomes_max_under_tcg_only() {
        assert_eq!(cpu_model(CpuModel::Host, Accelerator::Tcg), "max");
        assert_eq!(cpu_model(CpuModel::Host, Accelerator::Kvm), "host");
        assert_eq!(cpu_model(CpuModel::Qemu64, Accelerator::Tcg), "qemu64");
    }
}
