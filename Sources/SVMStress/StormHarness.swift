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
        let vram = roundUp(UInt64(bytes) + (16 << 20), to: 32 << 20)
        let factory = makeDriver ?? (settings.driver == .gpusvm ? XeDevice.stormFactory(vramBytes: vram)
                                                                : MirrorDevice.stormFactory(vramBytes: vram))

        var config = KernelConfiguration()
        let node = Int(roundUp(UInt64(bytes) * 2 + (32 << 20), to: PageGeometry.pmdSize64))
        config.nodeSizes = [max(64 << 20, node)]
        config.deviceFaultPolicy = settings.faultPolicy
        config.transparentHugepage = settings.pageSize == .huge ? .madvise : .never
        config.addressSpaceSize = max(4 << 30, UInt64(bytes) * 4)
        config.maxPhysicalBytes = UInt64(config.nodeSizes[0]) + vram * UInt64(settings.devices) + (1 << 30)
        if settings.deterministic { config.cpus = settings.cpus }
        let kernel: Kernel
        do { kernel = try Kernel(booting: config) } catch { throw .hostRefused(error) }
        let mm = AddressSpace(kernel: kernel)
        var drivers: [any StormDriver] = []
        for i in 0..<settings.devices { drivers.append(try factory(kernel, mm, i)) }
        if settings.pageSize == .huge, !drivers.allSatisfy(\.supportsHugePages) {
            throw .hugePagesUnsupported("2 MiB storms need compound migration (issue 4): the driver does not migrate 2 MiB folios whole yet")
        }
        for d in drivers {
            guard d.mm === mm else { throw .setupFailed("the driver factory must bind drivers to the address space it is given") }
            d.prepare(for: settings)
        }

        let base: UInt64
        let checksums: [UInt64]
        do {
            if settings.pageSize == .huge {
                // 2 MiB aligned, so that every storm page can be one THP.
                let raw = try mm.mmap(length: bytes + PageGeometry.pmdSize)
                base = roundUp(raw, to: PageGeometry.pmdSize64)
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
            return run.deterministicStorm(schedule: schedule, progress: progress)
        }
        return run.storm(progress: progress)
    }

    static func roundUp(_ v: UInt64, to m: UInt64) -> UInt64 { (v + m - 1) / m * m }
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
    }

    func fail(_ message: String) {
        firstError.withLock { if $0 == nil { $0 = message } }
        abort()
    }

    // MARK: workers

    private func worker(_ index: Int) {
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

    // MARK: the watchdog and teardown

    /// The watchdog's view of progress: the page being worked on, and since
    /// when it has been (the later of its opening and the last change the
    /// watchdog saw).
    struct Watch {
        var lastDone = 0
        var lastChange: UInt64

        /// Updates the view at `now`; returns the pages done.
        mutating func observe(_ run: StormRun, now: UInt64) -> Int {
            let done = run.pagesDone.load(ordering: .acquiring) & (StormRun.declaredBit - 1)
            if done != lastDone {
                lastDone = done
                lastChange = now
            }
            return done
        }

        /// How long page `lastDone` has been worked on without completing;
        /// 0 before the first page opened (threads still starting).
        func quiet(_ run: StormRun, now: UInt64) -> UInt64 {
            let opened = run.pageOpenedNanos.load(ordering: .relaxed)
            guard opened != 0 else { return 0 }
            let since = max(lastChange, opened)
            return now > since ? now - since : 0
        }
    }

    /// What one look of the watchdog saw.
    enum Look {
        /// `done` pages completed; the current one has been worked on for
        /// `quiet` nanoseconds without completing.
        case running(done: Int, quiet: UInt64)
        /// The current page stalled past the window and is declared: the run stops.
        case stalled(StallReport)
        /// The current page stalled, but completed while it was being sampled.
        case raced
    }

    /// One look of the watchdog at `now`: observes the pages done and, when
    /// the current page has been quiet for `stallNanos`, samples it and
    /// declares it stalled unless it completed meanwhile. Both watchdogs
    /// (real threads and the deterministic one) look the same way.
    func look(_ watch: inout Watch, now: UInt64, stallNanos: UInt64, calls0: Int) -> Look {
        let done = watch.observe(self, now: now)
        let quiet = watch.quiet(self, now: now)
        guard done < settings.pages && quiet >= stallNanos else { return .running(done: done, quiet: quiet) }
        // Sampling takes a while: the page may complete meanwhile.
        let report = sampleStall(page: done, quietNanos: quiet, calls0: calls0)
        return declare(page: done) ? .stalled(report) : .raced
    }

    /// Declares page `page` stalled unless it completed meanwhile: the same
    /// compare-and-exchange that completes a page, so exactly one wins.
    func declare(page: Int) -> Bool {
        pagesDone.compareExchange(expected: page, desired: page | StormRun.declaredBit, ordering: .acquiringAndReleasing).exchanged
    }

    func storm(progress: ((StormProgress) -> Void)?) -> StormResult {
        let calls0 = totalCalls, retries0 = totalRetries
        let stallNanos = UInt64(settings.stallSeconds * 1e9)
        let start = HostClock.nanos()
        for i in 0..<workers {
            let t = Thread { [self] in worker(i) }
            t.name = "storm-\(i)"
            t.start()
        }
        var watch = Watch(lastChange: start)
        var lastReport: UInt64 = 0
        var stall: StallReport? = nil
        var end = start
        while exited.load(ordering: .acquiring) < workers {
            HostClock.sleep(nanos: 2_000_000)
            if stop.load(ordering: .relaxed) { break }
            let now = HostClock.nanos()
            let seen = look(&watch, now: now, stallNanos: stallNanos, calls0: calls0)
            if case .stalled(let report) = seen {
                stall = report
                abort()
                break
            }
            guard case .running(let done, let quiet) = seen else { continue }
            if let progress, now - lastReport >= 100_000_000 {
                lastReport = now
                progress(StormProgress(pagesDone: done, pages: settings.pages, migrateToRAMCalls: totalCalls - calls0,
                                       faultRetries: totalRetries - retries0, seconds: Double(now - start) / 1e9,
                                       secondsSinceProgress: Double(quiet) / 1e9))
            }
        }
        end = HostClock.nanos()
        let finalCalls = totalCalls - calls0, finalRetries = totalRetries - retries0

        // Teardown: every thread must leave within the join timeout.
        let deadline = HostClock.nanos() + UInt64(settings.joinTimeoutSeconds * 1e9)
        while exited.load(ordering: .acquiring) < workers && HostClock.nanos() < deadline { HostClock.sleep(nanos: 1_000_000) }
        let left = exited.load(ordering: .acquiring)
        if let progress {
            let done = pagesDone.load(ordering: .acquiring) & (StormRun.declaredBit - 1)
            progress(StormProgress(pagesDone: done, pages: settings.pages, migrateToRAMCalls: finalCalls,
                                   faultRetries: finalRetries, seconds: Double(end - start) / 1e9, secondsSinceProgress: 0))
        }
        var issues = teardownIssues(threadsLeft: left)
        var dataIntact = false
        if left == workers {
            // Single-threaded now: faults bring every device page back. Each
            // read is bounded too, so a page that cannot come back ends the check
            // instead of hanging it.
            let (intact, problems) = verifyChecksums()
            dataIntact = intact
            issues += problems
        }

        return Self.result(settings, pages: records.withLock { $0 }, stall: stall, calls: finalCalls, retries: finalRetries,
                      deviceMigrations: deviceMigrations.load(ordering: .relaxed), nanos: end - start,
                      issues: issues, dataIntact: dataIntact, error: firstError.withLock { $0 })
    }

    /// The figures of a finished storm, real or deterministic.
    static func result(_ settings: StormSettings, pages: [PageRecord], stall: StallReport?, calls total: Int,
                       retries: Int, deviceMigrations: Int, nanos: UInt64, issues: [String], dataIntact: Bool,
                       error: String?) -> StormResult {
        let calls = StormDistribution(pages.map(\.migrateToRAMCalls))
        return StormResult(
            settings: settings,
            pagesMigrated: pages.count,
            livelocked: stall != nil,
            stalledPage: stall?.page,
            stall: stall,
            migrateToRAMCalls: CallStats(total: total, perPageMean: calls.mean, perPageP50: calls.p50,
                                         perPageP99: calls.p99, perPageMax: calls.max),
            faultRetries: retries,
            faultRetriesPerPage: StormDistribution(pages.map(\.faultRetries)),
            pageMicros: StormDistribution(pages.map { Double($0.nanos) / 1000 }),
            deviceMigrations: deviceMigrations,
            seconds: Double(nanos) / 1e9,
            teardownClean: issues.isEmpty,
            teardownIssues: issues,
            dataIntact: dataIntact,
            error: error,
            perPage: pages)
    }

    /// The storm under a deterministic scheduler: the workers and the watchdog
    /// are its emulated threads; the stall window is virtual time.
    func deterministicStorm(schedule: DeterministicScheduler.Configuration?,
                            progress: ((StormProgress) -> Void)? = nil) -> StormResult {
        var config = schedule ?? DeterministicScheduler.Configuration(seed: settings.seed)
        if schedule == nil { config.preemptions = settings.preemptions }
        // The storm's threads share the machine's CPUs (more threads than CPUs queue).
        if config.cpus == nil { config.cpus = settings.cpus }
        if let machine = settings.machine {
            machine.apply(to: &config)
        }
        config.hostTimeoutSeconds = max(config.hostTimeoutSeconds, settings.joinTimeoutSeconds)
        let scheduler = DeterministicScheduler(config)
        self.scheduler = scheduler
        let calls0 = totalCalls, retries0 = totalRetries
        let stallNanos = UInt64(settings.stallSeconds * 1e9)
        let hostStart = HostClock.hostNanos()
        for i in 0..<workers {
            scheduler.spawn(i < accessors ? "cpu\(i)" : "gpu") { [self] in worker(i) }
        }
        let watch = LockedValue<(stall: StallReport?, start: UInt64, end: UInt64)>((nil, 0, 0))
        // Called only from the watchdog, one emulated thread at a time.
        nonisolated(unsafe) let progress = progress
        scheduler.spawn("watchdog", observer: true) { [self] in
            let start = HostClock.nanos()
            var view = Watch(lastChange: start)
            var stall: StallReport? = nil
            // Progress goes out in host time (what the user waits), never
            // feeding back into the schedule.
            var lastReport = HostClock.hostNanos()
            while exited.load(ordering: .acquiring) < workers && !stop.load(ordering: .relaxed) {
                HostClock.sleep(nanos: 2_000_000)
                let now = HostClock.nanos()
                let seen = look(&view, now: now, stallNanos: stallNanos, calls0: calls0)
                if case .stalled(let report) = seen {
                    stall = report
                    abort()
                    break
                }
                guard case .running(let done, let quiet) = seen else { continue }
                if let progress, HostClock.hostNanos() - lastReport >= 100_000_000 {
                    lastReport = HostClock.hostNanos()
                    progress(StormProgress(pagesDone: done, pages: settings.pages, migrateToRAMCalls: totalCalls - calls0,
                                           faultRetries: totalRetries - retries0, seconds: Double(now - start) / 1e9,
                                           secondsSinceProgress: Double(quiet) / 1e9))
                }
            }
            // The last picture, whatever the host time: a run shorter than
            // the report interval still shows where it ended.
            if let progress {
                let now = HostClock.nanos()
                let done = min(pagesDone.load(ordering: .acquiring) & (StormRun.declaredBit - 1), settings.pages)
                progress(StormProgress(pagesDone: done, pages: settings.pages, migrateToRAMCalls: totalCalls - calls0,
                                       faultRetries: totalRetries - retries0, seconds: Double(now - start) / 1e9,
                                       secondsSinceProgress: Double(now - min(now, view.lastChange)) / 1e9))
            }
            let end = exited.load(ordering: .acquiring) == workers ? lastExitNanos : HostClock.nanos()
            watch.withLock { $0 = (stall, start, end) }
        }
        let outcome = scheduler.run()
        let hostEnd = HostClock.hostNanos()
        let (stall, vStart, vEnd) = watch.withLock { $0 }
        var deadlock: String? = nil
        var issues: [String] = []
        var dataIntact = false
        switch outcome {
        case .completed:
            issues = teardownIssues(threadsLeft: exited.load(ordering: .acquiring))
            if issues.isEmpty || exited.load(ordering: .acquiring) == workers {
                let (intact, problems) = verifyChecksums()
                dataIntact = intact
                issues += problems
            }
        case .deadlock(let report):
            deadlock = report.description
            issues = ["deadlock: \(report.description)"]
        case .hostTimeout:
            issues = ["the deterministic run took more than \(config.hostTimeoutSeconds) s of host time"]
        }
        var result = Self.result(settings, pages: records.withLock { $0 }, stall: stall, calls: totalCalls - calls0,
                                         retries: totalRetries - retries0,
                                         deviceMigrations: deviceMigrations.load(ordering: .relaxed),
                                         nanos: hostEnd - hostStart, issues: issues, dataIntact: dataIntact,
                                         error: firstError.withLock { $0 })
        result.virtualSeconds = vEnd >= vStart ? Double(vEnd - vStart) / 1e9 : 0
        result.scheduleSteps = scheduler.steps
        if config.cpus != nil { result.contextSwitches = scheduler.contextSwitches }
        result.stepsPerSecond = scheduler.stepsPerSecond
        result.deadlock = deadlock
        result.scheduleLog = scheduler.stepLog
        return result
    }

    /// Checksums of `basePages` 4 KiB pages from `base`, read through the CPU
    /// access path (no fault expected: the pages were just written).
    static func checksums(_ mm: AddressSpace, _ base: UInt64, basePages: Int) throws(Errno) -> [UInt64] {
        var sums = [UInt64](repeating: 0, count: basePages)
        for i in 0..<basePages {
            sums[i] = try mm.withPageBytes(at: base + UInt64(i) << PageGeometry.pageShift, write: false) { checksum($0) }
        }
        return sums
    }

    static func checksum(_ p: UnsafeMutableRawPointer) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for w in 0..<PageGeometry.pageSize / 8 {
            h = (h ^ p.load(fromByteOffset: w << 3, as: UInt64.self)) &* 0x0000_0100_0000_01b3
        }
        return h
    }

    /// Reads every 4 KiB back (at most `limit` faults each) and compares it
    /// with the checksum taken before the storm.
    private func verifyChecksums(limit: Int = 2000) -> (Bool, [String]) {
        var problems: [String] = []
        var stuck = 0
        for (i, expected) in checksums.enumerated() {
            let address = base + UInt64(i) << PageGeometry.pageShift
            let page = i / basePages
            do {
                guard let sum = try mm.withPageBytes(at: address, write: false, faultLimit: limit, { StormRun.checksum($0) }) else {
                    problems.append("data: page \(page) (0x\(String(address, radix: 16))) did not come back to RAM in \(limit) faults after the storm")
                    stuck += 1
                    if stuck >= 3 { problems.append("data: check abandoned"); break }
                    continue
                }
                if sum != expected {
                    problems.append("data: page \(page) (0x\(String(address, radix: 16))) differs from the bytes written before the storm")
                    if problems.count >= 8 { break }
                }
            } catch {
                problems.append("data: reading page \(page) after the storm failed: \(error)")
                break
            }
        }
        return (problems.isEmpty, problems)
    }

    /// Samples the stalled page and the threads a few times over ~20 ms and
    /// keeps the sample with the most references beyond the page's mappings.
    private func sampleStall(page: Int, quietNanos: UInt64, calls0: Int) -> StallReport {
        let address = address(ofPage: page)
        var best: StallReport? = nil
        for _ in 0..<20 {
            let e = mm.entry(at: address).entry
            var ref: Int? = nil, map: Int? = nil, locked: Bool? = nil
            if e.kind == .present || e.kind == .devicePrivate || e.kind == .migration {
                let folio = kernel.pfnToPage(e.pfn).folio
                ref = folio.refCount
                map = folio.mapCount
                locked = folio.isLocked
            }
            var accessing = 0, atBarrier = 0
            for s in slots {
                switch s.state.load(ordering: .relaxed) {
                case WorkerSlot.accessing: accessing += 1
                case WorkerSlot.atBarrier: atBarrier += 1
                default: break
                }
            }
            let probes = drivers.compactMap(\.driverLockProbe)
            let waiting = probes.isEmpty ? nil : probes.reduce(0) { $0 + $1.waiting }
            let holding = probes.isEmpty ? nil : probes.reduce(0) { $0 + $1.holding }
            let extra = ref.flatMap { r in map.map { r - $0 } }
            let sample = StallReport(
                page: page, address: address, secondsWithoutProgress: Double(quietNanos) / 1e9,
                entryKind: "\(e.kind)", refCount: ref, mapCount: map, referencesBeyondMappings: extra,
                folioLocked: locked, threadsAccessing: accessing, threadsAtBarrier: atBarrier,
                driverLockWaiting: waiting, driverLockHolding: holding,
                migrateToRAMCallsOnPage: totalCalls - pageStartCalls.load(ordering: .relaxed),
                faultRetriesOnPage: totalRetries - pageStartRetries.load(ordering: .relaxed), summary: "")
            if best == nil || (extra ?? -1, waiting ?? 0) > (best!.referencesBeyondMappings ?? -1, best!.driverLockWaiting ?? 0) {
                best = sample
            }
            HostClock.sleep(nanos: 1_000_000)
        }
        var r = best!
        r.summary = StallReport.describe(r)
        return r
    }

    /// What teardown left behind: threads that did not leave, driver locks
    /// still held, pages whose folio is locked or holds references no mapping
    /// explains, leftover migration entries, kernel warnings.
    private func teardownIssues(threadsLeft: Int) -> [String] {
        var issues: [String] = []
        if threadsLeft < workers {
            issues.append("\(workers - threadsLeft) of \(workers) storm threads did not leave within \(settings.joinTimeoutSeconds) s")
            return issues  // the pages are still in use: nothing more can be judged
        }
        for (i, d) in drivers.enumerated() {
            if let p = d.driverLockProbe, p.waiting + p.holding > 0 {
                issues.append("driver \(i): lock still held (\(p.holding)) or waited for (\(p.waiting))")
            }
        }
        var pageIssues = 0
        for p in 0..<settings.pages {
            let address = address(ofPage: p)
            let e = mm.entry(at: address).entry
            var problem: String? = nil
            switch e.kind {
            case .present, .devicePrivate, .deviceExclusive:
                if e.kind == .present && e.isSpecial { break }  // the zero page
                let folio = kernel.pfnToPage(e.pfn).folio
                if folio.isLocked {
                    problem = "page \(p): folio still locked (\(folio))"
                } else if folio.refCount != folio.mapCount {
                    problem = "page \(p): \(folio.refCount - folio.mapCount) reference(s) left beyond its \(folio.mapCount) mapping(s) (\(folio))"
                }
            case .migration:
                problem = "page \(p): left with a migration entry"
            case .none, .table:
                problem = "page \(p): no longer mapped (\(e))"
            }
            if let problem {
                pageIssues += 1
                if pageIssues <= 8 { issues.append(problem) }
            }
        }
        if pageIssues > 8 { issues.append("... and \(pageIssues - 8) more pages") }
        let warnings = kernel.diagnostics
        if !warnings.isEmpty {
            issues.append("\(warnings.count) kernel warning(s), first: \(warnings[0])")
        }
        return issues
    }
}

extension StallReport {
    /// The stall in one or two sentences.
    static func describe(_ r: StallReport) -> String {
        var s = "page \(r.page) (0x\(String(r.address, radix: 16)), \(r.entryKind)) made no progress for "
            + (r.secondsWithoutProgress < 1 ? String(format: "%.1f ms", r.secondsWithoutProgress * 1000)
                : String(format: "%.1f s", r.secondsWithoutProgress))
            + " after \(r.migrateToRAMCallsOnPage) migrateToRAM calls and \(r.faultRetriesOnPage) fault retries on it; "
            + "\(r.threadsAccessing) thread(s) faulting on it"
        if r.threadsAtBarrier > 0 { s += ", \(r.threadsAtBarrier) done and waiting at the barrier" }
        s += "."
        if let w = r.driverLockWaiting, let h = r.driverLockHolding, w + h > 0 {
            s += " \(w) thread(s) inside migrateToRAM were waiting for the driver lock (\(h) holding it),"
                + " each holding the page reference the fault path took before calling migrateToRAM."
        }
        if let extra = r.referencesBeyondMappings, let map = r.mapCount, let ref = r.refCount {
            s += " The folio had \(ref) references for \(map) mapping(s): \(extra) beyond them"
            if extra > 2 {
                s += ", so the lock holder's reference check (migrate_vma_check_page) fails and the page is restored instead of migrated."
            } else {
                s += "."
            }
        }
        return s
    }
}
