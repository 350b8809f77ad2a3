// The storm's watchdog: the real-thread and the deterministic storm, each
// watching for a page that makes no progress.
import Foundation
import SVMEmu
import Synchronization

extension StormRun {

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

    /// One step of a watchdog loop (both watchdogs step the same way): a
    /// look at `now`; a stalled page stops the run and is returned; while
    /// the run goes on, `running` sees the pages done and the quiet time.
    func watchStep(_ watch: inout Watch, now: UInt64, stallNanos: UInt64, calls0: Int,
                   running: (_ done: Int, _ quiet: UInt64) -> Void) -> StallReport? {
        switch look(&watch, now: now, stallNanos: stallNanos, calls0: calls0) {
        case .stalled(let report):
            abort()
            return report
        case .running(let done, let quiet):
            running(done, quiet)
            return nil
        case .raced:
            return nil
        }
    }

    /// The progress picture: `done` pages, the calls and retries since the
    /// start, `nanos` since the start, `quiet` nanoseconds without progress.
    func picture(done: Int, calls: Int, retries: Int, nanos: UInt64, quiet: UInt64) -> StormProgress {
        StormProgress(pagesDone: done, pages: settings.pages, migrateToRAMCalls: calls, faultRetries: retries,
                      seconds: Double(nanos) / 1e9, secondsSinceProgress: Double(quiet) / 1e9)
    }

    /// The storm on real threads, watched from the calling thread.
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
            stall = watchStep(&watch, now: now, stallNanos: stallNanos, calls0: calls0) { done, quiet in
                guard let progress, now - lastReport >= 100_000_000 else { return }
                lastReport = now
                progress(picture(done: done, calls: totalCalls - calls0, retries: totalRetries - retries0,
                                 nanos: now - start, quiet: quiet))
            }
            if stall != nil { break }
        }
        end = HostClock.nanos()
        let finalCalls = totalCalls - calls0, finalRetries = totalRetries - retries0

        // Teardown: every thread must leave within the join timeout.
        let deadline = HostClock.nanos() + UInt64(settings.joinTimeoutSeconds * 1e9)
        while exited.load(ordering: .acquiring) < workers && HostClock.nanos() < deadline { HostClock.sleep(nanos: 1_000_000) }
        let left = exited.load(ordering: .acquiring)
        if let progress {
            let done = pagesDone.load(ordering: .acquiring) & (StormRun.declaredBit - 1)
            progress(picture(done: done, calls: finalCalls, retries: finalRetries, nanos: end - start, quiet: 0))
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
        settings.machine?.apply(to: &config)
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
                stall = watchStep(&view, now: now, stallNanos: stallNanos, calls0: calls0) { done, quiet in
                    guard let progress, HostClock.hostNanos() - lastReport >= 100_000_000 else { return }
                    lastReport = HostClock.hostNanos()
                    progress(picture(done: done, calls: totalCalls - calls0, retries: totalRetries - retries0,
                                     nanos: now - start, quiet: quiet))
                }
                if stall != nil { break }
            }
            // The last picture, whatever the host time: a run shorter than
            // the report interval still shows where it ended.
            if let progress {
                let now = HostClock.nanos()
                let done = min(pagesDone.load(ordering: .acquiring) & (StormRun.declaredBit - 1), settings.pages)
                progress(picture(done: done, calls: totalCalls - calls0, retries: totalRetries - retries0,
                                 nanos: now - start, quiet: now - min(now, view.lastChange)))
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
}
