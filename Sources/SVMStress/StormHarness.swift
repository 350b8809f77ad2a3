import Foundation
import MirrorDriver
import SVMEmu
import XeDriver
import Synchronization

/// The fault-storm harness: boots a machine, puts pages where the scenario
/// wants them, then for each page lets `threads` real threads meet at a
/// barrier and go at that page together, one page after the other.
///
/// Nothing here decides whether a storm livelocks. The harness only watches:
/// a page that has not completed within `stallSeconds` is reported as
/// livelocked, the threads are told to stop (each checks the stop flag
/// between single-fault access attempts, so none is kept by the kernel), and
/// the teardown checks that no reference or lock was left behind.
public enum StormHarness {

    /// Runs one storm against drivers built by `makeDriver` (a `MirrorDevice`
    /// by default). `progress` is called from the calling thread about ten
    /// times a second while the storm runs.
    /// With `settings.deterministic` the storm's threads and its watchdog run
    /// under a ``DeterministicScheduler`` seeded with `settings.seed` (or
    /// configured by `schedule`); `progress` is then called from the
    /// watchdog about ten times a second of host time, with virtual seconds.
    public static func run(_ settings: StormSettings,
                           makeDriver: StormDriverFactory? = nil,
                           schedule: DeterministicScheduler.Configuration? = nil,
                           progress: ((StormProgress) -> Void)? = nil) throws(StormError) -> StormResult {
        try settings.validate()
        let bytes = settings.pages * settings.pageSize.bytes
        let vram = Machine.roundUp(UInt64(bytes) + (16 << 20), to: 32 << 20)
        let factory = makeDriver ?? (settings.driver == .gpusvm ? XeDevice.stormFactory(vramBytes: vram)
                                                                : MirrorDevice.stormFactory(vramBytes: vram))

        var config = KernelConfiguration()
        config.nodeSizes = [Machine.nodeBytes(bytes * 2, slack: 32 << 20, minimum: 64 << 20)]
        config.deviceFaultPolicy = settings.faultPolicy
        config.transparentHugepage = settings.pageSize == .huge ? .madvise : .never
        config.addressSpaceSize = max(4 << 30, UInt64(bytes) * 4)
        config.maxPhysicalBytes = UInt64(config.nodeSizes[0]) + vram * UInt64(settings.devices) + (1 << 30)
        let machine: Machine
        do { machine = try Machine(booting: config, cpus: settings.deterministic ? settings.cpus : nil) } catch { throw .hostRefused(error) }
        let kernel = machine.kernel, mm = machine.mm
        var drivers: [any StormDriver] = []
        for i in 0..<settings.devices { drivers.append(machine.attach(try factory(kernel, mm, i))) }
        if settings.pageSize == .huge, !drivers.allSatisfy(\.supportsHugePages) {
            throw .hugePagesUnsupported("2 MiB storms need compound migration (issue 4): the driver does not migrate 2 MiB folios whole yet")
        }
        for d in drivers {
            guard d.mm.id == mm.id else { throw .setupFailed("the driver factory must bind drivers to the address space it is given") }
            d.prepare(for: settings)
        }

        let base: UInt64
        let checksums: [UInt64]
        do {
            if settings.pageSize == .huge {
                // 2 MiB aligned, so that every storm page can be one THP.
                let raw = try mm.mmap(length: bytes + PageGeometry.pmdSize)
                base = Machine.roundUp(raw, to: PageGeometry.pmdSize64)
                try mm.madvise(base, length: bytes, advice: .hugePage)
            } else {
                base = try mm.mmap(length: bytes)
            }
            try mm.fillPattern(base, length: bytes, seed: settings.seed)
            checksums = try StormRun.checksums(mm, base, basePages: settings.pages * settings.pageSize.basePages)
            if settings.scenario != .twoDevices {
                let total = settings.pages * settings.pageSize.basePages
                let moved = try drivers[0].migrateToDevice(base, pages: total)
                guard moved == total else { throw Errno.noEntry }
            }
        } catch {
            // The kernel's diagnostics say which limit was reached (VRAM, the physical layout).
            let said = kernel.diagnostics.suffix(2).map { "\n  kernel: \($0)" }.joined()
            throw .setupFailed("mapping, filling or migrating \(settings.pages) pages to the device: \(error)\(said)")
        }

        let run = StormRun(settings: settings, kernel: kernel, mm: mm, drivers: drivers, base: base, checksums: checksums)
        if settings.deterministic {
            // The setup thread's CPU goes back, so that the storm's threads find theirs.
            kernel.cpus.leave()
        }
        var result = settings.deterministic ? run.deterministicStorm(schedule: schedule, progress: progress)
                                            : run.storm(progress: progress)
        // The kernel audit, once every storm thread has left (else the pages
        // are still in use and nothing more can be judged).
        let audit = machine.finish(auditing: run.exited.load(ordering: .acquiring) == run.workers && result.deadlock == nil)
        if let audit, !audit.isClean {
            result.teardownIssues.append("kernel audit: \(audit)")
            result.teardownClean = false
        }
        return result
    }
}

/// One worker's state, for the watchdog's picture of a stall.
final class WorkerSlot: Sendable {
    static let starting = 0, atBarrier = 1, accessing = 2, exited = 3
    let state = Atomic<Int>(WorkerSlot.starting)
}

/// The shared state of one storm. Workers, the barrier's round action and the
/// watchdog (the calling thread) meet here; everything they share is atomic
/// or behind a lock.
final class StormRun: @unchecked Sendable {
    let settings: StormSettings
    let kernel: Kernel
    let mm: AddressSpace
    let drivers: [any StormDriver]
    let base: UInt64
    let pageBytes: Int
    let basePages: Int
    /// Threads that access the page (the storm's `threads`).
    let accessors: Int
    /// Accessors plus the GPU thread of the ping-pong storm.
    let workers: Int

    let stop = Atomic<Bool>(false)
    /// Pages completed; `declaredBit` set once the watchdog declared the
    /// next page stalled. A page completes and is declared by a
    /// compare-and-exchange on this one word, so exactly one of the two
    /// happens: the watchdog never blames a page that moved.
    let pagesDone = Atomic<Int>(0)
    static let declaredBit = 1 << 40
    /// When the page being worked on was opened (the clock of the storm;
    /// 0 until the first page opens): a stall is measured from here, never
    /// from the threads' start.
    let pageOpenedNanos = Atomic<UInt64>(0)
    let finishedOnPage = Atomic<Int>(0)
    let exited = Atomic<Int>(0)
    let deviceMigrations = Atomic<Int>(0)
    let pageStartCalls = Atomic<Int>(0)
    let pageStartRetries = Atomic<Int>(0)
    let records = LockedValue<[PageRecord]>([])
    let firstError = LockedValue<String?>(nil)
    let slots: [WorkerSlot]
    private var pageStartNanos: UInt64 = 0       // barrier action only
    private var pageStartMigrations = 0          // barrier action only
    private(set) var barrier: StormBarrier! = nil
    /// The second barrier of each page (``StormSettings/barrierAfterAccess``), nil without.
    private(set) var exitBarrier: StormBarrier? = nil
    /// The deterministic storm's scheduler and the virtual time its last
    /// worker left (written by emulated threads, one at a time).
    var scheduler: DeterministicScheduler? = nil
    var lastExitNanos: UInt64 = 0

    /// A checksum of every 4 KiB of the storm's pages, taken before the storm.
    let checksums: [UInt64]

    init(settings: StormSettings, kernel: Kernel, mm: AddressSpace, drivers: [any StormDriver], base: UInt64,
         checksums: [UInt64]) {
        self.settings = settings
        self.checksums = checksums
        self.kernel = kernel
        self.mm = mm
        self.drivers = drivers
        self.base = base
        pageBytes = settings.pageSize.bytes
        basePages = settings.pageSize.basePages
        accessors = settings.threads
        workers = settings.threads + (settings.scenario == .pingPong ? 1 : 0)
        slots = (0..<workers).map { _ in WorkerSlot() }
        records.withLock { $0.reserveCapacity(settings.pages) }
        barrier = StormBarrier(parties: workers, deterministic: settings.deterministic, release: settings.release) { [unowned self] round in
            self.closeAndOpen(round)
        }
        if settings.barrierAfterAccess {
            exitBarrier = StormBarrier(parties: workers, deterministic: settings.deterministic, release: settings.release) { _ in }
        }
    }

    func address(ofPage p: Int) -> UInt64 { base + UInt64(p) * UInt64(pageBytes) }
    var totalCalls: Int { drivers.reduce(0) { $0 + $1.migrateToRAMCalls } }
    var totalRetries: Int { Int(kernel.vmstat[.deviceFaultRetries]) }

    /// The barrier's round action, run by the last thread to arrive while the
    /// others wait: round r closes page r-1 and opens page r.
    private func closeAndOpen(_ round: Int) {
        let now = HostClock.nanos()
        let calls = totalCalls, retries = totalRetries, migrations = deviceMigrations.load(ordering: .relaxed)
        if round > 0 {
            // The watchdog declared this page stalled first: it stays the stalled page.
            guard pagesDone.compareExchange(expected: round - 1, desired: round, ordering: .acquiringAndReleasing).exchanged else { return }
            let kind = mm.entry(at: address(ofPage: round - 1)).entry.kind
            let record = PageRecord(page: round - 1,
                                    migrateToRAMCalls: calls - pageStartCalls.load(ordering: .relaxed),
                                    faultRetries: retries - pageStartRetries.load(ordering: .relaxed),
                                    deviceMigrations: migrations - pageStartMigrations,
                                    nanos: now - pageStartNanos,
                                    inRAMAtCompletion: kind == .present)
            records.withLock { $0.append(record) }
        }
        pageOpenedNanos.store(now, ordering: .relaxed)
        pageStartCalls.store(calls, ordering: .relaxed)
        pageStartRetries.store(retries, ordering: .relaxed)
        pageStartMigrations = migrations
        pageStartNanos = now
        finishedOnPage.store(0, ordering: .relaxed)
    }

    /// Stops every worker: the stop flag for those accessing, the barrier for
    /// those waiting at it.
    func abort() {
        stop.store(true, ordering: .relaxed)
        barrier.abort()
        exitBarrier?.abort()
    }

    func fail(_ message: String) {
        firstError.withLock { if $0 == nil { $0 = message } }
        abort()
    }

    // MARK: workers

    func worker(_ index: Int) {
        let slot = slots[index]
        defer {
            slot.state.store(WorkerSlot.exited, ordering: .relaxed)
            if settings.deterministic { lastExitNanos = max(lastExitNanos, HostClock.nanos()) }
            exited.add(1, ordering: .releasing)
        }
        let isGPU = index >= accessors
        for round in 0...settings.pages {
            slot.state.store(WorkerSlot.atBarrier, ordering: .relaxed)
            guard barrier.arriveAndWait(), round < settings.pages, !stop.load(ordering: .relaxed) else { return }
            slot.state.store(WorkerSlot.accessing, ordering: .relaxed)
            let page = address(ofPage: round)
            if isGPU {
                gpuMigrateBack(page)
                continue
            }
            let ok: Bool
            switch settings.scenario {
            case .readers, .pingPong: ok = cpuAccess(page, thread: index, write: false)
            case .writers: ok = cpuAccess(page, thread: index, write: true)
            case .twoDevices: ok = raceToDevice(page, thread: index, driver: drivers[index % drivers.count])
            }
            guard ok else { return }
            finishedOnPage.add(1, ordering: .relaxed)
            if let exit = exitBarrier, !exit.arriveAndWait() { return }
        }
    }

    /// One thread's access to the page, in single-fault attempts so that the
    /// stop flag is seen between faults (a signal would do that in a real process).
    private func cpuAccess(_ page: UInt64, thread: Int, write: Bool) -> Bool {
        let address = page + UInt64((thread * 64) % pageBytes)
        while !stop.load(ordering: .relaxed) {
            do {
                let r: UInt64? = try mm.withPageBytes(at: address, write: write, faultLimit: 1) { p in
                    let v = p.load(as: UInt64.self)
                    if write { p.storeBytes(of: v, as: UInt64.self) }  // a store that keeps the pattern
                    return v
                }
                if r != nil { return true }
            } catch {
                fail("thread \(thread): \(write ? "write" : "read") at 0x\(String(address, radix: 16)) failed: \(error)")
                return false
            }
        }
        return false
    }

    /// The ping-pong GPU: while readers still need the page, migrate it back to
    /// device memory whenever it is in RAM.
    private func gpuMigrateBack(_ page: UInt64) {
        let driver = drivers[0]
        while finishedOnPage.load(ordering: .relaxed) < accessors && !stop.load(ordering: .relaxed) {
            guard mm.entry(at: page).entry.kind == .present else {
                HostThread.yield()
                continue
            }
            if (try? driver.migrateToDevice(page, pages: basePages)) == basePages {
                deviceMigrations.add(1, ordering: .relaxed)
            }
        }
    }

    /// Two devices want the page: migrate it to this thread's device; if the
    /// other device holds it, touch it from the CPU (its `migrateToRAM` brings
    /// it back) and try again, as an SVM driver evicts foreign device pages
    /// before migrating them to its own VRAM.
    private func raceToDevice(_ page: UInt64, thread: Int, driver: any StormDriver) -> Bool {
        while !stop.load(ordering: .relaxed) {
            let before = mm.entry(at: page).entry.kind
            do {
                if try driver.migrateToDevice(page, pages: basePages) == basePages {
                    if before != .devicePrivate { deviceMigrations.add(1, ordering: .relaxed) }
                    return true
                }
            } catch .noEntry {
                do {
                    _ = try mm.withPageBytes(at: page, write: false, faultLimit: 1) { $0.load(as: UInt8.self) }
                } catch {
                    fail("thread \(thread): CPU touch at 0x\(String(page, radix: 16)) failed: \(error)")
                    return false
                }
            } catch {
                fail("thread \(thread): migration to device \(thread % drivers.count) failed: \(error)")
                return false
            }
        }
        return false
    }
}
