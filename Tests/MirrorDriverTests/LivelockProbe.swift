import Testing
import Foundation
import SVMEmu
import MirrorDriver

@Suite("probe")
struct LivelockProbe {
    @Test(arguments: [DeviceFaultPolicy.legacy, .trylock, .trylockWait])
    func eightThreadsOnePage(policy: DeviceFaultPolicy) throws {
        let (kernel, mm, device) = bootMachine(policy: policy)
        var s = device.settings
        s.driverLock = .exclusive
        s.migrateToRAMWorkNanos = 50_000
        device.settings = s
        let pages = 8
        let base = try mm.mmap(length: pages * 4096)
        try mm.fillPattern(base, length: pages * 4096, seed: 3)
        try device.migrateToDevice(base, pages: pages)
        let stop = Atomic<Bool>(false)
        let done = Atomic<Int>(0)
        let start = Date()
        for p in 0..<pages {
            let addr = base + UInt64(p) * 4096
            let ready = Atomic<Int>(0)
            let threads = (0..<8).map { _ in Thread {
                ready.add(1, ordering: .relaxed)
                while ready.load(ordering: .relaxed) < 8 {}
                while !stop.load(ordering: .relaxed) {
                    // one access attempt; the fault path retries internally, so bound via stop
                    if (try? mm.load64(addr)) != nil { break }
                }
                done.add(1, ordering: .relaxed)
            } }
            threads.forEach { $0.start() }
            let deadline = Date().addingTimeInterval(2)
            while done.load(ordering: .relaxed) < (p + 1) * 8 && Date() < deadline { usleep(1000) }
            if done.load(ordering: .relaxed) < (p + 1) * 8 { break }
        }
        let finished = done.load(ordering: .relaxed)
        stop.store(true, ordering: .relaxed)
        print("policy \(policy): finished \(finished)/\(pages*8) in \(Date().timeIntervalSince(start))s, migrateToRAM calls \(device.migrateToRAMCalls), retries \(kernel.vmstat[.deviceFaultRetries])")
    }
}
import Synchronization
