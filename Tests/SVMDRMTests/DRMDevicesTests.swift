import Foundation
import Testing
@testable import SVMDRM

@Suite("DRM device enumeration")
struct DRMDevicesTests {
    @Test("a missing DRM directory gives an empty list and a reason, not a crash")
    func missingDirectory() throws {
        let result = DRMDevices.enumerate(driDirectory: "/nonexistent/svmemu-test/dri")
        #expect(result.devices.isEmpty)
        #expect(!result.driDirectoryPresent)
        #expect(result.message.contains("/nonexistent/svmemu-test/dri does not exist"))
    }

    @Test("enumerating this machine agrees with whether /dev/dri exists")
    func thisMachine() throws {
        let present = FileManager.default.fileExists(atPath: "/dev/dri")
        let result = DRMDevices.enumerate()
        #expect(result.driDirectoryPresent == present)
        #expect(!result.message.isEmpty)
        if !present {
            #expect(result.devices.isEmpty)
            #expect(result.message.contains("/dev/dri does not exist"))
        }
        for device in result.devices {
            #expect(device.primaryNode != nil || device.renderNode != nil)
        }
    }

    @Test("the report for libdrm's raw outcomes")
    func report() throws {
        let failed = DRMDevices.report(driDirectoryPresent: true, getDevicesResult: -13, devices: [])
        #expect(failed.devices.isEmpty)
        #expect(failed.message.contains("drmGetDevices2() failed: EACCES"))

        let none = DRMDevices.report(driDirectoryPresent: true, getDevicesResult: 0, devices: [])
        #expect(none.message.contains("found no DRM devices"))

        let nvidia = DRMDevice(
            primaryNode: "/dev/dri/card0", renderNode: "/dev/dri/renderD128", busType: .pci,
            pciAddress: DRMPCIAddress(domain: 0, bus: 1, device: 0, function: 0),
            pciIDs: DRMPCIIdentifiers(vendorID: 0x10de, deviceID: 0x1b80, subvendorID: 0x1458, subdeviceID: 0x3702),
            driverVersion: DRMDriverVersion(name: "nouveau", major: 1, minor: 4, patchlevel: 0, date: "20120801",
                                            desc: "nVidia Riva/TNT/GeForce/Quadro/Tesla/Tegra K1+"))
        let intel = DRMDevice(primaryNode: "/dev/dri/card1", renderNode: "/dev/dri/renderD129", busType: .pci,
                              driverName: "i915", versionError: "open(/dev/dri/renderD129): EACCES")
        let two = DRMDevices.report(driDirectoryPresent: true, getDevicesResult: 2, devices: [nvidia, intel])
        #expect(two.devices.count == 2)
        #expect(two.message == "2 DRM devices; 1 with a driver that can migrate process memory into device memory.")
        #expect(nvidia.driverName == "nouveau")
        #expect(nvidia.svmMigration.migrates)
        #expect(nvidia.pciAddress?.description == "0000:01:00.0")
        #expect(nvidia.pciIDs?.description == "10de:1b80 (subsystem 1458:3702)")
        #expect(nvidia.pciIDs?.vendorName == "NVIDIA")
        #expect(nvidia.driverVersion?.versionString == "1.4.0")
        #expect(!intel.svmMigration.migrates)
        #expect(intel.svmMigration.level == .noMigration)
    }

    @Test("the SVM table: nouveau, amdgpu and xe migrate; i915 does not; unknown names say so")
    func svmTable() throws {
        #expect(SVMMigrationSupport.forDriver("nouveau").level == .migratesToDeviceMemory)
        #expect(SVMMigrationSupport.forDriver("nouveau").interface?.contains("DRM_IOCTL_NOUVEAU_SVM_BIND") == true)
        #expect(SVMMigrationSupport.forDriver("amdgpu").level == .migratesToDeviceMemory)
        #expect(SVMMigrationSupport.forDriver("amdgpu").interface?.contains("/dev/kfd") == true)
        #expect(SVMMigrationSupport.forDriver("xe").level == .migratesToDeviceMemory)
        #expect(SVMMigrationSupport.forDriver("i915").level == .noMigration)
        #expect(SVMMigrationSupport.forDriver("virtio_gpu").level == .noMigration)
        #expect(SVMMigrationSupport.forDriver("nvidia-drm").level == .outOfTree)
        #expect(SVMMigrationSupport.forDriver("frobnicator").level == .unknown)
        #expect(SVMMigrationSupport.forDriver(nil).level == .unknown)
        #expect(SVMMigrationSupport.forDriver("").level == .unknown)
    }

    @Test("JSON has devices, driDirectoryPresent and message")
    func json() throws {
        let result = DRMDevices.enumerate(driDirectory: "/nonexistent/svmemu-test/dri")
        let data = try JSONEncoder().encode(result)
        let object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect((object["devices"] as? [Any])?.isEmpty == true)
        #expect(object["driDirectoryPresent"] as? Bool == false)
        #expect((object["message"] as? String)?.isEmpty == false)
    }

    @Test("the sysfs driver-name fallback reads the device/driver link")
    func sysfsFallback() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("svmemu-sysfs-\(getpid())")
        defer { try? FileManager.default.removeItem(at: root) }
        let device = root.appendingPathComponent("renderD128/device")
        try FileManager.default.createDirectory(at: device, withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: device.appendingPathComponent("driver").path,
                                                   withDestinationPath: "../../../bus/pci/drivers/nouveau")
        #expect(DRMDevices.driverNameFromSysfs(node: "/dev/dri/renderD128", sysfsRoot: root.path) == "nouveau")
        #expect(DRMDevices.driverNameFromSysfs(node: "/dev/dri/renderD129", sysfsRoot: root.path) == nil)
    }

    @Test("drmGetVersion on a node that does not exist reports why")
    func versionOfMissingNode() throws {
        switch DRMDevices.queryVersion(node: "/nonexistent/svmemu-test/renderD128") {
        case .success: Issue.record("expected a failure")
        case .failure(let e): #expect(e.message.contains("ENOENT"))
        }
    }

    @Test("drmGetVersion on a file that is not a DRM node fails cleanly")
    func versionOfNonDRMFile() throws {
        switch DRMDevices.queryVersion(node: "/dev/null") {
        case .success: Issue.record("expected a failure")
        case .failure(let e): #expect(e.message.contains("drmGetVersion(/dev/null) failed"))
        }
    }
}
