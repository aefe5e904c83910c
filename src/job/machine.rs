//! The machine definition a machine.json, worker.yml `machine` or a payload gives: its
//! devices and every field optional, layered over each other by `resolve`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::string_enum::string_enum;

/// The kernel command line used for direct kernel boot when the machine gives none:
/// measured on these machines as the fastest that still boots reliably under TCG.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0 quiet cryptomgr.notests no_timer_check";

pub(crate) const UUID_PATTERN: &str =
    "^[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$";
/// A locally administered unicast MAC (second hex digit 2, 6, a or e), as taskcluster-worker.
pub(crate) const MAC_PATTERN: &str = "^[0-9a-f][26ae](:[0-9a-f]{2}){5}$";
pub(crate) const DISK_SERIAL_PATTERN: &str = "^[A-Za-z0-9-]{1,20}$";

string_enum! {
    /// The QEMU machine type. `pc` (i440fx) and `q35` boot from disk or kernel;
    /// `microvm` boots only a kernel directly. `pc-i440fx-2.8` is kept for
    /// taskcluster-worker images.
    pub enum Chipset {
        Pc = "pc",
        Q35 = "q35",
        Microvm = "microvm",
        PcI440fx28 = "pc-i440fx-2.8",
    }
}

string_enum! {
    /// The firmware the VM starts: `bios` is SeaBIOS (QEMU's own); `uefi` is OVMF from
    /// the host (worker.yml `firmware`) with a variable store of the VM's own. UEFI needs
    /// a flash device, which `pc` and `q35` have and `microvm` does not.
    pub enum Firmware {
        Bios = "bios",
        Uefi = "uefi",
    }
}

string_enum! {
    /// The CPU model shown to the guest. `host` passes the host CPU through under KVM and
    /// means `max` (every feature the emulator has) under TCG.
    pub enum CpuModel {
        Host = "host",
        Max = "max",
        Qemu64 = "qemu64",
        Kvm64 = "kvm64",
        Nehalem = "Nehalem",
        Westmere = "Westmere",
        SandyBridge = "SandyBridge",
        IvyBridge = "IvyBridge",
        Haswell = "Haswell",
        Broadwell = "Broadwell",
        SkylakeClient = "Skylake-Client",
        SkylakeServer = "Skylake-Server",
        CascadelakeServer = "Cascadelake-Server",
        IcelakeServer = "Icelake-Server",
        Epyc = "EPYC",
        EpycRome = "EPYC-Rome",
    }
}

string_enum! {
    /// The USB host controller; `none` leaves the machine without USB.
    pub enum UsbController {
        None = "none",
        Piix3Uhci = "piix3-usb-uhci",
        Piix4Uhci = "piix4-usb-uhci",
        Ehci = "usb-ehci",
        NecXhci = "nec-usb-xhci",
        QemuXhci = "qemu-xhci",
    }
}

string_enum! {
    /// The network interface card that connects the guest to its isolated network.
    pub enum NetworkDevice {
        VirtioNet = "virtio-net-pci",
        E1000 = "e1000",
        E1000e = "e1000e",
        Rtl8139 = "rtl8139",
    }
}

string_enum! {
    /// The device the boot disk is attached through.
    pub enum StorageDevice {
        VirtioBlk = "virtio-blk-pci",
        VirtioScsi = "virtio-scsi-pci",
        Nvme = "nvme",
        IdeHd = "ide-hd",
    }
}

string_enum! {
    /// The display adapter; `none` gives a headless machine (no screenshots).
    pub enum GraphicsDevice {
        None = "none",
        Vga = "VGA",
        VmwareSvga = "vmware-svga",
        QxlVga = "qxl-vga",
        VirtioVga = "virtio-vga",
        BochsDisplay = "bochs-display",
    }
}

string_enum! {
    /// The sound device; `DEVICE/CONTROLLER` attaches an HDA codec to that controller.
    pub enum SoundDevice {
        None = "none",
        Ac97 = "AC97",
        Es1370 = "ES1370",
        HdaDuplexIntel = "hda-duplex/intel-hda",
        HdaMicroIntel = "hda-micro/intel-hda",
        HdaOutputIntel = "hda-output/intel-hda",
        HdaDuplexIch9 = "hda-duplex/ich9-intel-hda",
        HdaMicroIch9 = "hda-micro/ich9-intel-hda",
        HdaOutputIch9 = "hda-output/ich9-intel-hda",
    }
}

string_enum! {
    /// The keyboard; `PS/2` is the chipset's built-in controller (none on microvm).
    pub enum KeyboardDevice {
        UsbKbd = "usb-kbd",
        Ps2 = "PS/2",
    }
}

string_enum! {
    /// The mouse; `PS/2` is the chipset's built-in controller (none on microvm).
    pub enum MouseDevice {
        UsbMouse = "usb-mouse",
        Ps2 = "PS/2",
    }
}

string_enum! {
    /// An absolute pointing device, which keeps VNC pointers in sync.
    pub enum TabletDevice {
        UsbTablet = "usb-tablet",
        None = "none",
    }
}

string_enum! {
    /// The keyboard layout of the VNC display (the keymaps QEMU 7.2 ships; taskcluster's
    /// `nl-be` is not one of them).
    pub enum KeyboardLayout {
        Ar = "ar", Bepo = "bepo", Cz = "cz", Da = "da", De = "de", DeCh = "de-ch", EnGb = "en-gb", EnUs = "en-us",
        Es = "es", Et = "et", Fi = "fi", Fo = "fo", Fr = "fr", FrBe = "fr-be", FrCa = "fr-ca",
        FrCh = "fr-ch", Hr = "hr", Hu = "hu", Is = "is", It = "it", Ja = "ja", Lt = "lt",
        Lv = "lv", Mk = "mk", Nl = "nl", No = "no", Pl = "pl", Pt = "pt",
        PtBr = "pt-br", Ru = "ru", Sl = "sl", Sv = "sv", Th = "th", Tr = "tr",
    }
}

string_enum! {
    /// Whether the VM is offered a cloud-init datasource (docs/metadata.md): its
    /// metadata service's NoCloud and EC2 paths, found through the SMBIOS serial
    /// `ds=nocloud;s=http://169.254.169.254/nocloud/;dsmode=net`. `auto` is `on` for an image that
    /// boots from its disk (as stock cloud images do) and `off` for direct kernel boot
    /// (images made for the worker, which start their own guest tools).
    pub enum CloudInit {
        Auto = "auto",
        On = "on",
        Off = "off",
    }
}

string_enum! {
    /// Direct kernel boot: the image member that holds the kernel (always `kernel`).
    pub enum KernelMember {
        Kernel = "kernel",
    }
}

string_enum! {
    /// Direct kernel boot: the image member that holds the initrd (always `initrd`).
    pub enum InitrdMember {
        Initrd = "initrd",
    }
}

/// A machine definition: the hardware of a VM, as in an image's `machine.json`, the
/// payload's `machine` override and worker.yml's `machine` defaults.
///
/// Compatible with taskcluster-worker's version 1 `machine.json`; every field is optional
/// here because definitions are layered (payload > image > worker.yml > built-in).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "Machine definition")]
pub struct MachineDefinition {
    /// Format version; an image's machine.json without it is read as version 0 and migrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1))]
    pub version: Option<u8>,
    /// SMBIOS system UUID; derived from the job and run ids when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(UUID_PATTERN))]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chipset: Option<Chipset>,
    /// `bios` (the default) or `uefi` (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuModel>,
    /// Extra CPU flags: accepted for taskcluster-worker compatibility, must be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 0))]
    pub flags: Option<Vec<String>>,
    /// Threads per core; chosen from worker.yml `limits` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub threads: Option<u32>,
    /// Cores per socket; chosen from worker.yml `limits` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub cores: Option<u32>,
    /// Sockets; chosen from worker.yml `limits` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub sockets: Option<u32>,
    /// Memory in MiB; worker.yml `limits.maxMemory` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1_048_576))]
    pub memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb: Option<UsbController>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkDevice>,
    /// A locally administered unicast MAC; derived (52:54:00:…) when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(MAC_PATTERN))]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageDevice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<GraphicsDevice>,
    /// VGA memory in MiB (`vgamem_mb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub vga_memory: Option<u32>,
    /// qxl-vga RAM in MiB (ignored by other adapters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub graphics_ram: Option<u32>,
    /// qxl-vga video RAM in MiB (ignored by other adapters).
    #[serde(
        default,
        rename = "graphicsVRam",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1024))]
    pub graphics_vram: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<SoundDevice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard: Option<KeyboardDevice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_layout: Option<KeyboardLayout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mouse: Option<MouseDevice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablet: Option<TabletDevice>,
    /// Direct kernel boot from the image member `kernel` (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelMember>,
    /// Initrd for direct kernel boot, from the image member `initrd` (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<InitrdMember>,
    /// Kernel command line for direct kernel boot (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub cmdline: Option<String>,
    /// Capture the first serial port to the job's console log (extension; default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_console: Option<bool>,
    /// Attach the qemu-ga channel `org.qemu.guest_agent.0` (extension; default on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<bool>,
    /// Boot disk serial number; derived from the job and run ids when not given (extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DISK_SERIAL_PATTERN))]
    pub disk_serial: Option<String>,
    /// Offer the guest a cloud-init datasource (extension; default `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

macro_rules! layer_fields {
    ($upper:expr, $lower:expr, [$($field:ident),+ $(,)?]) => {
        MachineDefinition { $($field: $upper.$field.clone().or_else(|| $lower.$field.clone())),+ }
    };
}

impl MachineDefinition {
    /// The built-in defaults, the last layer under worker.yml's `machine`: the cheapest
    /// devices to emulate under TCG, a VGA display for screenshots, serial and agent on.
    pub fn builtin() -> Self {
        Self {
            chipset: Some(Chipset::Pc),
            firmware: Some(Firmware::Bios),
            cpu: Some(CpuModel::Host),
            usb: Some(UsbController::None),
            network: Some(NetworkDevice::VirtioNet),
            storage: Some(StorageDevice::VirtioBlk),
            graphics: Some(GraphicsDevice::Vga),
            vga_memory: Some(16),
            graphics_ram: Some(64),
            graphics_vram: Some(32),
            sound: Some(SoundDevice::None),
            keyboard: Some(KeyboardDevice::Ps2),
            keyboard_layout: Some(KeyboardLayout::EnUs),
            mouse: Some(MouseDevice::Ps2),
            tablet: Some(TabletDevice::None),
            serial_console: Some(true),
            guest_agent: Some(true),
            cloud_init: Some(CloudInit::Auto),
            ..Self::default()
        }
    }

    /// Each field of `self`, or of `lower` where `self` leaves it unset.
    #[must_use]
    pub fn over(&self, lower: &Self) -> Self {
        layer_fields!(
            self,
            lower,
            [
                version,
                uuid,
                chipset,
                firmware,
                cpu,
                flags,
                threads,
                cores,
                sockets,
                memory,
                usb,
                network,
                mac,
                storage,
                graphics,
                vga_memory,
                graphics_ram,
                graphics_vram,
                sound,
                keyboard,
                keyboard_layout,
                mouse,
                tablet,
                kernel,
                initrd,
                cmdline,
                serial_console,
                guest_agent,
                disk_serial,
                cloud_init,
            ]
        )
    }
}
