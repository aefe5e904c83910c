use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::identity::Identity;
use super::limits::{CpuTopology, LimitViolation, MachineLimits, RequestedResources};
use super::string_enum::string_enum;
use crate::schema::Issue;

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
            ]
        )
    }
}

/// Where a machine field came from, named in error messages so that a job author knows
/// which document to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Payload,
    Image,
    WorkerConfig,
    Builtin,
}

impl Origin {
    fn describe(self) -> &'static str {
        match self {
            Self::Payload => "set by the payload",
            Self::Image => "set by the image's machine.json",
            Self::WorkerConfig => "set by worker.yml `machine`",
            Self::Builtin => "the built-in default",
        }
    }
}

/// The machine definitions that apply to one job, highest precedence first.
#[derive(Debug, Clone, Default)]
pub struct MachineLayers {
    pub payload: MachineDefinition,
    pub image: MachineDefinition,
    pub worker_config: MachineDefinition,
}

impl MachineLayers {
    fn layers(&self) -> [(Origin, &MachineDefinition); 3] {
        [
            (Origin::Payload, &self.payload),
            (Origin::Image, &self.image),
            (Origin::WorkerConfig, &self.worker_config),
        ]
    }

    /// The layer that set a field, found with `has` (the built-in default otherwise).
    fn origin(&self, has: impl Fn(&MachineDefinition) -> bool) -> Origin {
        self.layers()
            .into_iter()
            .find(|(_, layer)| has(layer))
            .map_or(Origin::Builtin, |(origin, _)| origin)
    }

    /// Merges the layers over the built-in default, applies the limits and checks that the
    /// devices fit together. Every problem is returned, each with the payload path a job
    /// author would use to fix it (`/machine/...`).
    pub fn resolve(
        &self,
        limits: &MachineLimits,
        identity: &Identity,
    ) -> Result<Machine, Vec<Issue>> {
        let merged = self.payload.over(
            &self
                .image
                .over(&self.worker_config.over(&MachineDefinition::builtin())),
        );
        let mut issues = Vec::new();

        let requested = RequestedResources {
            memory: merged.memory,
            threads: merged.threads,
            cores: merged.cores,
            sockets: merged.sockets,
        };
        let resources = match limits.apply(requested) {
            Ok(resources) => Some(resources),
            Err(violations) => {
                for violation in violations {
                    issues.push(self.limit_issue(&violation));
                }
                None
            }
        };

        self.check_devices(&merged, &mut issues);

        let (Some((memory, topology)), true) = (resources, issues.is_empty()) else {
            return Err(issues);
        };
        Ok(Machine::from_merged(merged, memory, topology, identity))
    }

    fn limit_issue(&self, violation: &LimitViolation) -> Issue {
        match violation {
            LimitViolation::Memory { .. } => {
                let origin = self.origin(|m| m.memory.is_some());
                Issue::new(
                    "/machine/memory",
                    format!("{violation} ({})", origin.describe()),
                )
            }
            LimitViolation::Cpus { .. } => {
                let origin = self
                    .origin(|m| m.threads.is_some() || m.cores.is_some() || m.sockets.is_some());
                Issue::new("/machine", format!("{violation} ({})", origin.describe()))
            }
        }
    }

    fn check_devices(&self, merged: &MachineDefinition, issues: &mut Vec<Issue>) {
        let usb = merged.usb.unwrap_or(UsbController::None);
        let chipset = merged.chipset.unwrap_or(Chipset::Pc);
        let mut conflict =
            |field: &str, message: String, has: &dyn Fn(&MachineDefinition) -> bool| {
                let origin = self.origin(has);
                issues.push(Issue::new(
                    format!("/machine/{field}"),
                    format!("{message} ({})", origin.describe()),
                ));
            };

        if usb == UsbController::None {
            if merged.keyboard == Some(KeyboardDevice::UsbKbd) {
                conflict(
                    "keyboard",
                    "usb-kbd needs a USB controller, but `usb` is none".into(),
                    &|m| m.keyboard.is_some(),
                );
            }
            if merged.mouse == Some(MouseDevice::UsbMouse) {
                conflict(
                    "mouse",
                    "usb-mouse needs a USB controller, but `usb` is none".into(),
                    &|m| m.mouse.is_some(),
                );
            }
            if merged.tablet == Some(TabletDevice::UsbTablet) {
                conflict(
                    "tablet",
                    "usb-tablet needs a USB controller, but `usb` is none".into(),
                    &|m| m.tablet.is_some(),
                );
            }
        }
        if chipset == Chipset::Microvm {
            if merged.kernel.is_none() {
                conflict(
                    "chipset",
                    "microvm cannot boot from a disk; it needs direct kernel boot (`kernel`)"
                        .into(),
                    &|m| m.chipset.is_some(),
                );
            }
            if merged.storage == Some(StorageDevice::IdeHd) {
                conflict(
                    "storage",
                    "ide-hd needs an IDE controller, which microvm does not have".into(),
                    &|m| m.storage.is_some(),
                );
            }
        }
        if merged.kernel.is_none() {
            if merged.initrd.is_some() {
                conflict(
                    "initrd",
                    "an initrd needs direct kernel boot (`kernel`)".into(),
                    &|m| m.initrd.is_some(),
                );
            }
            if merged.cmdline.is_some() {
                conflict(
                    "cmdline",
                    "a kernel command line needs direct kernel boot (`kernel`)".into(),
                    &|m| m.cmdline.is_some(),
                );
            }
        }
    }
}

/// Direct kernel boot settings of a resolved machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KernelBoot {
    /// Whether the image's `initrd` member is loaded too.
    pub initrd: bool,
    pub cmdline: String,
}

/// A fully resolved machine: every field decided, limits applied, identities derived.
/// This is what the QEMU command line is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub uuid: String,
    pub chipset: Chipset,
    pub cpu: CpuModel,
    pub topology: CpuTopology,
    /// Memory in MiB.
    pub memory: u64,
    pub usb: UsbController,
    pub network: NetworkDevice,
    pub mac: String,
    pub storage: StorageDevice,
    pub disk_serial: String,
    pub graphics: GraphicsDevice,
    pub vga_memory: u32,
    pub graphics_ram: u32,
    #[serde(rename = "graphicsVRam")]
    pub graphics_vram: u32,
    pub sound: SoundDevice,
    pub keyboard: KeyboardDevice,
    pub keyboard_layout: KeyboardLayout,
    pub mouse: MouseDevice,
    pub tablet: TabletDevice,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBoot>,
    pub serial_console: bool,
    pub guest_agent: bool,
}

impl Machine {
    /// `merged` has been layered over the built-in default, so every device field is set;
    /// the fallbacks below only repeat those defaults.
    fn from_merged(
        merged: MachineDefinition,
        memory: u64,
        topology: CpuTopology,
        identity: &Identity,
    ) -> Self {
        Self {
            uuid: merged.uuid.unwrap_or_else(|| identity.uuid.clone()),
            chipset: merged.chipset.unwrap_or(Chipset::Pc),
            cpu: merged.cpu.unwrap_or(CpuModel::Host),
            topology,
            memory,
            usb: merged.usb.unwrap_or(UsbController::None),
            network: merged.network.unwrap_or(NetworkDevice::VirtioNet),
            mac: merged.mac.unwrap_or_else(|| identity.mac.clone()),
            storage: merged.storage.unwrap_or(StorageDevice::VirtioBlk),
            disk_serial: merged
                .disk_serial
                .unwrap_or_else(|| identity.disk_serial.clone()),
            graphics: merged.graphics.unwrap_or(GraphicsDevice::Vga),
            vga_memory: merged.vga_memory.unwrap_or(16),
            graphics_ram: merged.graphics_ram.unwrap_or(64),
            graphics_vram: merged.graphics_vram.unwrap_or(32),
            sound: merged.sound.unwrap_or(SoundDevice::None),
            keyboard: merged.keyboard.unwrap_or(KeyboardDevice::Ps2),
            keyboard_layout: merged.keyboard_layout.unwrap_or(KeyboardLayout::EnUs),
            mouse: merged.mouse.unwrap_or(MouseDevice::Ps2),
            tablet: merged.tablet.unwrap_or(TabletDevice::None),
            kernel: merged.kernel.map(|_| KernelBoot {
                initrd: merged.initrd.is_some(),
                cmdline: merged
                    .cmdline
                    .unwrap_or_else(|| DEFAULT_KERNEL_CMDLINE.to_owned()),
            }),
            serial_console: merged.serial_console.unwrap_or(true),
            guest_agent: merged.guest_agent.unwrap_or(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> MachineLimits {
        MachineLimits {
            max_memory: 2048,
            max_cpus: 4,
            default_threads: 1,
        }
    }

    fn identity() -> Identity {
        Identity::derive("job-1", 0)
    }

    #[test]
    fn payload_wins_over_image_over_config_over_builtin() {
        let layers = MachineLayers {
            payload: MachineDefinition {
                memory: Some(512),
                ..Default::default()
            },
            image: MachineDefinition {
                memory: Some(1024),
                chipset: Some(Chipset::Q35),
                graphics: Some(GraphicsDevice::QxlVga),
                ..Default::default()
            },
            worker_config: MachineDefinition {
                chipset: Some(Chipset::Pc),
                cpu: Some(CpuModel::Qemu64),
                graphics: Some(GraphicsDevice::None),
                ..Default::default()
            },
        };
        let machine = layers.resolve(&limits(), &identity()).expect("valid");
        assert_eq!(machine.memory, 512);
        assert_eq!(machine.chipset, Chipset::Q35);
        assert_eq!(machine.graphics, GraphicsDevice::QxlVga);
        assert_eq!(machine.cpu, CpuModel::Qemu64);
        assert_eq!(machine.storage, StorageDevice::VirtioBlk);
        assert_eq!(machine.mac, identity().mac);
        assert_eq!(
            machine.topology,
            CpuTopology {
                threads: 1,
                cores: 4,
                sockets: 1
            }
        );
    }

    #[test]
    fn memory_over_the_limit_names_the_field_and_its_origin() {
        let layers = MachineLayers {
            image: MachineDefinition {
                memory: Some(4096),
                ..Default::default()
            },
            ..Default::default()
        };
        let issues = layers
            .resolve(&limits(), &identity())
            .expect_err("too large");
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].path, "/machine/memory");
        assert_eq!(
            issues[0].message,
            "machine memory 4096 MiB is larger than the allowed 2048 MiB \
             (set by the image's machine.json)"
        );
    }

    #[test]
    fn device_conflicts_are_all_reported() {
        let layers = MachineLayers {
            payload: MachineDefinition {
                chipset: Some(Chipset::Microvm),
                keyboard: Some(KeyboardDevice::UsbKbd),
                initrd: Some(InitrdMember::Initrd),
                threads: Some(8),
                ..Default::default()
            },
            ..Default::default()
        };
        let issues = layers
            .resolve(&limits(), &identity())
            .expect_err("conflicts");
        let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/machine",
                "/machine/keyboard",
                "/machine/chipset",
                "/machine/initrd"
            ]
        );
    }

    #[test]
    fn pinned_identities_are_kept() {
        let layers = MachineLayers {
            payload: MachineDefinition {
                mac: Some("aa:54:1a:30:5c:de".into()),
                uuid: Some("52bab607-10f1-4049-a0f8-ee4725cb715b".into()),
                disk_serial: Some("pinned-1".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let machine = layers.resolve(&limits(), &identity()).expect("valid");
        assert_eq!(machine.mac, "aa:54:1a:30:5c:de");
        assert_eq!(machine.uuid, "52bab607-10f1-4049-a0f8-ee4725cb715b");
        assert_eq!(machine.disk_serial, "pinned-1");
    }

    #[test]
    fn kernel_boot_gets_the_default_cmdline() {
        let layers = MachineLayers {
            image: MachineDefinition {
                kernel: Some(KernelMember::Kernel),
                ..Default::default()
            },
            ..Default::default()
        };
        let machine = layers.resolve(&limits(), &identity()).expect("valid");
        assert_eq!(
            machine.kernel,
            Some(KernelBoot {
                initrd: false,
                cmdline: DEFAULT_KERNEL_CMDLINE.into()
            })
        );
    }
}
