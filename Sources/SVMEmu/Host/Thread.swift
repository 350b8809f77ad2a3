import CSVMSupport
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The host thread the caller runs on.
public enum HostThread {
    /// Gives the host CPU to another runnable thread, if there is one. On an
    /// emulated thread of a ``DeterministicScheduler`` it is a scheduling
    /// point instead (a spin-wait round of virtual time).
    ///
    /// The corresponding C function is `sched_yield`.
    public static func yield() {
        if _slowPath(svm_det_active()) { DeterministicScheduler.schedulingPoint(.yield) }
        system_sched_yield()
    }

    /// One round of a busy-wait loop: tells the CPU the thread is spinning
    /// (x86 `pause`), without giving the CPU away. Not a scheduling point:
    /// for host threads polling one another (copy workers, yardsticks).
    ///
    /// The corresponding kernel function is `cpu_relax()`.
    @inlinable @inline(__always)
    public static func relax() { svm_cpu_relax() }
}

/// A joinable host thread running a closure (the deterministic scheduler's
/// emulated threads).
struct HostThreadHandle {
    let handle: pthread_t

    /// Starts a thread running `body`, or nil when the host refuses one.
    ///
    /// The corresponding C function is `pthread_create`.
    static func spawn(_ body: @escaping () -> Void) -> HostThreadHandle? {
        final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
        var handle = pthread_t()
        let context = Unmanaged.passRetained(Box(body)).toOpaque()
        let rc = pthread_create(&handle, nil, { context in
            let box = Unmanaged<Box>.fromOpaque(context!).takeRetainedValue()
            box.body()
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<Box>.fromOpaque(context).release()
            return nil
        }
        return HostThreadHandle(handle: handle)
    }

    /// Waits for the thread to end (`pthread_join`).
    func join() { _ = pthread_join(handle, nil) }
    /// Lets the thread go on alone (`pthread_detach`).
    func detach() { _ = pthread_detach(handle) }
}
