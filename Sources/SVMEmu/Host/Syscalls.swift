// Every host system call the emulator makes outside its locks and futexes,
// each behind one thin internal function (as swift-system keeps them in
// Internals/Syscalls.swift and swift-nio in NIOPosix/System.swift). The typed
// faces other code uses are HostClock and HostMemory; the atomics, futexes and
// cycle counter Swift cannot express stay in CSVMSupport.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `CLOCK_MONOTONIC` in nanoseconds.
func system_clock_monotonic_nanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Sleeps for `ts`, resuming with the time left whenever a signal interrupts it.
func system_nanosleep_retrying(_ ts: timespec) {
    var ts = ts, rest = timespec()
    while nanosleep(&ts, &rest) != 0 && errno == EINTR { ts = rest }
}

func system_sched_yield() {
    _ = sched_yield()
}

/// A private anonymous mapping with no swap reservation, or nil (errno set).
func system_mmap_anonymous(_ bytes: Int) -> UnsafeMutableRawPointer? {
    let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    guard let p, p != MAP_FAILED else { return nil }
    return p
}

func system_munmap(_ p: UnsafeMutableRawPointer, _ bytes: Int) {
    _ = munmap(p, bytes)
}

/// `MADV_HUGEPAGE`; a host that refuses keeps base pages, which only costs speed.
func system_madvise_hugepage(_ p: UnsafeMutableRawPointer, _ bytes: Int) {
#if canImport(Glibc)
    _ = madvise(p, bytes, MADV_HUGEPAGE)
#endif
}

/// `MADV_POPULATE_WRITE` (Linux 5.14): backs the range with host pages now,
/// written (zero-filled) as a first write would; false when the host refuses.
func system_madvise_populate_write(_ p: UnsafeMutableRawPointer, _ bytes: Int) -> Bool {
#if canImport(Glibc)
    return madvise(p, bytes, 23 /* MADV_POPULATE_WRITE */) == 0
#else
    return false
#endif
}

/// Writes `text` to standard error in one call (diagnostics from any thread
/// come out whole).
func system_write_stderr(_ text: String) {
    var text = text
    text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// The calling thread's last error number.
var system_errno: Int32 { errno }
