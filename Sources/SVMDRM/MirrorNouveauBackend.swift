public import SVMEmu
public import MirrorDriver

/// The reference driver as a nouveau SVM backend: `drm_nouveau_svm_bind`
/// structures validated by `NouveauSVMFrontEnd` migrate real bytes between the
/// emulated RAM and the device's emulated VRAM.
extension MirrorDevice: NouveauSVMBackend {
    /// The device mirrors its address space from creation, so SVM is always available.
    public var supportsSVM: Bool { true }

    /// Nothing to construct: the mirror (the kernel's `nouveau_svmm` with its
    /// MMU notifier) exists as soon as the device does. The unmanaged window is
    /// the client's business and is not checked by the kernel either.
    ///
    /// The corresponding kernel function is `nouveau_svmm_init()`.
    public func svmInit(unmanagedAddress: UInt64, unmanagedSize: UInt64) throws(Errno) {}

    /// The corresponding kernel functions are `mmap_read_lock()` / `mmap_read_unlock()`.
    public func withMmapReadLock<R>(_ body: () -> R) -> R {
        mm.withMmapReadLock(body)
    }

    /// The corresponding kernel function is `find_vma_intersection()`.
    public func findVMAIntersection(start: UInt64, end: UInt64) -> Range<UInt64>? {
        guard let vma = mm.findVMA(start), vma.start < end else { return nil }
        return vma.start..<vma.end
    }

    /// The corresponding kernel functions are `nouveau_dmem_migrate_vma()` (to the
    /// device) and `nouveau_dmem_migrate_to_ram()` (back).
    public func migrate(start: UInt64, end: UInt64, toDevice: Bool) throws(Errno) -> Int {
        try migrateHoldingMmapLock(start, end, toDevice: toDevice)
    }
}
