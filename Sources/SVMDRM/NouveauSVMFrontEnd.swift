// A front end that takes nouveau's SVM ioctl structures and acts on the
// emulated device the way drivers/gpu/drm/nouveau/nouveau_svm.c acts on a GPU.
public import CLibDRM
public import SVMEmu
import Synchronization

/// What the nouveau SVM front end needs from a device and its process's
/// address space. The reference driver conforms; tests use a fake.
///
/// The methods map to what `nouveau_svmm_init()` and `nouveau_svmm_bind()`
/// call in the kernel.
public protocol NouveauSVMBackend: AnyObject, Sendable {
    /// Whether SVM was set up for this device (the kernel's `drm->svm` is
    /// non-NULL after `nouveau_svm_init()`). When false, SVM_INIT fails with
    /// `ENOSYS`, as `nouveau_svmm_init()` does.
    var supportsSVM: Bool { get }

    /// The CPU page size (`PAGE_SIZE`) the address space uses.
    var pageSize: UInt64 { get }

    /// Whether the calling task has an address space (`get_task_mm(current)`
    /// is non-NULL). When false, SVM_BIND fails with `EINVAL`.
    var hasAddressSpace: Bool { get }

    /// Creates the SVM-capable GPU address space, leaving
    /// `[unmanagedAddress, +unmanagedSize)` to the client, and starts mirroring
    /// the process's address space. Its errors are returned to the caller.
    ///
    /// The corresponding kernel functions are `nvif_vmm_ctor()` (with
    /// `MANAGED` and replayable faults) and `__mmu_notifier_register()`.
    func svmInit(unmanagedAddress: UInt64, unmanagedSize: UInt64) throws(Errno)

    /// Runs `body` holding the address space's mmap lock for reading; the
    /// front end calls `findVMAIntersection` and `migrate` only inside it.
    ///
    /// The corresponding kernel functions are `mmap_read_lock()` / `mmap_read_unlock()`.
    func withMmapReadLock<R>(_ body: () -> R) -> R

    /// The first VMA that overlaps `[start, end)`, as `vm_start..<vm_end`, or
    /// nil. Called with the mmap lock held.
    ///
    /// The corresponding kernel function is `find_vma_intersection()`.
    func findVMAIntersection(start: UInt64, end: UInt64) -> Range<UInt64>?

    /// Migrates the page-aligned range `[start, end)`, which lies inside one
    /// VMA, to device memory (`toDevice`) or back to system memory; returns
    /// how many pages moved. Called with the mmap lock held.
    ///
    /// The corresponding kernel functions are `nouveau_dmem_migrate_vma()`
    /// (to the device, built on `migrate_vma_setup()` / `migrate_vma_pages()` /
    /// `migrate_vma_finalize()`) and `nouveau_dmem_migrate_to_ram()` (back, the
    /// `dev_pagemap_ops.migrate_to_ram` callback a CPU fault runs).
    func migrate(start: UInt64, end: UInt64, toDevice: Bool) throws(Errno) -> Int
}

extension NouveauSVMBackend {
    /// 4 KiB, x86-64's `PAGE_SIZE`.
    public var pageSize: UInt64 { PageGeometry.pageSize64 }
    /// A process always has one here.
    public var hasAddressSpace: Bool { true }
}

/// What one SVM_BIND did beyond what the kernel reports.
///
/// The kernel writes `result = 0` (a FIXME in `nouveau_svmm_bind()`: the
/// migrate API does not return a count); this front end does the same in the
/// struct and reports the count here instead.
public struct NouveauSVMBindOutcome: Sendable, Hashable {
    /// Pages the backend reported moved.
    public var pagesMigrated: Int
    /// The per-VMA pieces migrated, in order.
    public var ranges: [Range<UInt64>]
    /// Errors the backend returned and the bind ignored ("best effort").
    public var ignoredErrors: [Errno]
}

/// One open nouveau DRM file's SVM state (the kernel's `struct nouveau_cli`
/// `svm` member), taking `drm_nouveau_svm_init` and `drm_nouveau_svm_bind`
/// and validating them the way the nouveau kernel driver does.
///
/// Validation follows `nouveau_svmm_init()` and `nouveau_svmm_bind()` in
/// `drivers/gpu/drm/nouveau/nouveau_svm.c` (current mainline): every refusal
/// throws the errno nouveau returns. On success the work goes to a
/// `NouveauSVMBackend`.
public final class NouveauSVMFrontEnd: Sendable {
    /// The device and address space this client drives.
    public let backend: any NouveauSVMBackend

    private struct ClientState {
        var svmEnabled = false
        var unmanaged: Range<UInt64>?
    }
    /// `cli->mutex` and the `cli->svm` it guards.
    private let state = LockedValue(ClientState())

    /// A fresh client, as after `open()` of the DRM node.
    public init(backend: any NouveauSVMBackend) {
        self.backend = backend
    }

    /// Whether SVM_INIT succeeded on this client (`cli->svm.svmm != NULL`).
    public var isSVMEnabled: Bool { state.withLock { $0.svmEnabled } }

    /// The client-managed GPU range given to SVM_INIT, as `[start, limit)`.
    public var unmanagedRange: Range<UInt64>? { state.withLock { $0.unmanaged } }

    /// `DRM_IOCTL_NOUVEAU_SVM_INIT`: enables SVM on this client.
    ///
    /// Checks, in the kernel's order: SVM must exist on the device (else
    /// `ENOSYS`); SVM must not already be enabled on this client (else
    /// `EBUSY`); then the backend's VMM creation and mirror registration,
    /// whose error is returned as is. The unmanaged range itself is not
    /// checked here (the kernel leaves that to the VMM constructor).
    ///
    /// The corresponding kernel function is `nouveau_svmm_init()`.
    public func svmInit(_ args: drm_nouveau_svm_init) throws(Errno) {
        guard backend.supportsSVM else { throw .notImplemented }
        let outcome: Result<Void, Errno> = state.withLock { client in
            if client.svmEnabled { return .failure(.busy) }
            do throws(Errno) {
                try backend.svmInit(unmanagedAddress: args.unmanaged_addr, unmanagedSize: args.unmanaged_size)
            } catch {
                return .failure(error)
            }
            client.svmEnabled = true
            // The kernel stores start and start + size with unsigned wraparound.
            let start = args.unmanaged_addr, limit = args.unmanaged_addr &+ args.unmanaged_size
            client.unmanaged = start <= limit ? start..<limit : nil
            return .success(())
        }
        try outcome.get()
    }

    /// `DRM_IOCTL_NOUVEAU_SVM_BIND`: validates `args` and migrates the range.
    ///
    /// Like the kernel, first rounds `va_start` down and `va_end` up to a page
    /// (those values are written back to `args` even when the call fails,
    /// since `drm_ioctl()` copies the struct out either way), then refuses
    /// with `EINVAL`, in this order:
    /// 1. `reserved0` or `reserved1` non-zero;
    /// 2. a `header` bit outside `NOUVEAU_SVM_BIND_VALID_MASK` (bits 48-63);
    /// 3. `va_start >= va_end` (after rounding; also an empty or wrapped range);
    /// 4. a command other than `NOUVEAU_SVM_BIND_COMMAND__MIGRATE`;
    /// 5. a target other than `NOUVEAU_SVM_BIND_TARGET__GPU_VRAM` (no CPU target yet);
    /// 6. a non-zero `stride`;
    /// 7. no address space for the caller (`get_task_mm()` NULL);
    /// 8. SVM not enabled on this client (no SVM_INIT), checked under the mmap lock.
    ///
    /// `priority` and `npages` are not checked (the current kernel ignores
    /// them). Then, holding the mmap read lock, it walks the VMAs that overlap
    /// `[va_start, va_end)` (`find_vma_intersection()`), clamps each to the
    /// range and asks the backend to migrate it to the device, ignoring
    /// errors (best effort), stopping when no VMA is left. Holes between VMAs
    /// are skipped, not refused. `result` is set to 0, as the kernel does.
    ///
    /// The corresponding kernel function is `nouveau_svmm_bind()`.
    @discardableResult
    public func svmBind(_ args: inout drm_nouveau_svm_bind) throws(Errno) -> NouveauSVMBindOutcome {
        let page = backend.pageSize
        args.va_start &= ~(page &- 1)
        args.va_end = (args.va_end &+ (page &- 1)) & ~(page &- 1)

        if args.reserved0 != 0 || args.reserved1 != 0 { throw .invalidArgument }
        let header = NouveauSVMBindHeader(rawValue: args.header)
        if header.invalidBits != 0 { throw .invalidArgument }
        if args.va_start >= args.va_end { throw .invalidArgument }
        guard header.command == NouveauSVMuAPI.commandMigrate else { throw .invalidArgument }
        guard header.target == NouveauSVMuAPI.targetGPUVRAM else { throw .invalidArgument }
        if args.stride != 0 { throw .invalidArgument }
        guard backend.hasAddressSpace else { throw .invalidArgument }

        let start = args.va_start, end = args.va_end
        let outcome: NouveauSVMBindOutcome? = backend.withMmapReadLock {
            guard isSVMEnabled else { return nil }
            return walkVMAs(start: start, end: end, toDevice: true)
        }
        guard let outcome else { throw .invalidArgument }
        args.result = 0
        return outcome
    }

    /// Moves `[start, end)` back to system memory the way CPU accesses do:
    /// nouveau has no bind target for system memory (the kernel's FIXME), so a
    /// page returns when the CPU faults on it and the kernel calls the device's
    /// `migrate_to_ram` callback. This runs that path for every page of every
    /// VMA in the range, under the mmap read lock; unlike bind it is not best
    /// effort and throws the first error (a failed CPU fault is a SIGBUS).
    /// Returns the number of pages moved.
    ///
    /// The corresponding kernel function is `nouveau_dmem_migrate_to_ram()`.
    public func migrateToSystem(start: UInt64, end: UInt64) throws(Errno) -> Int {
        let page = backend.pageSize
        let s = start & ~(page &- 1)
        let e = (end &+ (page &- 1)) & ~(page &- 1)
        guard s < e else { throw .invalidArgument }
        let result: Result<Int, Errno> = backend.withMmapReadLock {
            var moved = 0
            var addr = s
            while addr < e {
                guard let vma = backend.findVMAIntersection(start: addr, end: e) else { break }
                addr = max(addr, vma.lowerBound)
                let next = min(vma.upperBound, e)
                while addr < next {
                    do throws(Errno) {
                        moved += try backend.migrate(start: addr, end: addr + page, toDevice: false)
                    } catch {
                        return .failure(error)
                    }
                    addr += page
                }
            }
            return .success(moved)
        }
        return try result.get()
    }

    /// Dispatches a raw ioctl the way `drm_ioctl()` does for nouveau's two SVM
    /// requests: decodes the request, copies `_IOC_SIZE(request)` bytes in
    /// (zero-filling up to the kernel struct's size, or truncating), runs the
    /// handler and copies the struct back out, also on failure. Returns 0 or
    /// `-errno`, as the kernel handler does. Requests other than
    /// `DRM_IOCTL_NOUVEAU_SVM_INIT` / `_BIND` get `-EINVAL`, what `drm_ioctl()`
    /// answers for numbers it has no handler for; a NULL argument gets `-EFAULT`.
    ///
    /// The corresponding kernel function is `drm_ioctl()` (reached through
    /// `nouveau_drm_ioctl()`).
    public func ioctl(_ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32 {
        let nr = LinuxIoctl.number(request)
        let userSize = LinuxIoctl.size(request)
        let dir = LinuxIoctl.direction(request)
        let copyIn = dir & LinuxIoctl.write != 0 ? userSize : 0
        let copyOut = dir & LinuxIoctl.read != 0 ? userSize : 0

        func run<T>(_ zero: T, _ body: (inout T) throws(Errno) -> Void) -> Int32 {
            guard let argument else { return -Errno.badAddress.rawValue }
            var kernelCopy = zero
            let kernelSize = MemoryLayout<T>.size
            withUnsafeMutableBytes(of: &kernelCopy) { k in
                k.copyMemory(from: UnsafeRawBufferPointer(start: argument, count: min(copyIn, kernelSize)))
            }
            var status: Int32 = 0
            do throws(Errno) { try body(&kernelCopy) } catch { status = -error.rawValue }
            withUnsafeBytes(of: &kernelCopy) { k in
                argument.copyMemory(from: k.baseAddress!, byteCount: min(copyOut, kernelSize))
            }
            return status
        }

        switch nr {
        case NouveauSVMuAPI.drmCommandBase + NouveauSVMuAPI.svmInitNumber:
            return run(drm_nouveau_svm_init()) { (a: inout drm_nouveau_svm_init) throws(Errno) in try self.svmInit(a) }
        case NouveauSVMuAPI.drmCommandBase + NouveauSVMuAPI.svmBindNumber:
            return run(drm_nouveau_svm_bind()) { (a: inout drm_nouveau_svm_bind) throws(Errno) in try self.svmBind(&a) }
        default:
            return -Errno.invalidArgument.rawValue
        }
    }

    /// The VMA walk of `nouveau_svmm_bind()`; caller holds the mmap lock.
    private func walkVMAs(start: UInt64, end: UInt64, toDevice: Bool) -> NouveauSVMBindOutcome {
        var outcome = NouveauSVMBindOutcome(pagesMigrated: 0, ranges: [], ignoredErrors: [])
        var addr = start
        while addr < end {
            guard let vma = backend.findVMAIntersection(start: addr, end: end) else { break }
            addr = max(addr, vma.lowerBound)
            let next = min(vma.upperBound, end)
            do throws(Errno) {
                outcome.pagesMigrated += try backend.migrate(start: addr, end: next, toDevice: toDevice)
            } catch {
                outcome.ignoredErrors.append(error)
            }
            outcome.ranges.append(addr..<next)
            addr = next
        }
        return outcome
    }
}
