// Enumerating the machine's real DRM devices through libdrm.
internal import CLibDRM
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import SVMEmu

/// The bus a DRM device sits on (`drmDevice.bustype`, `DRM_BUS_*`).
public enum DRMBusType: String, Sendable, Hashable, Codable {
    case pci, usb, platform, host1x, unknown

    /// Maps libdrm's `DRM_BUS_PCI` ... `DRM_BUS_HOST1X`.
    public init(libdrmBusType value: Int32) {
        switch value {
        case DRM_BUS_PCI: self = .pci
        case DRM_BUS_USB: self = .usb
        case DRM_BUS_PLATFORM: self = .platform
        case DRM_BUS_HOST1X: self = .host1x
        default: self = .unknown
        }
    }
}

/// A PCI address, `domain:bus:device.function` (libdrm's `drmPciBusInfo`).
public struct DRMPCIAddress: Sendable, Hashable, Codable, CustomStringConvertible {
    public var domain: UInt16
    public var bus: UInt8
    public var device: UInt8
    public var function: UInt8
    public init(domain: UInt16, bus: UInt8, device: UInt8, function: UInt8) {
        self.domain = domain; self.bus = bus; self.device = device; self.function = function
    }
    /// `0000:01:00.0`, as lspci and sysfs print it.
    public var description: String {
        hex(domain, 4) + ":" + hex(bus, 2) + ":" + hex(device, 2) + "." + String(function, radix: 16)
    }
}

/// PCI identifiers (libdrm's `drmPciDeviceInfo`).
public struct DRMPCIIdentifiers: Sendable, Hashable, Codable, CustomStringConvertible {
    public var vendorID: UInt16
    public var deviceID: UInt16
    public var subvendorID: UInt16
    public var subdeviceID: UInt16
    public init(vendorID: UInt16, deviceID: UInt16, subvendorID: UInt16, subdeviceID: UInt16) {
        self.vendorID = vendorID; self.deviceID = deviceID
        self.subvendorID = subvendorID; self.subdeviceID = subdeviceID
    }
    /// `10de:1b80 (subsystem 1458:3702)`.
    public var description: String {
        hex(vendorID, 4) + ":" + hex(deviceID, 4) + " (subsystem " + hex(subvendorID, 4) + ":" + hex(subdeviceID, 4) + ")"
    }
    /// The vendor's common name for the vendor IDs of GPU makers, else nil.
    public var vendorName: String? {
        switch vendorID {
        case 0x10de: "NVIDIA"
        case 0x1002: "AMD"
        case 0x8086: "Intel"
        case 0x1af4: "Red Hat (virtio)"
        case 0x15ad: "VMware"
        case 0x1234: "QEMU (bochs)"
        case 0x1b36: "Red Hat (QEMU)"
        case 0x1a03: "ASPEED"
        case 0x102b: "Matrox"
        case 0x80ee: "VirtualBox"
        case 0x1414: "Microsoft"
        default: nil
        }
    }
}

/// A kernel driver's identity as `DRM_IOCTL_VERSION` returns it (libdrm's `drmVersion`).
public struct DRMDriverVersion: Sendable, Hashable, Codable {
    public var name: String
    public var major: Int32
    public var minor: Int32
    public var patchlevel: Int32
    /// The driver's date string (often a fixed, old date; many drivers now report "0").
    public var date: String
    public var desc: String
    public init(name: String, major: Int32, minor: Int32, patchlevel: Int32, date: String, desc: String) {
        self.name = name; self.major = major; self.minor = minor; self.patchlevel = patchlevel
        self.date = date; self.desc = desc
    }
    /// `major.minor.patchlevel`.
    public var versionString: String { "\(major).\(minor).\(patchlevel)" }
}

/// One DRM device: the nodes libdrm groups together, its bus, its driver and
/// what that driver offers for SVM migration.
public struct DRMDevice: Sendable, Hashable, Codable {
    /// `/dev/dri/cardN` (`DRM_NODE_PRIMARY`), if present.
    public var primaryNode: String?
    /// `/dev/dri/renderDN` (`DRM_NODE_RENDER`), if present.
    public var renderNode: String?
    public var busType: DRMBusType
    /// PCI devices only.
    public var pciAddress: DRMPCIAddress?
    /// PCI devices only.
    public var pciIDs: DRMPCIIdentifiers?
    /// For non-PCI buses: the USB bus/device numbers or the platform device name.
    public var busDetail: String?
    /// From `drmGetVersion()`, if a node could be opened.
    public var driverVersion: DRMDriverVersion?
    /// The kernel driver's name: from `drmGetVersion()`, else from sysfs.
    public var driverName: String?
    /// Why `driverVersion` is nil, if it is.
    public var versionError: String?
    /// What the driver supports (from `SVMMigrationSupport.forDriver(driverName)`).
    public var svmMigration: SVMMigrationSupport

    public init(primaryNode: String?, renderNode: String?, busType: DRMBusType,
                pciAddress: DRMPCIAddress? = nil, pciIDs: DRMPCIIdentifiers? = nil, busDetail: String? = nil,
                driverVersion: DRMDriverVersion? = nil, driverName: String? = nil, versionError: String? = nil) {
        self.primaryNode = primaryNode
        self.renderNode = renderNode
        self.busType = busType
        self.pciAddress = pciAddress
        self.pciIDs = pciIDs
        self.busDetail = busDetail
        self.driverVersion = driverVersion
        self.driverName = driverName ?? driverVersion?.name
        self.versionError = versionError
        self.svmMigration = SVMMigrationSupport.forDriver(self.driverName)
    }
}

/// The result of enumerating: the devices, and a plain sentence about them.
public struct DRMEnumeration: Sendable, Hashable, Codable {
    public var devices: [DRMDevice]
    /// Whether the DRM directory (normally `/dev/dri`) exists.
    public var driDirectoryPresent: Bool
    /// A plain sentence: why the list is empty, or how many devices there are.
    public var message: String
    public init(devices: [DRMDevice], driDirectoryPresent: Bool, message: String) {
        self.devices = devices; self.driDirectoryPresent = driDirectoryPresent; self.message = message
    }
}

/// Why a libdrm query about one device failed.
public struct DRMQueryError: Error, Sendable, Hashable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Enumerating the machine's DRM devices through libdrm.
public enum DRMDevices {
    /// libdrm's `DRM_DIR_NAME`.
    public static let defaultDirectory = "/dev/dri"

    /// Lists the machine's DRM devices with their driver and SVM support.
    ///
    /// Checks that `driDirectory` exists, then asks libdrm for every device
    /// (`drmGetDevices2(0, ...)`, freed with `drmFreeDevices()`), opens each
    /// device's render node (else its primary node) and asks the driver for its
    /// name and version (`drmGetVersion()` / `drmFreeVersion()`). Without the
    /// directory it returns an empty list and says why; it never traps.
    ///
    /// libdrm always scans its compiled-in `DRM_DIR_NAME` (`/dev/dri`);
    /// `driDirectory` only controls the presence check, so a test can point it
    /// at a missing path to see the GPU-less answer on any machine.
    ///
    /// The corresponding C function is `drmGetDevices2()`.
    public static func enumerate(driDirectory: String = defaultDirectory) -> DRMEnumeration {
        var st = stat()
        guard stat(driDirectory, &st) == 0 else {
            let err = Errno(rawValue: errno)
            return report(driDirectoryPresent: false, driDirectory: driDirectory,
                          getDevicesResult: -err.rawValue, devices: [])
        }
        let count = drmGetDevices2(0, nil, 0)
        guard count > 0 else {
            return report(driDirectoryPresent: true, driDirectory: driDirectory, getDevicesResult: count, devices: [])
        }
        var pointers = [drmDevicePtr?](repeating: nil, count: Int(count))
        let got = pointers.withUnsafeMutableBufferPointer { buffer in
            drmGetDevices2(0, buffer.baseAddress, count)
        }
        guard got > 0 else {
            return report(driDirectoryPresent: true, driDirectory: driDirectory, getDevicesResult: got, devices: [])
        }
        var devices: [DRMDevice] = []
        for index in 0..<min(Int(got), pointers.count) {
            if let raw = pointers[index] { devices.append(convert(raw)) }
        }
        pointers.withUnsafeMutableBufferPointer { buffer in
            drmFreeDevices(buffer.baseAddress, got)
        }
        return report(driDirectoryPresent: true, driDirectory: driDirectory, getDevicesResult: got, devices: devices)
    }

    /// Builds the answer from the raw outcome: the pure part of `enumerate`.
    ///
    /// `getDevicesResult` is what `drmGetDevices2()` returned (a count, or a
    /// negative errno); `devices` the devices converted from it.
    ///
    /// The corresponding C function is `drmGetDevices2()` (its return value).
    public static func report(driDirectoryPresent: Bool, driDirectory: String = defaultDirectory,
                              getDevicesResult: Int32, devices: [DRMDevice]) -> DRMEnumeration {
        let message: String
        if !driDirectoryPresent {
            message = "No DRM devices: \(driDirectory) does not exist. This machine (or container) exposes no GPU "
                + "to user space, so there is nothing for libdrm to list; the emulated device still works."
        } else if getDevicesResult < 0 {
            message = "drmGetDevices2() failed: \(Errno(rawValue: -getDevicesResult)). No devices listed."
        } else if devices.isEmpty {
            message = "\(driDirectory) exists but libdrm found no DRM devices in it."
        } else {
            let migrating = devices.filter { $0.svmMigration.migrates }.count
            message = "\(devices.count) DRM device\(devices.count == 1 ? "" : "s"); "
                + "\(migrating) with a driver that can migrate process memory into device memory."
        }
        return DRMEnumeration(devices: devices, driDirectoryPresent: driDirectoryPresent, message: message)
    }

    /// Converts one libdrm `drmDevice` and queries its driver's version.
    private static func convert(_ raw: drmDevicePtr) -> DRMDevice {
        let primary = svmdrm_device_node(raw, DRM_NODE_PRIMARY).map { String(cString: $0) }
        let render = svmdrm_device_node(raw, DRM_NODE_RENDER).map { String(cString: $0) }
        let bus = DRMBusType(libdrmBusType: raw.pointee.bustype)
        var address: DRMPCIAddress?
        var ids: DRMPCIIdentifiers?
        var detail: String?
        switch bus {
        case .pci:
            if let b = svmdrm_device_pci_bus(raw) {
                address = DRMPCIAddress(domain: b.pointee.domain, bus: b.pointee.bus,
                                        device: b.pointee.dev, function: b.pointee.func)
            }
            if let d = svmdrm_device_pci_info(raw) {
                ids = DRMPCIIdentifiers(vendorID: d.pointee.vendor_id, deviceID: d.pointee.device_id,
                                        subvendorID: d.pointee.subvendor_id, subdeviceID: d.pointee.subdevice_id)
            }
        case .usb:
            if let b = svmdrm_device_usb_bus(raw) { detail = "usb bus \(b.pointee.bus) device \(b.pointee.dev)" }
            if let d = svmdrm_device_usb_info(raw) {
                detail = (detail ?? "usb") + " id " + hex(d.pointee.vendor, 4) + ":" + hex(d.pointee.product, 4)
            }
        case .platform:
            detail = svmdrm_device_platform_name(raw).map { String(cString: $0) }
        case .host1x:
            detail = svmdrm_device_host1x_name(raw).map { String(cString: $0) }
        case .unknown:
            detail = "bus type \(raw.pointee.bustype)"
        }
        var version: DRMDriverVersion?
        var versionError: String?
        if let node = render ?? primary {
            switch queryVersion(node: node) {
            case .success(let v): version = v
            case .failure(let e): versionError = e.message
            }
        } else {
            versionError = "no primary or render node"
        }
        let name = version?.name ?? (render ?? primary).flatMap { driverNameFromSysfs(node: $0) }
        return DRMDevice(primaryNode: primary, renderNode: render, busType: bus, pciAddress: address, pciIDs: ids,
                         busDetail: detail, driverVersion: version, driverName: name, versionError: versionError)
    }

    /// Opens `node` and asks its driver for name and version.
    ///
    /// The corresponding C function is `drmGetVersion()`.
    public static func queryVersion(node: String) -> Result<DRMDriverVersion, DRMQueryError> {
        var fd = open(node, O_RDWR | O_CLOEXEC)
        if fd < 0 { fd = open(node, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { return .failure(DRMQueryError("open(\(node)): \(Errno(rawValue: errno))")) }
        defer { close(fd) }
        guard let v = drmGetVersion(fd) else {
            return .failure(DRMQueryError("drmGetVersion(\(node)) failed: \(Errno(rawValue: errno))"))
        }
        defer { drmFreeVersion(v) }
        func text(_ p: UnsafeMutablePointer<CChar>?, _ length: Int32) -> String {
            guard let p, length > 0 else { return "" }
            let bytes = UnsafeRawBufferPointer(start: p, count: Int(length))
            return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        }
        return .success(DRMDriverVersion(name: text(v.pointee.name, v.pointee.name_len),
                                         major: v.pointee.version_major, minor: v.pointee.version_minor,
                                         patchlevel: v.pointee.version_patchlevel,
                                         date: text(v.pointee.date, v.pointee.date_len),
                                         desc: text(v.pointee.desc, v.pointee.desc_len)))
    }

    /// The kernel driver bound to a DRM node, from sysfs
    /// (`/sys/class/drm/<node>/device/driver` is a link to the driver), for
    /// when the node cannot be opened.
    public static func driverNameFromSysfs(node: String, sysfsRoot: String = "/sys/class/drm") -> String? {
        let base = node.split(separator: "/").last.map(String.init) ?? node
        let link = sysfsRoot + "/" + base + "/device/driver"
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(link, &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        let target = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return target.split(separator: "/").last.map(String.init)
    }
}

@inline(__always)
func hex<T: BinaryInteger>(_ value: T, _ width: Int) -> String {
    let digits = String(value, radix: 16)
    return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
}
