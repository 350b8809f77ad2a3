// The machine every harness runs on: a booted kernel, the address space the
// harness works in and the devices bound to it, torn down in the one safe
// order, audited at the end.
import SVMEmu

/// One emulated machine: the ``Kernel`` booted from a configuration, one
/// ``AddressSpace`` (the process the harness runs), and the devices
/// (drivers) attached to them.
///
/// Every harness boots through here (storm, overhead, numa, soak, the
/// benches) so that each gets the same teardown: the devices first (they
/// refer to the address space and the kernel), then the address space (it
/// refers to the kernel), then the kernel. ``finish(auditing:)`` runs
/// ``Kernel/audit(heldReferences:)`` before that teardown and keeps what it
/// found in ``audit``.
///
/// A harness that measures with threads calls ``finish(auditing:)`` only
/// once every thread that used the machine has left (the audit must run at
/// quiescence).
public final class Machine {
    /// The booted kernel.
    public let kernel: Kernel
    private var space: AddressSpace?
    private var devices: [AnyObject] = []
    /// The last audit ``finish(auditing:)`` or ``runAudit(heldReferences:)``
    /// ran (nil before one ran).
    public private(set) var audit: KernelAudit?

    /// Boots a kernel from `configuration` and creates its address space.
    ///
    /// - Parameters:
    ///   - configuration: the kernel's configuration (nodes, THP, layout).
    ///   - cpus: the emulated CPUs when not nil (a deterministic run's
    ///     ``HarnessSchedule/cpus``); nil keeps `configuration.cpus`.
    /// - Throws: ``HostMemoryRefusal`` when the host refuses the machine's memory.
    public init(booting configuration: KernelConfiguration, cpus: Int? = nil) throws(HostMemoryRefusal) {
        var c = configuration
        if let cpus { c.cpus = cpus }
        kernel = try Kernel(booting: c)
        space = try AddressSpace(kernel: kernel)
    }

    deinit { tearDown() }

    /// The address space the harness runs in (until ``tearDown()``).
    public var mm: AddressSpace {
        guard let space else { contractViolation("Machine.mm: the machine was torn down") }
        return space
    }

    /// Keeps `device` until teardown, where it goes before the address space
    /// and the kernel; returns it.
    @discardableResult
    public func attach<Device: AnyObject>(_ device: Device) -> Device {
        devices.append(device)
        return device
    }

    /// Runs ``Kernel/audit(heldReferences:)`` now (at quiescence) and keeps
    /// the result in ``audit``.
    @discardableResult
    public func runAudit(heldReferences: [UInt64: Int] = [:]) -> KernelAudit {
        let a = kernel.audit(heldReferences: heldReferences)
        audit = a
        return a
    }

    /// The end of a run: the audit (unless `auditing` is false, for a
    /// harness that audits on its own or whose threads may not have left),
    /// then ``tearDown()``. Returns the audit, nil without one.
    @discardableResult
    public func finish(auditing: Bool = true) -> KernelAudit? {
        let a = auditing ? runAudit() : nil
        tearDown()
        return a
    }

    /// ``finish(auditing:)`` with the audit: throws ``HarnessFailure``
    /// naming `run` (what ran, for the message) when it found something.
    public func finishAudited(_ run: String) throws(HarnessFailure) {
        guard let a = finish(), !a.isClean else { return }
        throw HarnessFailure("\(run): the kernel audit after the run found \(a)")
    }

    /// Releases the devices, then the address space (idempotent). The
    /// kernel goes with the machine.
    public func tearDown() {
        devices.removeAll()
        space = nil
    }

    /// `value` rounded up to a multiple of `multiple`.
    public static func roundUp(_ value: Int, to multiple: Int) -> Int { (value + multiple - 1) / multiple * multiple }

    /// `value` rounded up to a multiple of `multiple`.
    public static func roundUp(_ value: UInt64, to multiple: UInt64) -> UInt64 { (value + multiple - 1) / multiple * multiple }

    /// A node of RAM for `bytes` of work plus `slack`, in whole 2 MiB
    /// (rounded up; at least `minimum`).
    public static func nodeBytes(_ bytes: Int, slack: Int, minimum: Int = 0) -> Int {
        max(minimum, roundUp(bytes + slack, to: PageGeometry.pmdSize))
    }
}

/// A harness run that failed one of its own checks (bytes that differ, a
/// count that does not add up, an unclean kernel audit): the run's figures
/// would mean nothing.
public struct HarnessFailure: Error, CustomStringConvertible, Equatable {
    /// What failed, for the user.
    public let description: String

    /// A failure described by `description`.
    public init(_ description: String) { self.description = description }
}
