// Which Linux DRM drivers can migrate process memory into device memory
// (HMM / migrate_vma, "SVM"), keyed by the driver name drmGetVersion() reports.

/// What a kernel DRM driver offers for shared virtual memory with migration of
/// ordinary process pages into device memory (HMM mirroring plus
/// `migrate_vma_setup()` / `migrate_vma_pages()` into `MEMORY_DEVICE_PRIVATE`
/// or similar pages).
///
/// This is a static table written from the upstream kernel sources, not a probe:
/// whether the running kernel was built with the needed options (for example
/// `CONFIG_DRM_NOUVEAU_SVM`) is not visible through libdrm. Entries whose
/// details SVMEmu's authors could not confirm say so in `notes`.
public struct SVMMigrationSupport: Sendable, Hashable, Codable {
    /// How far the driver goes.
    public enum Level: String, Sendable, Hashable, Codable {
        /// Mirrors the CPU page tables and migrates pages to device memory.
        case migratesToDeviceMemory = "migrates"
        /// Mirrors or pins user memory for the GPU, but never migrates it.
        case noMigration = "no-migration"
        /// An out-of-tree driver with its own mechanism; not through DRM ioctls.
        case outOfTree = "out-of-tree"
        /// Not in this table.
        case unknown = "unknown"
    }

    /// How far the driver goes.
    public let level: Level
    /// The kernel mechanism (files, helpers).
    public let mechanism: String
    /// The user-space interface, if any.
    public let interface: String?
    /// The first upstream kernel release with it, if known (from merge-window
    /// history, not re-verified against release tags).
    public let since: String?
    /// Conditions, caveats, and what is uncertain.
    public let notes: String

    public init(level: Level, mechanism: String, interface: String?, since: String?, notes: String) {
        self.level = level
        self.mechanism = mechanism
        self.interface = interface
        self.since = since
        self.notes = notes
    }

    /// Whether the driver can migrate process pages into device memory.
    public var migrates: Bool { level == .migratesToDeviceMemory }

    /// One short line for tables.
    public var summary: String {
        switch level {
        case .migratesToDeviceMemory:
            return "yes: \(interface ?? mechanism)" + (since.map { " (since \($0))" } ?? "")
        case .noMigration: return "no: \(mechanism)"
        case .outOfTree: return "out of tree: \(mechanism)"
        case .unknown: return "unknown: \(notes)"
        }
    }

    /// The table entry for a kernel driver name (`drmVersion.name`, or the
    /// sysfs `device/driver` link name).
    ///
    /// The corresponding kernel fields are `struct drm_driver.name`, which the
    /// `DRM_IOCTL_VERSION` ioctl (`drm_version()`) returns.
    public static func forDriver(_ name: String?) -> SVMMigrationSupport {
        guard let name, !name.isEmpty else {
            return SVMMigrationSupport(level: .unknown, mechanism: "driver name not available",
                                       interface: nil, since: nil,
                                       notes: "the driver name could not be read (drmGetVersion failed and no sysfs link)")
        }
        if let entry = table[name] { return entry }
        return SVMMigrationSupport(level: .unknown, mechanism: "not in SVMEmu's table", interface: nil,
                                   since: nil, notes: "driver \"\(name)\" is not in SVMEmu's table")
    }

    /// Driver names the table knows.
    public static var knownDrivers: [String] { table.keys.sorted() }

    private static let noSVM = "no HMM device-memory migration in this driver"

    private static let table: [String: SVMMigrationSupport] = {
        var t: [String: SVMMigrationSupport] = [
            "nouveau": SVMMigrationSupport(
                level: .migratesToDeviceMemory,
                mechanism: "HMM mirror (nouveau_svm.c) + migrate_vma into device-private VRAM (nouveau_dmem.c)",
                interface: "DRM_IOCTL_NOUVEAU_SVM_INIT / DRM_IOCTL_NOUVEAU_SVM_BIND",
                since: "Linux 5.3",
                notes: "needs CONFIG_DRM_NOUVEAU_SVM, marked (EXPERIMENTAL) and depending on STAGING, and a GPU "
                    + "with a replayable GPU fault buffer (Pascal or newer); SVM_INIT returns ENOSYS when the "
                    + "driver set up no SVM for the GPU. Availability with the GSP-RM firmware path not verified."),
            "amdgpu": SVMMigrationSupport(
                level: .migratesToDeviceMemory,
                mechanism: "amdkfd SVM ranges: hmm_range_fault mirror + migrate_vma into VRAM (kfd_svm.c, kfd_migrate.c)",
                interface: "AMDKFD_IOC_SVM on /dev/kfd (ROCm), not on the DRM node",
                since: "Linux 5.14",
                notes: "needs CONFIG_HSA_AMD_SVM and a GPU supported by KFD; the amdgpu DRM node's own userptr "
                    + "path mirrors with hmm_range_fault but does not migrate."),
            "xe": SVMMigrationSupport(
                level: .migratesToDeviceMemory,
                mechanism: "drm_gpusvm mirror + drm_pagemap migration into VRAM (xe_svm.c)",
                interface: "DRM_IOCTL_XE_VM_BIND with the CPU-address-mirror flag on a fault-mode VM",
                since: "Linux 6.15",
                notes: "migration needs a discrete GPU with VRAM; integrated parts mirror only. Needs "
                    + "CONFIG_DRM_XE_GPUSVM. The migration helpers moved from drm_gpusvm to drm_pagemap in a "
                    + "later release (6.17 era, not verified)."),
            "i915": SVMMigrationSupport(
                level: .noMigration,
                mechanism: "userptr pins pages (pin_user_pages + mmu_interval_notifier); no device-private SVM upstream",
                interface: nil, since: nil,
                notes: "Intel's SVM work continues in the xe driver."),
            "radeon": SVMMigrationSupport(level: .noMigration, mechanism: noSVM, interface: nil, since: nil,
                                          notes: "userptr only (mmu_interval_notifier)."),
            "nvidia-drm": SVMMigrationSupport(
                level: .outOfTree,
                mechanism: "nvidia-uvm.ko (out of tree) migrates with its own page tracking",
                interface: "CUDA unified memory; not a DRM ioctl",
                since: nil,
                notes: "NVIDIA's open kernel modules can also use the kernel's HMM for system-allocated memory "
                    + "(reported from the r535 series on; not verified here). nvidia-drm itself is display/KMS only."),
        ]
        for name in ["panthor", "panfrost", "lima", "msm", "v3d", "vc4", "etnaviv", "tegra", "host1x",
                     "virtio_gpu", "vmwgfx", "qxl", "bochs-drm", "bochs", "cirrus", "cirrus-qemu", "ast", "mgag200",
                     "simpledrm", "efidrm", "vesadrm", "vkms", "vgem", "hibmc-drm", "udl", "gud", "mediatek", "rockchip",
                     "exynos", "imx-drm", "sun4i-drm", "meson", "vboxvideo", "hyperv_drm", "powervr", "asahi"] {
            t[name] = SVMMigrationSupport(level: .noMigration, mechanism: noSVM, interface: nil, since: nil,
                                          notes: "display-only or GPU driver without HMM migration upstream.")
        }
        return t
    }()
}
