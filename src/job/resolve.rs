//! Resolving a job's machine: the payload over the image's machine.json over worker.yml
//! over the built-in default, checked against the worker's limits, with identities
//! derived.

use schemars::JsonSchema;
use serde::Serialize;

use super::identity::Identity;
use super::limits::{CpuTopology, LimitViolation, MachineLimits, RequestedResources};
use super::machine::{
    Chipset, CloudInit, CpuModel, DEFAULT_KERNEL_CMDLINE, Firmware, GraphicsDevice, KeyboardDevice,
    KeyboardLayout, MachineDefinition, MouseDevice, NetworkDevice, SoundDevice, StorageDevice,
    TabletDevice, UsbController,
};
use crate::schema::Issue;

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
            if merged.firmware == Some(Firmware::Uefi) {
                conflict(
                    "firmware",
                    "uefi needs a flash device for OVMF, which microvm does not have \
                     (use chipset q35 or pc)"
                        .into(),
                    &|m| m.firmware.is_some(),
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
    pub firmware: Firmware,
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
    /// The VM is offered the cloud-init datasource (`cloudInit` with `auto` decided).
    pub cloud_init: bool,
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
            firmware: merged.firmware.unwrap_or(Firmware::Bios),
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
            cloud_init: match merged.cloud_init.unwrap_or(CloudInit::Auto) {
                CloudInit::On => true,
                CloudInit::Off => false,
                // A disk boot is how stock cloud images start.
                CloudInit::Auto => merged.kernel.is_none(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::machine::{InitrdMember, KernelMember};

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
    fn firmware_is_bios_unless_a_layer_asks_for_uefi() {
        assert_eq!(
            MachineLayers::default()
                .resolve(&limits(), &identity())
                .expect("valid")
                .firmware,
            Firmware::Bios
        );
        let uefi = |firmware| MachineDefinition {
            firmware: Some(firmware),
            ..Default::default()
        };
        let layers = MachineLayers {
            worker_config: uefi(Firmware::Uefi),
            ..Default::default()
        };
        let machine = layers.resolve(&limits(), &identity()).expect("valid");
        assert_eq!(machine.firmware, Firmware::Uefi);
        // The image's choice wins over worker.yml's, the payload's over both.
        let layers = MachineLayers {
            image: uefi(Firmware::Bios),
            ..layers
        };
        let machine = layers.resolve(&limits(), &identity()).expect("valid");
        assert_eq!(machine.firmware, Firmware::Bios);
        let layers = MachineLayers {
            payload: uefi(Firmware::Uefi),
            ..layers
        };
        let machine = layers.resolve(&limits(), &identity()).expect("valid");
        assert_eq!(machine.firmware, Firmware::Uefi);
    }

    #[test]
    fn uefi_boots_a_kernel_directly_on_pc_and_q35_but_not_on_microvm() {
        for chipset in [Chipset::Pc, Chipset::Q35, Chipset::PcI440fx28] {
            let layers = MachineLayers {
                image: MachineDefinition {
                    chipset: Some(chipset),
                    firmware: Some(Firmware::Uefi),
                    kernel: Some(KernelMember::Kernel),
                    ..Default::default()
                },
                ..Default::default()
            };
            let machine = layers.resolve(&limits(), &identity()).expect("valid");
            assert_eq!(machine.firmware, Firmware::Uefi, "{chipset}");
        }
        let layers = MachineLayers {
            image: MachineDefinition {
                chipset: Some(Chipset::Microvm),
                kernel: Some(KernelMember::Kernel),
                ..Default::default()
            },
            payload: MachineDefinition {
                firmware: Some(Firmware::Uefi),
                ..Default::default()
            },
            ..Default::default()
        };
        let issues = layers
            .resolve(&limits(), &identity())
            .expect_err("no flash");
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "/machine/firmware");
        assert_eq!(
            issues[0].message,
            "uefi needs a flash device for OVMF, which microvm does not have \
             (use chipset q35 or pc) (set by the payload)"
        );
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
