/// The flat host storage of one address space's page tables: the PMD
/// array, the PTE tables, the PTE locks and the PMD locks, reserved
/// together and given back together (the emulator's `pgd_alloc()` /
/// `pgd_free()`). The boot reserves one and gives it back, to refuse a
/// machine that cannot hold a process.
struct PageTableReservation {
    let pmdCount: Int
    let pmds: UnsafeMutablePointer<UInt64>
    let ptes: UnsafeMutablePointer<UInt64>
    let ptls: UnsafeMutablePointer<UInt32>
    let pmdLocks: UnsafeMutablePointer<UInt32>

    /// The bytes of each part for `pmdCount` PMD slots, in reservation order.
    static func parts(pmdCount: Int) -> [Int] {
        [pmdCount * 8, pmdCount * PageGeometry.pmdPages * 8, pmdCount * 4,
         max(PageGeometry.pageSize, (pmdCount / PageGeometry.pmdPages + 1) * 4)]
    }

    /// Reserves the page tables of an address space of `addressSpaceSize`
    /// bytes (rounded up to 1 GiB, one PMD table's worth).
    ///
    /// - Throws: ``HostMemoryRefusal`` for the first part the host refuses,
    ///   naming the size of the address space; the parts reserved before
    ///   it are given back.
    init(addressSpaceSize: UInt64) throws(HostMemoryRefusal) {
        let size = (addressSpaceSize + (1 << 30) - 1) & ~((1 << 30) - 1)
        let pmdCount = Int(size >> PageGeometry.pmdShift)
        var held: [UnsafeMutableRawPointer] = []
        let parts = PageTableReservation.parts(pmdCount: pmdCount)
        for bytes in parts {
            do {
                held.append(try HostMemory.reserve(bytes: bytes, for: "the page tables of an address space of \(ByteSize.describe(Int(size)))"))
            } catch {
                for (p, n) in zip(held, parts) { HostMemory.release(p, bytes: n) }
                throw error
            }
        }
        self.init(pmdCount: pmdCount, pmds: held[0].assumingMemoryBound(to: UInt64.self),
                  ptes: held[1].assumingMemoryBound(to: UInt64.self),
                  ptls: held[2].assumingMemoryBound(to: UInt32.self),
                  pmdLocks: held[3].assumingMemoryBound(to: UInt32.self))
    }

    init(pmdCount: Int, pmds: UnsafeMutablePointer<UInt64>, ptes: UnsafeMutablePointer<UInt64>,
         ptls: UnsafeMutablePointer<UInt32>, pmdLocks: UnsafeMutablePointer<UInt32>) {
        self.pmdCount = pmdCount
        self.pmds = pmds
        self.ptes = ptes
        self.ptls = ptls
        self.pmdLocks = pmdLocks
    }

    /// Gives every part back to the host.
    func release() {
        let parts = PageTableReservation.parts(pmdCount: pmdCount)
        HostMemory.release(pmds, bytes: parts[0])
        HostMemory.release(ptes, bytes: parts[1])
        HostMemory.release(ptls, bytes: parts[2])
        HostMemory.release(pmdLocks, bytes: parts[3])
    }
}
