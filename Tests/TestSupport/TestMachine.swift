// The one way the test suites boot a machine: a kernel, an address space and,
// as an option, a mirror device; torn down in the only safe order and audited
// at the end, so that every test also checks that it leaked nothing.

import Testing
import SVMEmu
import MirrorDriver

/// What a ``TestMachine`` boots: a small machine (two 64 MiB RAM nodes),
/// one address space, and a mirror device when ``vram`` is set.
public struct TestMachineOptions: Sendable {
    /// The RAM nodes' sizes.
    public var nodeSizes: [Int] = [64 << 20, 64 << 20]
    /// Transparent huge pages.
    public var thp: TransparentHugepageMode = .madvise
    /// What a CPU fault on a device page does.
    public var policy: DeviceFaultPolicy = .trylock
    /// The address space's size.
    public var addressSpaceSize: UInt64 = 4 << 30
    /// The physical address space reserved for RAM and device memory.
    public var maxPhysicalBytes: UInt64 = 2 << 30
    /// The mirror device's VRAM; nil boots no device.
    public var vram: UInt64?
    /// The mirror device's chunk size.
    public var chunkBytes: UInt64 = 32 << 20
    /// Whether teardown runs ``Kernel/audit(heldReferences:)`` and fails
    /// the test on its findings (off for tests that leak on purpose).
    public var audits = true
    /// Diagnostic kinds that fail the test when found at teardown (a test
    /// that provokes one on purpose takes it with
    /// ``Kernel/takeDiagnostics(of:)``).
    public var forbiddenDiagnostics: Set<DiagnosticKind> = [.staleTLB, .lockNotHeld]
    /// Last changes to the configuration, after the fields above.
    public var configure: @Sendable (inout KernelConfiguration) -> Void = { _ in }

    public init(nodeSizes: [Int] = [64 << 20, 64 << 20], thp: TransparentHugepageMode = .madvise,
                policy: DeviceFaultPolicy = .trylock, addressSpaceSize: UInt64 = 4 << 30,
                vram: UInt64? = nil, chunkBytes: UInt64 = 32 << 20, maxPhysicalBytes: UInt64 = 2 << 30,
                audits: Bool = true,
                configure: @escaping @Sendable (inout KernelConfiguration) -> Void = { _ in }) {
        self.nodeSizes = nodeSizes
        self.thp = thp
        self.policy = policy
        self.addressSpaceSize = addressSpaceSize
        self.vram = vram
        self.chunkBytes = chunkBytes
        self.maxPhysicalBytes = maxPhysicalBytes
        self.audits = audits
        self.configure = configure
    }

    /// The kernel configuration these options boot.
    public var configuration: KernelConfiguration {
        var config = KernelConfiguration()
        config.nodeSizes = nodeSizes
        config.transparentHugepage = thp
        config.deviceFaultPolicy = policy
        config.addressSpaceSize = addressSpaceSize
        config.maxPhysicalBytes = maxPhysicalBytes
        configure(&config)
        return config
    }
}

/// A booted test machine: ``kernel``, ``mm`` and, when asked for, ``device``.
///
/// Run a test in ``run(_:sourceLocation:_:)``: it boots, runs the body,
/// then releases the device (it holds the address space and the kernel),
/// the address space (exit_mmap returns its pages), and audits the kernel:
/// no forbidden diagnostic (a stale TLB access, a page-table store without
/// its lock), and, unless ``TestMachineOptions/audits`` is off, a clean
/// ``KernelAudit`` (no leaked reference, frame, or lock).
public final class TestMachine: @unchecked Sendable {
    public let kernel: Kernel
    public let options: TestMachineOptions
    /// The address space (nil after teardown).
    public private(set) var mm: AddressSpace!
    /// The mirror device (nil when ``TestMachineOptions/vram`` is nil).
    public private(set) var device: MirrorDevice!
    private var tornDown = false

    /// Boots a machine of `options`; throws ``HostMemoryRefusal`` when the
    /// host refuses its memory.
    public init(_ options: TestMachineOptions = TestMachineOptions()) throws {
        self.options = options
        kernel = try Kernel(booting: options.configuration)
        mm = try AddressSpace(kernel: kernel)
        if let vram = options.vram {
            device = try MirrorDevice(kernel: kernel, mm: mm, vramBytes: vram, chunkBytes: options.chunkBytes)
        }
    }

    /// Boots a machine of `options`, runs `body` on it, tears it down and
    /// audits it (see ``TestMachine``).
    public static func run<R>(_ options: TestMachineOptions = TestMachineOptions(),
                              sourceLocation: SourceLocation = #_sourceLocation,
                              _ body: (TestMachine) throws -> R) throws -> R {
        let machine = try TestMachine(options)
        defer { machine.tearDown(sourceLocation: sourceLocation) }
        return try body(machine)
    }

    /// Releases the device and the address space, then checks the kernel:
    /// no forbidden diagnostic, and a clean audit when the options ask for it.
    /// Runs once; later calls do nothing.
    public func tearDown(sourceLocation: SourceLocation = #_sourceLocation) {
        guard !tornDown else { return }
        tornDown = true
        device = nil
        mm = nil
        for kind in options.forbiddenDiagnostics.sorted(by: { $0.rawValue < $1.rawValue }) {
            let found = kernel.diagnostics(of: kind)
            #expect(found.isEmpty, "\(kind) diagnostics at teardown: \(found)", sourceLocation: sourceLocation)
        }
        if options.audits {
            let audit = kernel.audit()
            #expect(audit.isClean, "audit at teardown: \(audit)", sourceLocation: sourceLocation)
        }
    }
}

extension Kernel {
    /// The kernel's own paths never leave a stale translation behind: fails
    /// the test on any stale-TLB diagnostic not taken (a test that provokes
    /// one on purpose takes it with ``takeStaleTLBAccesses()``).
    public func expectNoStaleTLBAccess(sourceLocation: SourceLocation = #_sourceLocation) {
        let stale = diagnostics(of: .staleTLB)
        #expect(stale.isEmpty, "\(stale)", sourceLocation: sourceLocation)
    }

    /// Removes and returns the stale-TLB diagnostics recorded so far.
    public func takeStaleTLBAccesses() -> [Diagnostic] { takeDiagnostics(of: .staleTLB) }
}
