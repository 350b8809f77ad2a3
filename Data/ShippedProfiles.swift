// The machine profiles that ship with the package (Data/profiles/*.json)
// and the kernel rig's results (Data/kernel/livelock.json),
// copied next to the built products as SwiftPM resources. SVMStress's
// `MachineProfile` reads them; nothing else belongs in this target.
import Foundation

/// Where the shipped profiles are.
public enum ShippedProfiles {
    /// The bundle's name next to the built products (`<package>_<target>.resources`).
    static let bundleName = "SVMEmu_SVMProfiles.resources"

    /// The folder holding the shipped `*.json` profiles, or nil when the
    /// resource bundle is not next to the binary (a binary copied out of its
    /// build folder). Looked up by hand rather than through `Bundle.module`,
    /// whose accessor traps when the bundle is missing.
    public static var directory: URL? {
        var candidates: [URL] = [Bundle.main.bundleURL]
        if let exe = Bundle.main.executableURL?.resolvingSymlinksInPath() {
            candidates.append(exe.deletingLastPathComponent())
        }
        if let path = CommandLine.arguments.first, path.contains("/") {
            candidates.append(URL(fileURLWithPath: path).resolvingSymlinksInPath().deletingLastPathComponent())
        }
        for base in candidates {
            let dir = base.appendingPathComponent(bundleName).appendingPathComponent("profiles")
            var isDirectory: ObjCBool = false
            if FileManager.default.fileExists(atPath: dir.path, isDirectory: &isDirectory), isDirectory.boolValue {
                return dir
            }
        }
        return nil
    }

    /// A shipped data file other than a profile (`kernel/livelock.json`: the
    /// kernel rig's results), or nil when the resource bundle is not found.
    public static func dataFile(_ relativePath: String) -> URL? {
        guard let dir = directory else { return nil }
        let url = dir.deletingLastPathComponent().appendingPathComponent(relativePath)
        return FileManager.default.fileExists(atPath: url.path) ? url : nil
    }

    /// The shipped profiles' file names without `.json`, sorted.
    public static var names: [String] {
        guard let dir = directory,
              let files = try? FileManager.default.contentsOfDirectory(atPath: dir.path) else { return [] }
        return files.filter { $0.hasSuffix(".json") }.map { String($0.dropLast(5)) }.sorted()
    }

    /// The file of the shipped profile `name` (file name without `.json`), or nil.
    public static func url(named name: String) -> URL? {
        guard let dir = directory, names.contains(name) else { return nil }
        return dir.appendingPathComponent(name + ".json")
    }
}
