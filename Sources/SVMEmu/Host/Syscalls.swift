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

/// The host's online CPUs.
func system_online_cpus() -> Int {
    max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
}

/// The threads the host could run right now (runnable and running), the
/// fourth field of /proc/loadavg ("3/567": 3), or nil when it cannot be
/// read. One small read: a few microseconds.
func system_runnable_threads() -> Int? {
    let fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
    return withUnsafeMutableBytes(of: &buffer) { raw -> Int? in
        let n = read(fd, raw.baseAddress, raw.count)
        guard n > 0 else { return nil }
        // "0.50 0.40 0.30 3/567 12345": the number after the third space.
        var spaces = 0, value = 0, digits = 0
        for i in 0..<n {
            let c = raw[i]
            if spaces < 3 { if c == UInt8(ascii: " ") { spaces += 1 }; continue }
            guard c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") else { break }
            value = value * 10 + Int(c - UInt8(ascii: "0"))
            digits += 1
        }
        return digits > 0 ? value : nil
    }
}
