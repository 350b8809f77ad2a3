// The yardstick every migration throughput is reported against: memcpy of the
// same bytes, in the same run, between host buffers backed like emulated RAM
// and VRAM.

import CSVMSupport
import SVMEmu

/// memcpy of `bytes` there and back (A -> B, then B -> A) between two buffers
/// from `Kernel.reserveFrames` (host huge pages where the host allows, like the
/// emulated frames a migration copies between), filled with a pattern.
///
/// Both copies really happen: an optimiser that sees `memcpy(b, a)` followed by
/// `memcpy(a, b)` may drop the second (a is unchanged by it), and one that
/// knows a's contents may turn both into a memset. A compiler barrier between
/// the copies stops both, and the bytes are checked after the timed rounds.
public struct MemcpyBaseline: Sendable {
    /// Bytes per direction.
    public let bytes: Int
    /// Best round: the seconds for both copies.
    public let seconds: Double

    /// Throughput counted like a migration round trip: `2 * bytes` over the time.
    public var gigabytesPerSecond: Double { Double(2 * bytes) / seconds / 1e9 }

    /// Runs one untimed warm-up round then `rounds` timed ones, keeping the best.
    /// Returns nil when the bytes differ afterwards (a broken copy, not a figure).
    public static func measure(bytes: Int, rounds: Int, seed: UInt64 = 0x5eed) -> MemcpyBaseline? {
        precondition(bytes > 0 && bytes & 63 == 0, "MemcpyBaseline: bytes must be a positive multiple of 64")
        let a = Kernel.reserveFrames(bytes: bytes)
        let b = Kernel.reserveFrames(bytes: bytes)
        defer {
            Kernel.releaseFrames(a, bytes: bytes)
            Kernel.releaseFrames(b, bytes: bytes)
        }
        fill(a, bytes: bytes, seed: seed)
        svm_memset(b, 0xa5, bytes)
        var best = Double.infinity
        for round in 0...max(1, rounds) {
            svm_escape(a)
            svm_escape(b)
            let t0 = svm_now_ns()
            svm_memcpy(b, a, bytes)
            svm_escape(b)
            svm_memcpy(a, b, bytes)
            svm_escape(a)
            let t1 = svm_now_ns()
            if round > 0 { best = min(best, Double(t1 - t0) / 1e9) }
        }
        guard check(a, bytes: bytes, seed: seed), check(b, bytes: bytes, seed: seed) else { return nil }
        return MemcpyBaseline(bytes: bytes, seconds: best)
    }

    static func word(_ i: Int, _ seed: UInt64) -> UInt64 {
        var x = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 ^ seed
        x ^= x >> 29
        return x &* 0xBF58_476D_1CE4_E5B9
    }

    static func fill(_ p: UnsafeMutableRawPointer, bytes: Int, seed: UInt64) {
        let w = p.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(bytes >> 3) { w[i] = word(i, seed) }
    }

    static func check(_ p: UnsafeMutableRawPointer, bytes: Int, seed: UInt64) -> Bool {
        let w = p.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(bytes >> 3) where w[i] != word(i, seed) { return false }
        return true
    }
}
