// A fake device for the nouveau front end: page bytes in Swift arrays, moved
// between a "system" and a "vram" dictionary.
import SVMDRM
import SVMEmu
import Synchronization

final class FakeNouveauDevice: NouveauSVMBackend {
    struct State {
        var vmas: [Range<UInt64>] = []
        var system: [UInt64: [UInt8]] = [:]
        var vram: [UInt64: [UInt8]] = [:]
        /// Pages whose migration fails (like a pinned page migrate_vma skips).
        var failing: [UInt64: Errno] = [:]
        var lockDepth = 0
        var lockAcquisitions = 0
        var backendCallsOutsideLock = 0
        var initCalls: [(UInt64, UInt64)] = []
        var initError: Errno?
        var migrateCalls: [(Range<UInt64>, Bool)] = []
    }

    let state = LockedValue(State())
    let supportsSVM: Bool
    let hasAddressSpace: Bool
    let pageSize = PageGeometry.pageSize64

    init(supportsSVM: Bool = true, hasAddressSpace: Bool = true) {
        self.supportsSVM = supportsSVM
        self.hasAddressSpace = hasAddressSpace
    }

    /// Maps `[start, end)` and fills each page with a pattern derived from its address.
    func map(_ range: Range<UInt64>) {
        state.withLock { s in
            s.vmas.append(range)
            s.vmas.sort { $0.lowerBound < $1.lowerBound }
            var a = range.lowerBound
            while a < range.upperBound {
                s.system[a] = Self.pattern(page: a, size: Int(pageSize))
                a += pageSize
            }
        }
    }

    static func pattern(page: UInt64, size: Int) -> [UInt8] {
        (0..<size).map { i in UInt8(truncatingIfNeeded: (page >> PageGeometry.pageShift) &* 31 &+ UInt64(i) &* 7 &+ 1) }
    }

    func svmInit(unmanagedAddress: UInt64, unmanagedSize: UInt64) throws(Errno) {
        let error: Errno? = state.withLock { s in
            s.initCalls.append((unmanagedAddress, unmanagedSize))
            return s.initError
        }
        if let error { throw error }
    }

    func withMmapReadLock<R>(_ body: () -> R) -> R {
        state.withLock { $0.lockDepth += 1; $0.lockAcquisitions += 1 }
        defer { state.withLock { $0.lockDepth -= 1 } }
        return body()
    }

    func findVMAIntersection(start: UInt64, end: UInt64) -> Range<UInt64>? {
        state.withLock { s in
            if s.lockDepth == 0 { s.backendCallsOutsideLock += 1 }
            return s.vmas.first { $0.lowerBound < end && start < $0.upperBound }
        }
    }

    func migrate(start: UInt64, end: UInt64, toDevice: Bool) throws(Errno) -> Int {
        let result: Result<Int, Errno> = state.withLock { s in
            if s.lockDepth == 0 { s.backendCallsOutsideLock += 1 }
            s.migrateCalls.append((start..<end, toDevice))
            guard start % pageSize == 0, end % pageSize == 0, start < end,
                  s.vmas.contains(where: { $0.lowerBound <= start && end <= $0.upperBound }) else {
                return .failure(.invalidArgument)
            }
            var moved = 0
            var firstError: Errno?
            var a = start
            while a < end {
                defer { a += pageSize }
                if let e = s.failing[a] { firstError = firstError ?? e; continue }
                if toDevice, let bytes = s.system.removeValue(forKey: a) {
                    s.vram[a] = bytes; moved += 1
                } else if !toDevice, let bytes = s.vram.removeValue(forKey: a) {
                    s.system[a] = bytes; moved += 1
                }
            }
            if moved == 0, let firstError { return .failure(firstError) }
            return .success(moved)
        }
        return try result.get()
    }
}
