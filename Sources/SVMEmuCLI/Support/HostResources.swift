// What the host has: cores and memory (for the memory check and the JSON `host`).
import SVMEmu
#if canImport(Glibc)
import Glibc
#endif

/// The host's cores and memory, read from /proc/meminfo (sysconf's page
/// counts where /proc is not mounted).
public enum HostResources {
    /// Online cores.
    ///
    /// The corresponding C function is `sysconf(_SC_NPROCESSORS_ONLN)`.
    public static var cores: Int { max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))) }

    /// Memory a new process can use without swapping: `MemAvailable` of
    /// /proc/meminfo, or the free pages sysconf reports (which leaves out
    /// reclaimable caches); nil if neither answers.
    ///
    /// The corresponding C function (fallback) is `sysconf(_SC_AVPHYS_PAGES)`.
    public static func availableBytes() -> Int? {
        if let text = readMeminfo(), let kib = meminfoField("MemAvailable", in: text) { return kib * ByteSize.kib }
        return pagesInBytes(Int32(_SC_AVPHYS_PAGES))
    }

    /// Physical memory: `MemTotal` of /proc/meminfo, or sysconf's page count.
    ///
    /// The corresponding C function (fallback) is `sysconf(_SC_PHYS_PAGES)`.
    public static func totalBytes() -> Int? {
        if let text = readMeminfo(), let kib = meminfoField("MemTotal", in: text) { return kib * ByteSize.kib }
        return pagesInBytes(Int32(_SC_PHYS_PAGES))
    }

    static func pagesInBytes(_ name: Int32) -> Int? {
        let pages = sysconf(name), size = sysconf(Int32(_SC_PAGESIZE))
        return pages > 0 && size > 0 ? pages * size : nil
    }

    /// The value in kB of a /proc/meminfo line `Name:   12345 kB`, or nil.
    public static func meminfoField(_ name: String, in text: String) -> Int? {
        for line in text.split(separator: "\n") where line.hasPrefix(name + ":") {
            let fields = line.dropFirst(name.count + 1).split(separator: " ")
            return fields.first.flatMap { Int($0) }
        }
        return nil
    }

    /// Refuses a run that needs more memory than is available.
    ///
    /// - Parameters:
    ///   - needed: bytes the run will touch (the command's own estimate).
    ///   - available: bytes available (`availableBytes()`); nil skips the check.
    ///   - what: the run, as the user asked for it ("svmemu overhead --size 16G").
    /// - Throws: `CLIError.notEnoughMemory` with both figures.
    public static func checkMemory(needed: Int, available: Int?, for what: String) throws(CLIError) {
        guard let available, needed > available else { return }
        throw .notEnoughMemory("\(what) needs about \(ByteSize.describe(needed)) of memory; "
                               + "\(ByteSize.describe(available)) is available (MemAvailable). Ask for a smaller size.")
    }

    static func readMeminfo() -> String? { GitCheckout.readFile("/proc/meminfo").flatMap { $0.isEmpty ? nil : $0 } }
}
