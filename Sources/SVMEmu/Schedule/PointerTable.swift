/// The deterministic scheduler's tables keyed by a lock word: lock -> index
/// of the emulated thread that took it (for the wait-for picture of a
/// deadlock), lock -> index of its name. Every acquire and release of a run
/// reads or updates one, so it is an open-addressing table on the address
/// bits (linear probing, deletion by backward shift), not a `Dictionary`,
/// whose seeded hashing cost more than the rest of the lock event. Only the
/// running emulated thread (or the scheduler's owner, outside a run) touches it.
final class PointerTable {
    /// Keys (lock addresses; 0: an empty slot) and values, `mask + 1` each.
    private var keys: UnsafeMutablePointer<UInt>
    private var values: UnsafeMutablePointer<Int>
    private var mask: Int
    private var used = 0

    init() {
        mask = 15
        keys = .allocate(capacity: mask + 1)
        keys.initialize(repeating: 0, count: mask + 1)
        values = .allocate(capacity: mask + 1)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    @inline(__always)
    private func home(_ key: UInt) -> Int {
        Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> 40) & mask
    }

    /// The value recorded for `lock`, or nil.
    subscript(lock: UnsafeRawPointer) -> Int? {
        let key = UInt(bitPattern: lock)
        var i = home(key)
        while true {
            let k = keys[i]
            if k == key { return values[i] }
            if k == 0 { return nil }
            i = (i + 1) & mask
        }
    }

    /// Records `value` for `lock` (replacing an earlier one).
    func set(_ lock: UnsafeRawPointer, _ value: Int) {
        let key = UInt(bitPattern: lock)
        var i = home(key)
        while true {
            let k = keys[i]
            if k == key { values[i] = value; return }
            if k == 0 { break }
            i = (i + 1) & mask
        }
        keys[i] = key
        values[i] = value
        used += 1
        if used * 2 > mask + 1 { grow() }
    }

    /// Forgets `lock` and returns its value, or nil.
    func remove(_ lock: UnsafeRawPointer) -> Int? {
        let key = UInt(bitPattern: lock)
        var i = home(key)
        while true {
            let k = keys[i]
            if k == key { break }
            if k == 0 { return nil }
            i = (i + 1) & mask
        }
        let found = values[i]
        used -= 1
        // Backward shift: move later entries of the probe run into the hole
        // when their home does not lie (cyclically) between the hole and them.
        var hole = i
        var j = (i + 1) & mask
        while keys[j] != 0 {
            let h = home(keys[j])
            if (j > hole && (h <= hole || h > j)) || (j < hole && (h <= hole && h > j)) {
                keys[hole] = keys[j]
                values[hole] = values[j]
                hole = j
            }
            j = (j + 1) & mask
        }
        keys[hole] = 0
        return found
    }

    private func grow() {
        let oldKeys = keys, oldValues = values, oldCount = mask + 1
        mask = oldCount * 2 - 1
        keys = .allocate(capacity: mask + 1)
        keys.initialize(repeating: 0, count: mask + 1)
        values = .allocate(capacity: mask + 1)
        used = 0
        for i in 0..<oldCount where oldKeys[i] != 0 {
            set(UnsafeRawPointer(bitPattern: oldKeys[i])!, oldValues[i])
        }
        oldKeys.deallocate()
        oldValues.deallocate()
    }
}
