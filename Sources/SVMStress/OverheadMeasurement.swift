// The timed part of an overhead run, phase by phase: warm-up, the timed
// rounds (timers on, the best kept), the cost rounds (timers on and off in
// turns), the check of every byte; then the figures (`summarize`).
import MirrorDriver
import SVMEmu

/// One overhead run's measurement on the faulting thread (an emulated one in
/// a deterministic run), over a buffer already filled with the pattern.
struct OverheadMeasurement {
    let config: OverheadConfiguration
    let timers: PhaseTimer
    let mm: AddressSpace
    let device: any OverheadDevice
    let base: UInt64
    /// The run, for progress lines and errors ("to-device 4k memcpy").
    let tag: String
    let pages: Int
    let say: @Sendable (String) -> Void
    /// Whether cost rounds run: in virtual time the timers cost nothing.
    let measuresCost: Bool
    /// 4 KiB pages per chunk of a cost round: whole faults per chunk (a
    /// chunk boundary inside a fault's window would leave the next chunk
    /// nothing to fault).
    let chunk: Int

    /// The checksum every faulting run must reproduce (after `warmUp()`).
    private var expected: UInt64 = 0
    /// The best timed round: its wall time, phase totals and trace.
    private var bestOn = UInt64.max
    private var best: [MigrationPhase: PhaseTotals] = [:]
    private var trace: [OverheadTraceEvent] = []
    /// The cost rounds: (on - off) / off per pair of chunks, and the sums.
    private var pairRatios: [Double] = []
    private var offNanos: UInt64 = 0, onNanos: UInt64 = 0

    init(_ config: OverheadConfiguration, timers: PhaseTimer, mm: AddressSpace, device: any OverheadDevice,
         base: UInt64, tag: String) {
        self.config = config
        self.timers = timers
        self.mm = mm
        self.device = device
        self.base = base
        self.tag = tag
        pages = config.bytes >> PageGeometry.pageShift
        say = config.progress ?? { _ in }
        measuresCost = config.measureInstrumentationCost && !config.schedule.deterministic
        chunk = max(config.granularity == .huge2M ? PageGeometry.pmdPages : 256, config.faultPages)
    }

    /// Warm-up, the rounds, the check of every byte, the figures.
    mutating func measure() throws(OverheadError) -> OverheadResult {
        try warmUp()
        for round in 0..<config.rounds {
            try timedRound(round)
            if measuresCost { try costRound(round) }
        }
        try verifyBuffer()
        return figures()
    }

    // MARK: the phases

    /// VRAM and page tables touched once, then the expected checksum.
    mutating func warmUp() throws(OverheadError) {
        say("\(tag): warm-up (first touch of RAM and VRAM)")
        try prepare()
        expected = try checksumInPlace()
        _ = try faultingLoop(0, pages)
    }

    /// The whole buffer faulted with the timers on; keeps the best round.
    mutating func timedRound(_ round: Int) throws(OverheadError) {
        try prepareChecked()
        say("\(tag): round \(round + 1)/\(config.rounds), timers on")
        timers.reset()
        timers.isEnabled = true
        let (sum, nanos) = try faultingLoop(0, pages)
        timers.isEnabled = false
        try expectChecksum(sum)
        guard nanos < bestOn else { return }
        bestOn = nanos
        best = timers.totals()
        if timers.traceCapacity > 0 {
            trace = timers.traceEvents().map {
                OverheadTraceEvent(name: $0.phase.name, cpu: $0.cpu, startNanos: $0.startNanos, endNanos: $0.endNanos)
            }
        }
    }

    /// The instrumentation cost: chunks of the buffer alternately timed and
    /// not (in pairs, the order swapped every pair) in the same run, so that
    /// machine noise hits both alike.
    mutating func costRound(_ round: Int) throws(OverheadError) {
        try prepareChecked()
        say("\(tag): round \(round + 1)/\(config.rounds), timers on and off in turns")
        var p = 0, pair = 0
        var chained: UInt64 = 0
        while p + 2 * chunk <= pages {
            var t: (on: UInt64, off: UInt64) = (0, 0)
            for half in 0..<2 {
                let on = (half == 0) == (pair % 2 == 0)
                timers.isEnabled = on
                let (sum, nanos) = try faultingLoop(p, p + chunk, chained)
                timers.isEnabled = false
                chained = sum
                if on { t.on = nanos } else { t.off = nanos }
                p += chunk
            }
            onNanos += t.on
            offNanos += t.off
            if t.off > 0 { pairRatios.append((Double(t.on) - Double(t.off)) / Double(t.off)) }
            pair += 1
        }
        let (sum, _) = try faultingLoop(p, pages, chained)
        try expectChecksum(sum)
        timers.reset()
    }

    /// Every byte, wherever it is now (the CPU faults it back if needed).
    func verifyBuffer() throws(OverheadError) {
        say("\(tag): verifying every byte")
        let bad: UInt64?
        do { bad = try mm.verifyPattern(base, length: config.bytes, seed: config.seed) } catch {
            throw .dataMismatch("\(tag): verifying the buffer failed: \(error)")
        }
        if let bad {
            throw .dataMismatch("\(tag): DATA CORRUPTION: byte at 0x\(String(bad, radix: 16)) differs from the pattern after migration")
        }
    }

    /// The figures of the best round, the cost rounds and the trace.
    func figures() -> OverheadResult {
        var result = OverheadHarness.summarize(best, config: config, wallOn: bestOn)
        result.driver = config.driver.rawValue
        result.busyCPUs = config.busyCPUs
        if !pairRatios.isEmpty {
            let sorted = pairRatios.sorted()
            let mid = sorted.count / 2
            let median = sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
            result.instrumentationOverheadPercent = median * 100
            result.wallSecondsTimersOn = Double(onNanos) / 1e9
            result.wallSecondsTimersOff = Double(offNanos) / 1e9
        }
        result.trace = trace
        if timers.traceCapacity > 0 {
            // Every record counts in the totals; the trace keeps what fitted.
            let recorded = best.values.reduce(0) { $0 + Int($1.count) }
            result.traceEvents = trace.count
            result.traceEventsDropped = max(0, recorded - trace.count)
            result.traceFaults = trace.reduce(0) { $0 + ($1.name == MigrationPhase.fault.name ? 1 : 0) }
            result.traceEventsPerCPU = timers.traceCapacity
        }
        let records = best.filter { $0.key != .fault }.reduce(UInt64(0)) { $0 + $1.value.count } + (best[.fault]?.count ?? 0)
        let faultNanos = best[.fault]?.nanos ?? 0
        if faultNanos > 0 && measuresCost, let recordNanos = try? OverheadHarness.timerRecordNanos() {
            result.instrumentationEstimatePercent = Double(records) * recordNanos / faultNanos * 100
        }
        return result
    }

    // MARK: the pieces

    /// Puts the buffer where the run starts from (timers off).
    func prepare() throws(OverheadError) {
        do {
            switch config.direction {
            case .toDevice: try device.placeInRAM(base, pages: pages)
            case .toRAM: try device.placeInDevice(base, pages: pages)
            }
        } catch {
            throw .setupFailed("\(tag): cannot move the buffer into place before a run: \(error)")
        }
        if config.direction == .toDevice && device.pagesInDevice != 0 {
            throw .setupFailed("\(tag): \(device.pagesInDevice) pages still in VRAM before a to-device run")
        }
    }

    /// `prepare()`, then the checksum in place: moving the buffer must not change it.
    func prepareChecked() throws(OverheadError) {
        try prepare()
        let before = try checksumInPlace()
        guard before == expected else {
            throw .dataMismatch("\(tag): DATA CORRUPTION: moving the buffer into place changed its bytes (checksum \(before) != \(expected))")
        }
    }

    /// The bytes read through the faults must be the buffer's.
    func expectChecksum(_ sum: UInt64) throws(OverheadError) {
        guard sum == expected else {
            throw .dataMismatch("\(tag): the bytes read through the faults differ from the buffer's (checksum \(sum) != \(expected))")
        }
    }

    /// One byte per page, from where the data is now, without faulting: the
    /// checksum every faulting run must reproduce.
    func checksumInPlace() throws(OverheadError) -> UInt64 {
        var sum: UInt64 = 0
        var byte: UInt8 = 0
        do {
            for p in 0..<pages {
                let a = base + UInt64(p) << PageGeometry.pageShift
                if config.direction == .toDevice {
                    sum = sum &* 31 &+ UInt64(try mm.load(a))
                } else {
                    try withUnsafeMutableBytes(of: &byte) { (b) throws(Errno) in try device.read(a, into: b) }
                    sum = sum &* 31 &+ UInt64(byte)
                }
            }
        } catch {
            throw .setupFailed("\(tag): cannot read the buffer in place: \(error)")
        }
        return sum
    }

    /// The faulting loop over pages [from, to): one byte per page, the
    /// checksum chained from `start`. Returns (checksum, wall nanos).
    func faultingLoop(_ from: Int, _ to: Int, _ start: UInt64 = 0) throws(OverheadError) -> (UInt64, UInt64) {
        var sum = start
        var byte: UInt8 = 0
        let t0 = HostClock.nanos()
        do {
            switch config.direction {
            case .toDevice:
                for p in from..<to {
                    try withUnsafeMutableBytes(of: &byte) { (b) throws(Errno) in try device.read(base + UInt64(p) << PageGeometry.pageShift, into: b) }
                    sum = sum &* 31 &+ UInt64(byte)
                }
            case .toRAM:
                for p in from..<to { sum = sum &* 31 &+ UInt64(try mm.load(base + UInt64(p) << PageGeometry.pageShift)) }
            }
        } catch {
            throw .dataMismatch("\(tag): a faulting access failed: \(error)")
        }
        return (sum, HostClock.nanos() - t0)
    }
}

extension OverheadHarness {
    /// Turns phase totals into the figures.
    public static func summarize(_ totals: [MigrationPhase: PhaseTotals], config: OverheadConfiguration,
                                 wallOn: UInt64) -> OverheadResult {
        let fault = totals[.fault] ?? PhaseTotals()
        let faults = Int(fault.count)
        let faultSeconds = fault.nanos / 1e9
        func figure(_ nanos: Double, _ count: UInt64) -> OverheadPhaseFigure {
            OverheadPhaseFigure(seconds: nanos / 1e9, fraction: fault.nanos > 0 ? nanos / fault.nanos : 0, count: count,
                                microsPerFault: faults > 0 ? nanos / 1e3 / Double(faults) : 0)
        }
        var phases: [String: OverheadPhaseFigure] = [:]
        var inside = 0.0
        for p in MigrationPhase.allCases where p != .fault {
            let t = totals[p] ?? PhaseTotals()
            phases[p.name] = figure(t.nanos, t.count)
            // The shootdown wait is part of the phase that flushed (collect, unmap ...).
            if !p.isNested { inside += t.nanos }
        }
        phases["other"] = figure(max(0, fault.nanos - inside), fault.count)
        phases["fault"] = figure(fault.nanos, fault.count)
        let migrateVMA = MigrationPhase.allCases.filter(\.isMigrateVMA).reduce(0.0) { $0 + (totals[$1]?.nanos ?? 0) }
        let mib = Double(config.bytes) / Double(ByteSize.mib)
        return OverheadResult(
            granularity: config.granularity.rawValue, direction: config.direction.rawValue,
            copyModel: config.copyModel.rawValue, copyThreads: config.copyThreads, faultPages: config.faultPages,
            bytes: config.bytes, faults: faults, phases: phases,
            migrateVMAFraction: fault.nanos > 0 ? migrateVMA / fault.nanos : 0,
            copyFraction: fault.nanos > 0 ? (totals[.copy]?.nanos ?? 0) / fault.nanos : 0,
            faultMicrosMean: faults > 0 ? faultSeconds * 1e6 / Double(faults) : 0,
            throughputGBps: wallOn > 0 && wallOn != .max ? Double(config.bytes) / Double(wallOn) : 0,
            memcpyGBps: 0,
            wallSeconds: wallOn == .max ? 0 : Double(wallOn) / 1e9,
            wallSecondsTimersOff: 0, wallSecondsTimersOn: 0, instrumentationOverheadPercent: 0,
            setupCallsPerMiB: Double(totals[.collect]?.count ?? 0) / mib,
            finalizeCallsPerMiB: Double(totals[.finalize]?.count ?? 0) / mib,
            verified: true)
    }

    /// What one timed phase costs with the timers on (a `begin()` and an
    /// `end()`: two cycle-counter reads and the per-CPU adds), in nanoseconds,
    /// best of five rounds.
    ///
    /// - Throws: ``HostMemoryRefusal`` when the host refuses the timer's own CPU slots.
    public static func timerRecordNanos() throws(HostMemoryRefusal) -> Double {
        let timer = try PhaseTimer()
        timer.isEnabled = true
        let n = 200_000
        var best = Double.infinity
        for _ in 0..<5 {
            let t0 = HostClock.nanos()
            for _ in 0..<n {
                let m = timer.begin()
                timer.end(.copy, m)
            }
            best = min(best, Double(HostClock.nanos() - t0) / Double(n))
        }
        return best
    }

    /// The end of `svmemu demo`: to-device and to-ram at 4 KiB and 2 MiB over
    /// a small buffer (one round, no timers-off runs); `demoSummary` tabulates them.
    public static func demoRuns(bytes: Int = 64 << 20, copyModel: OverheadCopyModel = .memcpy,
                                progress: (@Sendable (String) -> Void)? = nil) throws(OverheadError) -> [OverheadResult] {
        var results: [OverheadResult] = []
        for direction in OverheadDirection.allCases {
            for granularity in MigrationGranularity.allCases where granularity != .huge2M || hugeMigrationAvailable {
                var c = OverheadConfiguration()
                c.bytes = bytes
                c.direction = direction
                c.granularity = granularity
                c.copyModel = copyModel
                c.rounds = 1
                c.measureInstrumentationCost = false
                c.progress = progress
                results.append(try run(c))
            }
        }
        return results
    }

    /// The summary table of `demoRuns` for runs of one size and copy model.
    public static func demoSummary(_ results: [OverheadResult]) -> String {
        let bytes = results.first?.bytes ?? 0, copyModel = results.first?.copyModel ?? "?"
        return "Where a fault's time goes, 4 KiB versus 2 MiB (\(bytes >> 20) MiB, copy model \(copyModel)):\n"
            + OverheadReport.summary(results)
            + "migrate_vma = collect + unmap + pages + finalize (the kernel's migrate_vma_* calls); see Docs/overhead.md.\n"
    }
}
