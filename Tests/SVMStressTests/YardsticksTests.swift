import SVMEmu
import SVMStress
import Testing

@Suite("yardsticks: the memcpy baselines")
struct YardsticksTests {

    @Test("copies every byte there and back and reports the best round")
    func copiesAndReports() throws {
        let bytes = 4 << 20
        let r = try #require(MemcpyBaseline.measure(bytes: bytes, rounds: 2, seed: 0xfeed),
                             "the pattern must survive both copies")
        #expect(r.bytes == bytes)
        #expect(r.bestSeconds > 0 && r.bestSeconds.isFinite)
        #expect(r.gigabytesPerSecond == Double(2 * bytes) / r.bestSeconds / 1e9)
    }

    @Test("rounds interleaved with other work keep the best and the bytes")
    func interleavedRounds() throws {
        let m = MemcpyBaseline(bytes: 1 << 20, seed: 7)
        #expect(m.bestSeconds == .infinity, "the warm-up round is not counted")
        var times: [Double] = []
        for _ in 0..<3 {
            times.append(m.round())
            // Other work between rounds (a benchmark's migration) must not disturb it.
            _ = MemcpyBaseline.measure(bytes: 64 << 10, rounds: 1)
        }
        #expect(m.bestSeconds == times.min())
        #expect(m.verify())
    }

    @Test("frames reserved for the baseline are writable, zero-filled and lazily backed")
    func reserveFrames() throws {
        let bytes = 8 << 20
        let p = Kernel.reserveFrames(bytes: bytes)
        defer { Kernel.releaseFrames(p, bytes: bytes) }
        #expect(p.load(fromByteOffset: bytes - 8, as: UInt64.self) == 0)
        p.storeBytes(of: 0x1234_5678, toByteOffset: bytes - 8, as: UInt64.self)
        #expect(p.load(fromByteOffset: bytes - 8, as: UInt64.self) == 0x1234_5678)
    }

    @Test("the chunked copy and the cache-hot 4 KiB copy give finite, positive figures")
    func singleFigures() throws {
        let gbps = Yardsticks.chunkedCopyGBps(granule: 4096, bytes: 1 << 20)
        let streamed = Yardsticks.chunkedCopyGBps(granule: 4096, bytes: 1 << 20, streaming: true)
        #expect(gbps > 0 && gbps.isFinite)
        #expect(streamed > 0 && streamed.isFinite)
        let nanos = Yardsticks.Memcpy4K().round(copies: 1000)
        #expect(nanos > 0 && nanos.isFinite)
    }
}
