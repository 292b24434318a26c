//! Topology configuration (TOML). Every error names the file, the key and what was expected.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default domain memory in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 16;
/// Default channel size in KiB.
pub const DEFAULT_CHANNEL_KIB: u64 = 1024;
/// Name of the image built into ddvm.
pub const BUILTIN_DRIVER_DOMAIN: &str = "builtin:driver-domain";

/// A whole topology.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Driver domains.
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainSection>,
    /// Client guests.
    #[serde(default, rename = "client")]
    pub clients: Vec<ClientSection>,
}

/// Default client memory in MiB.
pub const DEFAULT_CLIENT_MEMORY_MIB: u64 = 32;
/// Name of the workload client image built into ddvm.
pub const BUILTIN_WORKLOAD_CLIENT: &str = "builtin:workload-client";
/// Prefix of a client's `disk` that names a file served directly by the VMM (the baseline).
pub const FILE_DISK_PREFIX: &str = "file:";

/// One `[[client]]` table: a client guest with one virtio-blk disk.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// Unique name.
    pub name: String,
    /// The driver domain serving its disk, or `file:PATH` to serve a file directly from the
    /// VMM (the baseline without isolation). Empty (unset): no disk, only a NIC.
    #[serde(default)]
    pub disk: String,
    /// Where its range starts on the disk, in MiB.
    #[serde(default)]
    pub offset_mib: u64,
    /// Size of its range in MiB (required with a disk).
    #[serde(default)]
    pub size_mib: u64,
    /// RAM in MiB.
    #[serde(default = "default_client_memory")]
    pub memory_mib: u64,
    /// The workload client's command line (`workload=randrw qd=32 count=10000 ...`), given as
    /// that string or as a table (`[client.workload]`, `kind = "randrw"`, `qd = 32`, ...: see
    /// [`workload_text`]); checked at load for the built-in workload client.
    #[serde(default, deserialize_with = "workload_text")]
    pub workload: String,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Image path or `builtin:workload-client`.
    #[serde(default = "default_client_image")]
    pub image: String,
    /// A stock Linux kernel (bzImage, relative to the config file) to boot instead of
    /// `image`. It finds its disk through ACPI; VMX/SVM hosts only (the TCG rig here).
    #[serde(default)]
    pub kernel: Option<String>,
    /// The Linux client's initramfs (relative to the config file).
    #[serde(default)]
    pub initrd: Option<String>,
    /// The Linux client's command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The Linux client's vCPUs (1 when unset; ddvm's own clients have one).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Request queues its virtio-blk disk offers (MQ when more than one; a driver without
    /// MQ uses one). Default: one per vCPU.
    #[serde(default)]
    pub queues: Option<u16>,
    /// The NIC domain whose network it joins: a virtio-net device on a second virtio-mmio
    /// window, for ddvm's own clients and Linux clients alike (with a disk).
    #[serde(default)]
    pub nic: Option<String>,
    /// Its MAC (`52:54:00:xx:xx:xx`), unique; default derived from its name.
    #[serde(default)]
    pub mac: Option<String>,
}

/// A client's `workload`: the command-line string as it is, or a table rendered as one: `kind`
/// becomes `workload=KIND`, every other key `key=value` (an integer in decimal, a boolean as
/// 1 or 0, a string as it is, without blanks or `=`).
fn workload_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Text(String),
        Table(std::collections::BTreeMap<String, toml::Value>),
    }
    let table = match Given::deserialize(d)? {
        Given::Text(s) => return Ok(s),
        Given::Table(t) => t,
    };
    let mut tokens = Vec::new();
    // `kind` first, as the string form writes it.
    let mut entries: Vec<_> = table.into_iter().collect();
    entries.sort_by_key(|(k, _)| k != "kind");
    for (key, value) in entries {
        let text = match &value {
            toml::Value::Integer(n) if *n >= 0 => n.to_string(),
            toml::Value::Boolean(b) => u8::from(*b).to_string(),
            toml::Value::String(s)
                if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '=') =>
            {
                s.clone()
            }
            other => {
                return Err(D::Error::custom(format!(
                    "`{key}` = {other}: expected a non-negative integer, a boolean, or a string without blanks or `=`"
                )))
            }
        };
        let key = if key == "kind" {
            "workload".into()
        } else {
            key
        };
        tokens.push(format!("{key}={text}"));
    }
    Ok(tokens.join(" "))
}

/// Checks a built-in workload client's command line with the client's own parser: a value out
/// of range or a key it does not know is an error here, not a complaint on its console.
fn check_workload(text: &str) -> Result<(), String> {
    use ddvm_cmdline::workload::{parse, KEYS};
    use ddvm_cmdline::Cmdline;
    let line = Cmdline::new(text);
    // The hostile network client checks its own few keys.
    if line.value("workload") == Some("net-hostile") {
        return Ok(());
    }
    let (_, unknown) = parse(line).map_err(|e| e.to_string())?;
    match unknown.first() {
        None => Ok(()),
        Some(t) => Err(format!(
            "{t:?}: not a key the workload client reads; expected key=value with a key among {}",
            KEYS.iter()
                .filter(|k| **k != ddvm_cmdline::workload::DEVICE_KEY)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn default_client_memory() -> u64 {
    DEFAULT_CLIENT_MEMORY_MIB
}
fn default_client_image() -> String {
    BUILTIN_WORKLOAD_CLIENT.to_string()
}

impl ClientSection {
    /// The file of a `file:` disk, resolved against the config file's directory.
    pub fn disk_file(&self, config_file: &Path) -> Option<PathBuf> {
        self.disk
            .strip_prefix(FILE_DISK_PREFIX)
            .map(|p| resolve(config_file, p))
    }

    /// The image path (`None`: the built-in workload client).
    pub fn image_path(&self, config_file: &Path) -> Option<PathBuf> {
        (self.image != BUILTIN_WORKLOAD_CLIENT).then(|| resolve(config_file, &self.image))
    }

    /// Request queues of its disk: `queues`, else one per vCPU.
    pub fn queue_count(&self) -> u16 {
        self.queues.unwrap_or_else(|| {
            self.vcpus
                .map_or(1, |n| u16::try_from(n).unwrap_or(u16::MAX))
        })
    }

    /// The stock Linux kernel to boot, if the client is one (`kernel` is set).
    pub fn linux_boot(&self, config_file: &Path) -> Option<crate::linux::LinuxBoot> {
        Some(crate::linux::LinuxBoot {
            kernel: resolve(config_file, self.kernel.as_deref()?),
            initrd: self.initrd.as_deref().map(|p| resolve(config_file, p)),
            cmdline: self.cmdline.clone().unwrap_or_default(),
            vcpus: self.vcpus.unwrap_or(1),
        })
    }
}

/// One `[[domain]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DomainSection {
    /// Unique name.
    pub name: String,
    /// Image path (relative to the config file) or `builtin:driver-domain`.
    #[serde(default = "default_image")]
    pub image: String,
    /// RAM in MiB (a multiple of 2).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Guest command line.
    #[serde(default)]
    pub cmdline: String,
    /// Channel size in KiB (a multiple of 4).
    #[serde(default = "default_channel")]
    pub channel_kib: u64,
    /// The device handed to the domain.
    #[serde(default)]
    pub device: Option<DeviceSection>,
    /// Detection and restart policy (`[domain.recovery]`).
    #[serde(default)]
    pub recovery: ddvm_recovery::policy::PolicyConfig,
}

/// A `[domain.device]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceSection {
    /// An emulated NVMe controller whose namespace is backed by a file.
    EmulatedNvme {
        /// Backing file (created sparse if missing), relative to the config file.
        backing: String,
        /// Namespace size in MiB.
        size_mib: u64,
        /// Logical block size: 512 or 4096.
        #[serde(default = "default_lba")]
        lba_size: u32,
        /// Model a volatile write cache that loses unflushed writes on reset.
        #[serde(default)]
        volatile_write_cache: bool,
    },
    /// An emulated Intel 82540EM (e1000) on a wire.
    EmulatedE1000 {
        /// What its cable is plugged into.
        wire: WireSection,
        /// The NIC's own MAC; default derived from the domain's name.
        #[serde(default)]
        mac: Option<String>,
    },
    /// A real PCI function passed through VFIO (bound to vfio-pci: `ddvm device bind`). Its
    /// class is the device's: an Ethernet controller makes the domain a NIC domain (a
    /// client's `nic`), anything else a disk domain (a client's `disk`).
    Vfio {
        /// PCI address: `0000:00:03.0` (or `00:03.0`).
        address: String,
        /// How the device is reset between domains: `flr` (a function level reset, clean,
        /// about 100 ms) or `controller` (the device's own reset: an NVMe controller disable,
        /// an e1000's CTRL.RST; fast; a function level reset only when that does not quiesce
        /// the device and the kernel offers one).
        #[serde(default)]
        reset: ResetSetting,
        /// Refused: a real NIC's wire is its own port (kept only to say so clearly).
        #[serde(default)]
        wire: Option<Refused>,
    },
}

/// A key that is refused whatever its value; parsed only so that the refusal can say why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

impl<'de> Deserialize<'de> for Refused {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(Refused)
    }
}

/// `[domain.device] wire` of an emulated NIC.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum WireSection {
    /// In-process, back to back with the NIC of domain `with` (whose wire names this one).
    Pair {
        /// The other NIC domain.
        with: String,
    },
    /// QEMU's `-netdev stream` framing on a Unix socket.
    Stream {
        /// Socket path, relative to the config file.
        path: String,
        /// `connect` to a listener, or `listen` for one peer.
        mode: StreamMode,
    },
    /// QEMU's `-netdev dgram`: one frame per datagram on Unix sockets.
    Dgram {
        /// This end's socket path, relative to the config file.
        path: String,
        /// The peer's socket path (unset: the first sender is the peer).
        #[serde(default)]
        peer: Option<String>,
    },
    /// A TAP device of the host.
    Tap {
        /// Interface name.
        name: String,
    },
}

/// How a stream wire finds its peer.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StreamMode {
    /// Connect to a listening peer.
    Connect,
    /// Listen for one peer.
    Listen,
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// A locally administered unicast MAC derived from `name` (`52:54:00` and three bytes of
/// its FNV-1a hash), as a client's or NIC's default.
pub fn derived_mac(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

impl ClientSection {
    /// Its MAC: `mac`, else derived from its name.
    pub fn mac_address(&self) -> Option<[u8; 6]> {
        match &self.mac {
            Some(m) => parse_mac(m),
            None => Some(derived_mac(&self.name)),
        }
    }
}

/// `[domain.device] reset` of a VFIO device.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ResetSetting {
    /// A function level reset.
    #[default]
    Flr,
    /// An NVMe controller disable; a function level reset when it does not quiesce.
    Controller,
}

fn default_lba() -> u32 {
    512
}

fn default_image() -> String {
    BUILTIN_DRIVER_DOMAIN.to_string()
}
fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_channel() -> u64 {
    DEFAULT_CHANNEL_KIB
}

/// A configuration error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {message}")]
    Read {
        /// Config file.
        file: PathBuf,
        /// Cause.
        message: String,
    },
    /// Syntax error or a value of the wrong type.
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        /// Config file.
        file: PathBuf,
        /// Dotted key path, or the position of a syntax error.
        key: String,
        /// What was wrong and what was expected.
        message: String,
    },
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Read {
            file: file.to_path_buf(),
            message: format!("{e} (expected a readable TOML file)"),
        })?;
        Self::parse(file, &text)
    }

    /// Parses and checks configuration text; `file` is used in messages.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let key = if key == "." || key.is_empty() {
                position(text, inner.span())
            } else {
                key
            };
            ConfigError::Invalid {
                file: file.to_path_buf(),
                key,
                message: inner.message().trim().to_string(),
            }
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            message,
        };
        for (i, d) in self.domains.iter().enumerate() {
            if d.name.is_empty()
                || !d
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    format!("domain[{i}].name"),
                    format!(
                        "{:?}: expected a non-empty name of letters, digits, '-' and '_'",
                        d.name
                    ),
                ));
            }
            if self.domains[..i].iter().any(|o| o.name == d.name) {
                return Err(invalid(
                    format!("domain[{i}].name"),
                    format!("{:?} is used twice; expected unique domain names", d.name),
                ));
            }
            if d.memory_mib < 4 || d.memory_mib % 2 != 0 || d.memory_mib > 4096 {
                return Err(invalid(
                    format!("domain[{i}].memory_mib"),
                    format!(
                        "{}: expected an even number of MiB from 4 to 4096",
                        d.memory_mib
                    ),
                ));
            }
            // The geometry the VMM will build must fit: rings plus a 4 KiB slot per entry.
            let fits = crate::domain::channel_header(
                &d.name,
                ddvm_abi::channel::class::BLK,
                0,
                d.channel_kib << 10,
            )
            .is_ok();
            if !fits || d.channel_kib % 4 != 0 || d.channel_kib * 2 > d.memory_mib * 1024 {
                return Err(invalid(
                    format!("domain[{i}].channel_kib"),
                    format!(
                        "{}: expected a multiple of 4 KiB of at most half the memory, with room for the rings and a 4 KiB bounce slot per ring entry",
                        d.channel_kib
                    ),
                ));
            }
            if let Err(e) = d.recovery.to_policy() {
                return Err(invalid(
                    format!("domain[{i}].recovery.{}", e.key),
                    e.message,
                ));
            }
            if let Some(DeviceSection::Vfio { address, wire, .. }) = &d.device {
                if wire.is_some() {
                    return Err(invalid(
                        format!("domain[{i}].device.wire"),
                        "a VFIO device's wire is the real device's own port, cabled outside ddvm; expected no `wire` with kind = \"vfio\"".into(),
                    ));
                }
                if crate::host::parse_address(address).is_err() {
                    return Err(invalid(
                        format!("domain[{i}].device.address"),
                        format!("{address:?}: expected a PCI address such as \"0000:00:03.0\" or \"00:03.0\""),
                    ));
                }
            }
            if let Some(DeviceSection::EmulatedNvme {
                size_mib, lba_size, ..
            }) = &d.device
            {
                if *lba_size != 512 && *lba_size != 4096 {
                    return Err(invalid(
                        format!("domain[{i}].device.lba_size"),
                        format!("{lba_size}: expected 512 or 4096"),
                    ));
                }
                if *size_mib == 0 || *size_mib > 1 << 20 {
                    return Err(invalid(
                        format!("domain[{i}].device.size_mib"),
                        format!("{size_mib}: expected 1 to 1048576 MiB"),
                    ));
                }
            }
        }
        self.validate_clients(file)
    }

    fn validate_clients(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            message,
        };
        for (i, d) in self.domains.iter().enumerate() {
            let Some(DeviceSection::EmulatedE1000 { wire, mac }) = &d.device else {
                continue;
            };
            let key = |k: &str| format!("domain[{i}].device.{k}");
            if mac
                .as_deref()
                .is_some_and(|m| parse_mac(m).is_none_or(|m| m[0] & 1 != 0))
            {
                return Err(invalid(
                    key("mac"),
                    format!(
                        "{:?}: expected a unicast MAC such as \"52:54:00:12:34:56\"",
                        mac.clone().unwrap_or_default()
                    ),
                ));
            }
            if let WireSection::Pair { with } = wire {
                let back = self.domains.iter().any(|o| {
                    o.name == *with
                        && o.name != d.name
                        && matches!(&o.device, Some(DeviceSection::EmulatedE1000 { wire: WireSection::Pair { with: w }, .. }) if *w == d.name)
                });
                if !back {
                    return Err(invalid(
                        key("wire.with"),
                        format!("{with:?}: expected another emulated-e1000 domain whose wire is a pair `with = {:?}`", d.name),
                    ));
                }
            }
        }
        for (i, c) in self.clients.iter().enumerate() {
            let key = |k: &str| format!("client[{i}].{k}");
            let good_name = !c.name.is_empty()
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
            if !good_name {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?}: expected a non-empty name of letters, digits, '-' and '_'",
                        c.name
                    ),
                ));
            }
            let taken = self.domains.iter().any(|d| d.name == c.name)
                || self.clients[..i].iter().any(|o| o.name == c.name);
            if taken {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?} is used twice; expected names unique among domains and clients",
                        c.name
                    ),
                ));
            }
            if c.kernel.is_none() && c.image == BUILTIN_WORKLOAD_CLIENT {
                if let Err(e) = check_workload(&c.workload) {
                    return Err(invalid(key("workload"), e));
                }
            }
            match &c.kernel {
                None => {
                    for (k, set) in [
                        ("initrd", c.initrd.is_some()),
                        ("cmdline", c.cmdline.is_some()),
                        ("vcpus", c.vcpus.is_some()),
                    ] {
                        if set {
                            return Err(invalid(
                                key(k),
                                "set without `kernel`; expected it only for a Linux client (with `kernel`)".into(),
                            ));
                        }
                    }
                }
                Some(_) => {
                    if !c.workload.is_empty() {
                        return Err(invalid(
                            key("workload"),
                            "set with `kernel`; a Linux client runs its own programs: expected no workload".into(),
                        ));
                    }
                    if c.image != BUILTIN_WORKLOAD_CLIENT {
                        return Err(invalid(
                            key("image"),
                            "set with `kernel`; expected one of `image` and `kernel`".into(),
                        ));
                    }
                    let most = crate::linux::MAX_VCPUS;
                    if c.vcpus.is_some_and(|n| n == 0 || n > most) {
                        return Err(invalid(
                            key("vcpus"),
                            format!("{}: expected from 1 to {most}", c.vcpus.unwrap_or_default()),
                        ));
                    }
                    let min = crate::linux::MIN_MEMORY >> 20;
                    if c.memory_mib < min {
                        return Err(invalid(
                            key("memory_mib"),
                            format!("{}: a Linux client needs at least {min} MiB", c.memory_mib),
                        ));
                    }
                }
            }
            let most = crate::blk::MAX_QUEUES;
            if c.queues.is_some_and(|n| n == 0 || n > most) {
                return Err(invalid(
                    key("queues"),
                    format!(
                        "{}: expected from 1 to {most}",
                        c.queues.unwrap_or_default()
                    ),
                ));
            }
            if c.memory_mib < 4 || c.memory_mib % 2 != 0 || c.memory_mib > 3072 {
                return Err(invalid(
                    key("memory_mib"),
                    format!(
                        "{}: expected an even number of MiB from 4 to 3072",
                        c.memory_mib
                    ),
                ));
            }
            if c.disk.is_empty() && c.nic.is_none() {
                return Err(invalid(
                    key("disk"),
                    "missing; expected a disk's domain or `file:PATH` (or only `nic`)".into(),
                ));
            }
            if !c.disk.is_empty() && c.size_mib == 0 {
                return Err(invalid(
                    key("size_mib"),
                    "0: expected at least 1 MiB".into(),
                ));
            }
            let end = c.offset_mib.checked_add(c.size_mib);
            if c.disk
                .strip_prefix(FILE_DISK_PREFIX)
                .is_some_and(str::is_empty)
            {
                return Err(invalid(
                    key("disk"),
                    "\"file:\": expected a path after `file:`".into(),
                ));
            }
            if !c.disk.is_empty() && !c.disk.starts_with(FILE_DISK_PREFIX) {
                let Some(d) = self.domains.iter().find(|d| d.name == c.disk) else {
                    return Err(invalid(
                        key("disk"),
                        format!(
                            "{:?}: expected the name of a [[domain]] with a device, or `file:PATH`",
                            c.disk
                        ),
                    ));
                };
                let size_mib = match &d.device {
                    Some(DeviceSection::EmulatedNvme { size_mib, .. }) => Some(*size_mib),
                    Some(DeviceSection::EmulatedE1000 { .. }) => {
                        return Err(invalid(
                            key("disk"),
                            format!("domain {:?} serves a NIC; expected a disk's domain (a NIC goes in `nic`)", c.disk),
                        ))
                    }
                    // A real device's size is known once its domain identified it: a range
                    // past its end is refused then.
                    Some(DeviceSection::Vfio { .. }) => None,
                    None => {
                        return Err(invalid(
                            key("disk"),
                            format!(
                            "domain {:?} has no device; expected a domain with a [domain.device]",
                            c.disk
                        ),
                        ))
                    }
                };
                if let Some(size_mib) = size_mib.filter(|s| end.is_none_or(|e| e > *s)) {
                    return Err(invalid(
                        key("size_mib"),
                        format!(
                            "offset {} + size {} MiB: expected the range to fit the {size_mib} MiB disk of {:?}",
                            c.offset_mib, c.size_mib, c.disk
                        ),
                    ));
                }
            }
            if let Some(nic) = &c.nic {
                // A VFIO device's class is known once it is open: one that is not a NIC is
                // refused then.
                let is_nic = self.domains.iter().any(|d| {
                    d.name == *nic
                        && matches!(
                            d.device,
                            Some(DeviceSection::EmulatedE1000 { .. } | DeviceSection::Vfio { .. })
                        )
                });
                if !is_nic {
                    return Err(invalid(
                        key("nic"),
                        format!("{nic:?}: expected the name of a [[domain]] with an emulated-e1000 or vfio device"),
                    ));
                }
                let Some(mac) = c.mac_address().filter(|m| m[0] & 1 == 0 && *m != [0; 6]) else {
                    return Err(invalid(
                        key("mac"),
                        format!(
                            "{:?}: expected a unicast MAC such as \"52:54:00:12:34:56\"",
                            c.mac.clone().unwrap_or_default()
                        ),
                    ));
                };
                if let Some(o) = self.clients[..i]
                    .iter()
                    .find(|o| o.nic.is_some() && o.mac_address() == Some(mac))
                {
                    return Err(invalid(
                        key("mac"),
                        format!(
                            "{mac:02x?} is client {:?}'s too; expected unique MACs",
                            o.name
                        ),
                    ));
                }
            } else if c.mac.is_some() {
                return Err(invalid(
                    key("mac"),
                    "set without `nic`; expected it only with `nic`".into(),
                ));
            }
            let overlaps = self.clients[..i].iter().find(|o| {
                !c.disk.is_empty()
                    && o.disk == c.disk
                    && o.offset_mib < c.offset_mib.saturating_add(c.size_mib)
                    && c.offset_mib < o.offset_mib.saturating_add(o.size_mib)
            });
            if let Some(o) = overlaps {
                return Err(invalid(
                    key("offset_mib"),
                    format!(
                        "range overlaps client {:?} on the same disk; expected disjoint ranges",
                        o.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl DomainSection {
    /// The image path resolved against the config file's directory (`None`: the built-in one).
    pub fn image_path(&self, config_file: &Path) -> Option<PathBuf> {
        if self.image == BUILTIN_DRIVER_DOMAIN {
            return None;
        }
        Some(resolve(config_file, &self.image))
    }
}

/// A path from the config, resolved against the config file's directory.
pub fn resolve(config_file: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_file.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn position(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return "(document)".to_string();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("(line {line}, column {col})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    const DISK: &str = "[[domain]]\nname = \"nvme0\"\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"d.img\"\nsize_mib = 16\n";

    fn client(workload: &str) -> String {
        format!("{DISK}[[client]]\nname = \"c0\"\ndisk = \"nvme0\"\nsize_mib = 16\n{workload}")
    }

    #[test]
    fn a_workload_typo_or_a_value_out_of_range_is_refused_at_load_naming_the_key() {
        for (workload, expect) in [
            (
                "workload = \"workload=randrw qdepth=16\"",
                "\"qdepth=16\": not a key the workload client reads",
            ),
            (
                "workload = \"workload=randrw rwmix=150\"",
                "rwmix=150: expected",
            ),
            (
                "workload = \"workload=randwrte\"",
                "workload=randwrte: expected",
            ),
            (
                "workload = \"workload=net-tcp role=client ip=10.0.0.1/24\"",
                "peer: missing",
            ),
            (
                "[client.workload]\nkind = \"randrw\"\nqd = 100000\n",
                "qd=100000: expected",
            ),
        ] {
            let e = parse(&client(workload)).unwrap_err().to_string();
            assert!(
                e.starts_with("t.toml: key `client[0].workload`: ") && e.contains(expect),
                "{workload}: {e}"
            );
        }
    }

    #[test]
    fn a_workload_table_is_the_string_it_stands_for() {
        let table = parse(&client(
            "[client.workload]\nkind = \"randrw\"\nrwmix = 70\nbs = \"4K\"\nqd = 16\nprefill = true\nseed = 3\n",
        ))
        .unwrap();
        assert_eq!(
            table.clients[0].workload,
            "workload=randrw bs=4K prefill=1 qd=16 rwmix=70 seed=3"
        );
        let text = parse(&client(
            "workload = \"workload=randrw bs=4K prefill=1 qd=16 rwmix=70 seed=3\"",
        ))
        .unwrap();
        assert_eq!(table.clients[0].workload, text.clients[0].workload);
        // A value of a type no command line can carry names the key.
        let e = parse(&client(
            "[client.workload]\nkind = \"randrw\"\nrwmix = 0.7\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("client[0].workload") && e.contains("`rwmix` = 0.7"),
            "{e}"
        );
        let e = parse(&client("[client.workload]\nkind = \"randrw qd=1\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("without blanks"), "{e}");
    }

    #[test]
    fn a_custom_image_keeps_its_own_command_line() {
        let c = parse(&client(
            "image = \"my-image\"\nworkload = \"anything=goes here\"",
        ));
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn defaults_fill_a_minimal_domain() {
        let c = parse("[[domain]]\nname = \"dd0\"\n").unwrap();
        assert_eq!(c.domains[0].memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(c.domains[0].image, BUILTIN_DRIVER_DOMAIN);
        assert_eq!(c.domains[0].image_path(Path::new("/x/t.toml")), None);
    }

    #[test]
    fn wrong_type_names_file_key_and_expectation() {
        let e = parse("[[domain]]\nname = \"dd0\"\nmemory_mib = \"lots\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("t.toml: key `domain[0].memory_mib`: "),
            "{msg}"
        );
        assert!(msg.contains("expected"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn channel_too_small_for_its_rings_is_refused() {
        let e = parse("[[domain]]\nname = \"dd0\"\nchannel_kib = 64\n").unwrap_err();
        assert!(e.to_string().contains("domain[0].channel_kib"), "{e}");
        assert!(parse("[[domain]]\nname = \"dd0\"\nchannel_kib = 1024\n").is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let e = parse("[[domain]]\nname = \"dd0\"\nmemroy_mib = 4\n").unwrap_err();
        assert!(e.to_string().contains("memroy_mib"), "{e}");
        let e = parse("[[domain]]\nname = \"dd0\"\nmemory_mib = 5\n").unwrap_err();
        assert!(e.to_string().contains("domain[0].memory_mib"), "{e}");
        let e = parse("[[domain]]\nname = \"a\"\n[[domain]]\nname = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("used twice"), "{e}");
        let e = parse("[[domain]]\nname = \"a b\"\n").unwrap_err();
        assert!(e.to_string().contains("domain[0].name"), "{e}");
    }

    #[test]
    fn a_linux_client_takes_kernel_initrd_and_cmdline_and_nothing_of_the_workload() {
        let base = "[[client]]\nname = \"l0\"\ndisk = \"file:d.img\"\nsize_mib = 8\n";
        let c = parse(&format!(
            "{base}memory_mib = 256\nkernel = \"vmlinuz\"\ninitrd = \"i.cpio\"\ncmdline = \"console=ttyS0\"\n"
        ))
        .unwrap();
        let boot = c.clients[0]
            .linux_boot(Path::new("/etc/ddvm/t.toml"))
            .unwrap();
        assert_eq!(boot.kernel, Path::new("/etc/ddvm/vmlinuz"));
        assert_eq!(boot.initrd.as_deref(), Some(Path::new("/etc/ddvm/i.cpio")));
        assert_eq!(boot.cmdline, "console=ttyS0");
        assert_eq!(boot.vcpus, 1, "one vCPU unless asked");
        let c = parse(&format!(
            "{base}memory_mib = 256\nkernel = \"vmlinuz\"\nvcpus = 4\n"
        ))
        .unwrap();
        let boot = c.clients[0].linux_boot(Path::new("t.toml")).unwrap();
        assert_eq!(boot.vcpus, 4);
        assert_eq!(c.clients[0].queue_count(), 4, "a queue per vCPU");
        let c = parse(&format!(
            "{base}memory_mib = 256\nkernel = \"vmlinuz\"\nvcpus = 4\nqueues = 2\n"
        ))
        .unwrap();
        assert_eq!(c.clients[0].queue_count(), 2);
        for (extra, key) in [
            ("initrd = \"i.cpio\"\n", "client[0].initrd"),
            ("cmdline = \"x\"\n", "client[0].cmdline"),
            ("vcpus = 2\n", "client[0].vcpus"),
            ("queues = 0\n", "client[0].queues"),
            ("queues = 33\n", "client[0].queues"),
            (
                "memory_mib = 256\nkernel = \"k\"\nvcpus = 0\n",
                "client[0].vcpus",
            ),
            (
                "memory_mib = 256\nkernel = \"k\"\nvcpus = 999\n",
                "client[0].vcpus",
            ),
            (
                "memory_mib = 256\nkernel = \"k\"\nworkload = \"qd=4\"\n",
                "client[0].workload",
            ),
            (
                "memory_mib = 256\nkernel = \"k\"\nimage = \"c.elf\"\n",
                "client[0].image",
            ),
            ("kernel = \"k\"\n", "client[0].memory_mib"),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(e.contains("t.toml") && e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn syntax_errors_give_a_position() {
        let e = parse("[[domain]\nname = 1\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn vfio_device_section_parses_and_is_checked() {
        let c = parse(
            "[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"vfio\"\naddress = \"0000:00:03.0\"\nreset = \"controller\"\n",
        )
        .unwrap();
        assert_eq!(
            c.domains[0].device,
            Some(DeviceSection::Vfio {
                address: "0000:00:03.0".into(),
                reset: ResetSetting::Controller,
                wire: None,
            })
        );
        let c = parse(
            "[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"vfio\"\naddress = \"00:1f.7\"\n",
        )
        .unwrap();
        assert!(matches!(
            c.domains[0].device,
            Some(DeviceSection::Vfio {
                reset: ResetSetting::Flr,
                ..
            })
        ));
        for bad in [
            "0000:00:03",
            "00:20.0",
            "00:03.8",
            "zz:03.0",
            "0000:00:03.0.1",
            "",
        ] {
            let e = parse(&format!(
                "[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"vfio\"\naddress = \"{bad}\"\n"
            ))
            .unwrap_err();
            assert!(
                e.to_string().contains("domain[0].device.address"),
                "{bad}: {e}"
            );
        }
        let e = parse("[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"vfio\"\naddress = \"00:03.0\"\nreset = \"bus\"\n").unwrap_err();
        assert!(
            e.to_string().contains("expected `flr` or `controller`"),
            "{e}"
        );
        // A real NIC's wire is its own: a `wire` key is refused, naming file, key and what is
        // expected, whatever its value.
        for wire in ["{ kind = \"pair\", with = \"m\" }", "\"tap0\"", "3"] {
            let e = parse(&format!("[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"vfio\"\naddress = \"00:03.0\"\nwire = {wire}\n")).unwrap_err().to_string();
            assert!(
                e.contains("t.toml")
                    && e.contains("domain[0].device.wire")
                    && e.contains("expected no `wire` with kind = \"vfio\""),
                "{wire}: {e}"
            );
        }
        // A client's `nic` may name a VFIO domain (whether it is a NIC is the device's to say).
        let c = parse("[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"vfio\"\naddress = \"00:03.0\"\nreset = \"controller\"\n[[client]]\nname = \"c\"\ndisk = \"file:c.img\"\nsize_mib = 8\nnic = \"n\"\n").unwrap();
        assert_eq!(c.clients[0].nic.as_deref(), Some("n"));
    }

    #[test]
    fn nvme_device_section_parses_and_is_checked() {
        let c = parse(
            "[[domain]]\nname = \"nvme0\"\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"disk.img\"\nsize_mib = 64\n",
        )
        .unwrap();
        assert_eq!(
            c.domains[0].device,
            Some(DeviceSection::EmulatedNvme {
                backing: "disk.img".into(),
                size_mib: 64,
                lba_size: 512,
                volatile_write_cache: false
            })
        );
        let e = parse(
            "[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"d\"\nsize_mib = 64\nlba_size = 1000\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("domain[0].device.lba_size"), "{e}");
        let e =
            parse("[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"floppy\"\n").unwrap_err();
        assert!(e.to_string().contains("domain[0].device"), "{e}");
    }

    #[test]
    fn clients_need_a_disk_a_range_that_fits_and_no_overlap() {
        let base = "[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"d\"\nsize_mib = 64\n";
        let ok = format!("{base}[[client]]\nname = \"a\"\ndisk = \"n\"\nsize_mib = 32\n[[client]]\nname = \"b\"\ndisk = \"n\"\noffset_mib = 32\nsize_mib = 32\n");
        let c = parse(&ok).unwrap();
        assert_eq!(c.clients.len(), 2);
        assert_eq!(c.clients[0].memory_mib, DEFAULT_CLIENT_MEMORY_MIB);
        let e = parse(&format!(
            "{base}[[client]]\nname = \"a\"\ndisk = \"n\"\noffset_mib = 40\nsize_mib = 32\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("client[0].size_mib"), "{e}");
        let e = parse(&format!("{base}[[client]]\nname = \"a\"\ndisk = \"n\"\nsize_mib = 32\n[[client]]\nname = \"b\"\ndisk = \"n\"\noffset_mib = 16\nsize_mib = 8\n")).unwrap_err();
        assert!(e.to_string().contains("client[1].offset_mib"), "{e}");
        let e = parse(&format!(
            "{base}[[client]]\nname = \"a\"\ndisk = \"nope\"\nsize_mib = 1\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("client[0].disk"), "{e}");
        let e = parse(&format!(
            "{base}[[client]]\nname = \"n\"\ndisk = \"n\"\nsize_mib = 1\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("client[0].name"), "{e}");
        let c = parse("[[client]]\nname = \"a\"\ndisk = \"file:x.img\"\nsize_mib = 8\n").unwrap();
        assert_eq!(
            c.clients[0].disk_file(Path::new("/d/t.toml")),
            Some(PathBuf::from("/d/x.img"))
        );
    }

    #[test]
    fn the_readme_topology_example_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n")
            .expect("a toml example in the README")
            + 8;
        let len = readme[start..].find("```").expect("the example ends");
        let c = parse(&readme[start..start + len]).unwrap();
        assert_eq!((c.domains.len(), c.clients.len()), (2, 3));
        // The table form of a workload, as its string.
        assert_eq!(
            c.clients[1].workload,
            "workload=randread bs=4K count=20000 prefill=1 qd=32"
        );
        assert_eq!(
            c.domains[1].device,
            Some(DeviceSection::Vfio {
                address: "0000:00:03.0".into(),
                reset: ResetSetting::Controller,
                wire: None,
            })
        );
        assert!(c.clients[0].linux_boot(Path::new("t.toml")).is_none());
        assert!(c.clients[2].linux_boot(Path::new("t.toml")).is_some());
        let p = c.domains[0].recovery.to_policy().unwrap();
        assert_eq!(
            p.detection.heartbeat_period,
            std::time::Duration::from_millis(20)
        );
    }

    #[test]
    fn relative_images_resolve_against_the_config_directory() {
        let c = parse("[[domain]]\nname = \"d\"\nimage = \"img/dd.elf\"\n").unwrap();
        assert_eq!(
            c.domains[0].image_path(Path::new("/etc/ddvm/t.toml")),
            Some(PathBuf::from("/etc/ddvm/img/dd.elf"))
        );
    }

    #[test]
    fn nic_keys_are_checked_naming_the_key_and_what_was_expected() {
        let nics = "[[domain]]\nname = \"n\"\n[domain.device]\nkind = \"emulated-nvme\"\nbacking = \"d.img\"\nsize_mib = 64\n[[domain]]\nname = \"x\"\n[domain.device]\nkind = \"emulated-e1000\"\nwire = { kind = \"pair\", with = \"y\" }\n[[domain]]\nname = \"y\"\n[domain.device]\nkind = \"emulated-e1000\"\nwire = { kind = \"pair\", with = \"x\" }\n";
        let client = |extra: &str| {
            format!("{nics}[[client]]\nname = \"a\"\ndisk = \"n\"\nsize_mib = 8\n{extra}")
        };
        let c = parse(&client("nic = \"x\"\nmac = \"52:54:00:00:00:01\"\n")).unwrap();
        assert_eq!(c.clients[0].mac_address(), Some([0x52, 0x54, 0, 0, 0, 1]));
        // A Linux client takes a NIC too (its second window gets a GSI and a DSDT entry).
        let c = parse(&client(
            "nic = \"x\"\nmemory_mib = 128\nkernel = \"vmlinuz\"\n",
        ))
        .unwrap();
        assert!(c.clients[0].linux_boot(Path::new("/c.toml")).is_some());
        assert_eq!(c.clients[0].nic.as_deref(), Some("x"));
        for (extra, key) in [
            ("nic = \"n\"\n", "client[0].nic"),
            (
                "nic = \"x\"\nmac = \"01:00:00:00:00:01\"\n",
                "client[0].mac",
            ),
            ("nic = \"x\"\nmac = \"zz\"\n", "client[0].mac"),
            ("mac = \"52:54:00:00:00:01\"\n", "client[0].mac"),
        ] {
            let e = parse(&client(extra)).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("expected"), "{extra}: {e}");
        }
        let lonely = nics.replace("with = \"x\"", "with = \"n\"");
        let e = parse(&lonely).unwrap_err().to_string();
        assert!(e.contains("device.wire.with"), "{e}");
        let e = parse(&format!(
            "{nics}[[client]]\nname = \"a\"\ndisk = \"x\"\nsize_mib = 8\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("client[0].disk") && e.contains("NIC"), "{e}");
        let only_nic = parse(&format!("{nics}[[client]]\nname = \"a\"\nnic = \"x\"\n")).unwrap();
        assert!(only_nic.clients[0].disk.is_empty() && only_nic.clients[0].size_mib == 0);
        let e = parse(&format!("{nics}[[client]]\nname = \"a\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("client[0].disk") && e.contains("missing"), "{e}");
    }
}
