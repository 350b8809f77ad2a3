import CSVMSupport

/// The host's monotonic clock and sleeps: the one clock the emulator, its
/// drivers and its harnesses read.
public enum HostClock {
    /// Nanoseconds on the host's monotonic clock (an arbitrary origin; never
    /// steps back).
    ///
    /// On an emulated thread of a ``DeterministicScheduler`` this is the
    /// thread's virtual clock instead.
    ///
    /// The corresponding C function is `clock_gettime(CLOCK_MONOTONIC)`.
    public static func nanos() -> UInt64 {
        if _slowPath(svm_det_active()), let v = DeterministicScheduler.virtualNanos() { return v }
        return system_clock_monotonic_nanos()
    }

    /// Nanoseconds on the host's monotonic clock, virtual time or not: for
    /// host wall times and for bounding host waits.
    ///
    /// The corresponding C function is `clock_gettime(CLOCK_MONOTONIC)`.
    public static func hostNanos() -> UInt64 { system_clock_monotonic_nanos() }

    /// Sleeps at least `nanos` nanoseconds: a signal that interrupts the sleep
    /// does not shorten it.
    ///
    /// On an emulated thread of a ``DeterministicScheduler`` the thread's
    /// virtual clock advances by `nanos` instead (a scheduling point).
    ///
    /// The corresponding C function is `nanosleep`, retried on `EINTR` with
    /// the time left.
    public static func sleep(nanos: UInt64) {
        if _slowPath(svm_det_active()), DeterministicScheduler.sleep(nanos: nanos) { return }
        system_nanosleep_retrying(timespec(tv_sec: Int(nanos / 1_000_000_000), tv_nsec: Int(nanos % 1_000_000_000)))
    }

    /// Waits `nanos` nanoseconds busy, keeping the CPU (the kernel's
    /// `udelay()`): nothing else runs on the caller's CPU meanwhile.
    ///
    /// On an emulated thread of a ``DeterministicScheduler`` the thread's
    /// virtual clock advances by `nanos` and it keeps its CPU (a scheduling
    /// point); ``sleep(nanos:)`` gives the CPU away instead.
    ///
    /// The corresponding kernel function is `udelay()` (`ndelay()` below a
    /// microsecond).
    public static func spin(nanos: UInt64) {
        if _slowPath(svm_det_active()), DeterministicScheduler.spin(nanos: nanos) { return }
        let end = system_clock_monotonic_nanos() &+ nanos
        while system_clock_monotonic_nanos() < end { svm_cpu_relax() }
    }

    /// Waits `micros` microseconds the way the kernel's `fsleep()` does
    /// (include/linux/delay.h): up to 10 µs it spins (`udelay()`), keeping
    /// the CPU; up to 20 ms it sleeps in `usleep_range(d, 2d)`
    /// (``sleepRange(minNanos:maxNanos:)``); beyond, `msleep()` sleeps whole
    /// jiffies of 1 ms (HZ=1000), one more than asked. A sleep gives the CPU away.
    ///
    /// The corresponding kernel function is `fsleep()`.
    public static func fsleep(micros: UInt64) {
        if micros == 0 { return }
        if micros <= 10 {
            spin(nanos: micros * 1_000)
        } else if micros <= 20_000 {
            sleepRange(minNanos: micros * 1_000, maxNanos: 2 * micros * 1_000)
        } else {
            sleep(nanos: ((micros + 999) / 1_000 + 1) * 1_000_000)
        }
    }

    /// Sleeps between `minNanos` and `maxNanos` the way the kernel's
    /// `usleep_range()` does: an hrtimer with a soft expiry at the minimum
    /// and a hard one at the maximum (`schedule_hrtimeout_range()`). The
    /// clock event is programmed for the hard expiry, but any hrtimer
    /// interrupt on the sleeper's CPU at or after the soft expiry runs the
    /// timer too (`__hrtimer_run_queues()` compares with the soft expiry).
    ///
    /// On an emulated thread of a ``DeterministicScheduler`` with the CPU
    /// model, that interrupt is the CPU's scheduler tick: it keeps ticking
    /// on the jiffy grid (``DeterministicScheduler/Configuration/tickNanos``)
    /// while the sleeper's timer is due within a tick, idle or not
    /// (`tick_nohz_next_event()` does not stop a tick with a timer due in
    /// the next period), so the sleep ends at the first tick at or after the
    /// minimum, else at the maximum. A range longer than a tick period ends
    /// at the maximum (an idle CPU may stop its tick then; a busy one's tick
    /// would end it sooner, which is not modelled). Elsewhere (real threads,
    /// or no CPU model) it sleeps the maximum, the hard expiry.
    ///
    /// The corresponding kernel function is `usleep_range()`.
    public static func sleepRange(minNanos: UInt64, maxNanos: UInt64) {
        let upper = max(minNanos, maxNanos)
        if _slowPath(svm_det_active()), DeterministicScheduler.sleepRange(minNanos: minNanos, maxNanos: upper) { return }
        sleep(nanos: upper)
    }

    /// A cheap counter for phase timing, in ticks whose length the caller
    /// measures against `nanos()`: the time-stamp counter on x86-64 (about
    /// 7 ns a read against about 20 ns for the clock), the clock elsewhere.
    /// `PhaseTimer.nanosPerTick` converts them; a harness timing single
    /// accesses uses them where a clock call would cost several accesses.
    ///
    /// On an emulated thread of a ``DeterministicScheduler`` a tick is a
    /// nanosecond of the thread's virtual clock (see
    /// ``PhaseTimer/virtualTime``).
    ///
    /// The corresponding C function is `__rdtsc` (`clock_gettime` off x86-64).
    @inlinable @inline(__always)
    public static func ticks() -> UInt64 {
#if arch(x86_64)
        if _slowPath(svm_det_active()), let v = DeterministicScheduler.virtualNanos() { return v }
        return svm_rdtsc()
#else
        nanos()
#endif
    }
}
