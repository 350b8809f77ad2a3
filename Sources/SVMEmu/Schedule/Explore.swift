/// Exploring schedules: one scenario under many seeds, stopping at the first
/// run that ends in a deadlock.
extension DeterministicScheduler {

    /// What ``explore(schedules:firstSeed:configure:_:)`` found.
    public struct Finding: Sendable, Equatable {
        /// The seed that reproduces it (``Configuration/seed``).
        public let seed: UInt64
        /// The schedules run, the finding's included.
        public let schedulesTried: Int
        /// The deadlock.
        public let deadlock: DeadlockReport
    }

    /// Runs `scenario` under `schedules` seeds from `firstSeed` on, each on a
    /// fresh scheduler, and returns the first deadlock with its seed, or nil.
    ///
    /// `scenario` builds the run: it makes what the threads share and spawns
    /// them on the scheduler it is given; it must not run it. Replay a
    /// finding by building the same scenario on a scheduler configured with
    /// its seed (and `logSteps` for the step log).
    ///
    /// - Parameters:
    ///   - schedules: how many seeds to try (at least 1).
    ///   - firstSeed: the first seed; the others follow it.
    ///   - configure: changes to each run's configuration (the seed is set after it).
    ///   - scenario: spawns the run's threads.
    /// - Returns: the first deadlock found, or nil.
    public static func explore(schedules: Int, firstSeed: UInt64 = 1,
                               configure: (inout Configuration) -> Void = { _ in },
                               _ scenario: (DeterministicScheduler) -> Void) -> Finding? {
        for i in 0..<max(1, schedules) {
            let seed = firstSeed &+ UInt64(i)
            var config = Configuration(seed: seed)
            configure(&config)
            config.seed = seed
            let s = DeterministicScheduler(config)
            scenario(s)
            if case .deadlock(let report) = s.run() {
                return Finding(seed: seed, schedulesTried: i + 1, deadlock: report)
            }
        }
        return nil
    }

    /// Names `folio`'s lock in this scheduler's deadlock reports.
    ///
    /// - Parameters:
    ///   - folio: the folio whose lock (`PG_locked`) is meant.
    ///   - name: the name the reports use.
    public func name(_ folio: Folio, _ name: String) {
        self.name(UnsafeRawPointer(folio.meta.flagsWord), name)
    }

    /// Names `mutex` in this scheduler's deadlock reports (by default its own name).
    ///
    /// - Parameters:
    ///   - mutex: the lock.
    ///   - name: the name the reports use.
    public func name(_ mutex: KernelMutex, _ name: String) {
        self.name(UnsafeRawPointer(mutex.word), name)
    }
}
