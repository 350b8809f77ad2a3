// `svmemu devices`: the machine's real DRM devices, through libdrm.
import ArgumentParser
import Foundation
import SVMDRM
import SVMStress

/// Lists the machine's DRM devices (libdrm `drmGetDevices2()` and
/// `drmGetVersion()`) and whether each driver can migrate process memory into
/// device memory. Without `/dev/dri` it says so and exits 0.
struct DevicesCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "devices",
        abstract: "List real DRM devices (libdrm) and whether their drivers do SVM migration.",
        discussion: """
            Enumerates devices with libdrm's drmGetDevices2(), asks each driver for its name and \
            version with drmGetVersion(), and looks the driver up in SVMEmu's table of kernel SVM \
            support (nouveau, amdgpu/KFD, xe, ...). On a machine without /dev/dri it prints why the \
            list is empty and exits 0. With --json prints one object (Docs/json.md) whose results \
            are devices [...], driDirectoryPresent and message.
            """)

    @OptionGroup var output: JSONOutputOptions

    @OptionGroup var report: ReportFileOptions

    @Flag(name: .long, help: "Also print the notes of every driver's SVM entry.")
    var verbose = false

    func run() throws {
        let result = DRMDevices.enumerate()
        try printReport(result, json: output.json, text: Self.render(result, verbose: verbose))
    }

    /// The human-readable table.
    static func render(_ result: DRMEnumeration, verbose: Bool) -> String {
        var out = ""
        guard !result.devices.isEmpty else {
            out += result.message + "\n"
            return out
        }
        let headers = ["NODE", "RENDER", "BUS", "IDS", "DRIVER", "VERSION", "SVM MIGRATION"]
        var rows: [[String]] = []
        for d in result.devices {
            let bus: String
            switch d.busType {
            case .pci: bus = "pci " + (d.pciAddress?.description ?? "?")
            default: bus = d.busType.rawValue + (d.busDetail.map { " " + $0 } ?? "")
            }
            var ids = "-"
            if let p = d.pciIDs {
                ids = String(format: "%04x:%04x", p.vendorID, p.deviceID) + (p.vendorName.map { " " + $0 } ?? "")
            }
            rows.append([d.primaryNode ?? "-", d.renderNode ?? "-", bus, ids, d.driverName ?? "?",
                         d.driverVersion?.versionString ?? "-", d.svmMigration.level.rawValue])
        }
        out += Table.columns([headers] + rows) + "\n"
        for d in result.devices {
            let name = d.primaryNode ?? d.renderNode ?? "?"
            out += "\(name): \(d.driverName ?? "unknown driver")"
            if let v = d.driverVersion {
                out += " \(v.versionString) (\(v.date)) \(v.desc)"
            } else if let e = d.versionError {
                out += " (version unavailable: \(e))"
            }
            out += "\n"
            if let p = d.pciIDs { out += "  pci ids: \(p)\n" }
            out += "  svm: \(d.svmMigration.summary)\n"
            if verbose || d.svmMigration.migrates { out += "  notes: \(d.svmMigration.notes)\n" }
        }
        out += result.message + "\n"
        return out
    }
}
