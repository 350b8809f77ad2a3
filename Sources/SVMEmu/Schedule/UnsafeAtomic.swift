import Synchronization

/// An atomic view of one word in caller-owned memory (swift-atomics'
/// `UnsafeAtomic`): the page metadata words, futex words. The memory ordering
/// is an argument of every call, so each reads what it orders; the orderings
/// must be constants (the compiler checks), and each call compiles to the one
/// instruction the ordering needs (`lock xadd` for a wrapping add).
///
/// The view owns nothing; the word must stay allocated while it is used, and
/// be accessed only atomically while other threads may race on it.
@usableFromInline
struct UnsafeAtomic<Value: AtomicRepresentable> {
    @usableFromInline let pointer: UnsafeMutablePointer<Atomic<Value>>

    /// A view of the `Value` word at `address` (aligned for `Value`).
    @inlinable init(at address: UnsafeMutableRawPointer) {
        pointer = address.assumingMemoryBound(to: Atomic<Value>.self)
    }

    /// A view of the word `pointer` points to.
    @inlinable init(_ pointer: UnsafeMutablePointer<Value>) {
        self.init(at: UnsafeMutableRawPointer(pointer))
    }
}

// Loads, stores and compare-exchanges of any 32-bit word (Int32, UInt32).
extension UnsafeAtomic where Value.AtomicRepresentation == _Atomic32BitStorage {
    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func load(ordering: AtomicLoadOrdering) -> Value { pointer.pointee.load(ordering: ordering) }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func store(_ value: Value, ordering: AtomicStoreOrdering) { pointer.pointee.store(value, ordering: ordering) }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func compareExchange(expected: Value, desired: Value, successOrdering: AtomicUpdateOrdering,
                         failureOrdering: AtomicLoadOrdering) -> (exchanged: Bool, original: Value) {
        pointer.pointee.compareExchange(expected: expected, desired: desired,
                                        successOrdering: successOrdering, failureOrdering: failureOrdering)
    }

    /// Compare-exchange in the C form: on failure `expected` becomes the
    /// value found (for retry loops).
    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func compareExchange(_ expected: inout Value, _ desired: Value, successOrdering: AtomicUpdateOrdering,
                         failureOrdering: AtomicLoadOrdering) -> Bool {
        let r = pointer.pointee.compareExchange(expected: expected, desired: desired,
                                                successOrdering: successOrdering, failureOrdering: failureOrdering)
        expected = r.original
        return r.exchanged
    }
}

extension UnsafeAtomic where Value == Int32 {
    /// Adds `n` with wrap-around (`atomic_add_return()` and friends).
    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline @discardableResult
    func wrappingAdd(_ n: Int32, ordering: AtomicUpdateOrdering) -> (oldValue: Int32, newValue: Int32) {
        pointer.pointee.wrappingAdd(n, ordering: ordering)
    }
}

extension UnsafeAtomic where Value == UInt32 {
    /// Adds `n` with wrap-around.
    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline @discardableResult
    func wrappingAdd(_ n: UInt32, ordering: AtomicUpdateOrdering) -> (oldValue: UInt32, newValue: UInt32) {
        pointer.pointee.wrappingAdd(n, ordering: ordering)
    }

    /// Subtracts `n` with wrap-around.
    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline @discardableResult
    func wrappingSubtract(_ n: UInt32, ordering: AtomicUpdateOrdering) -> (oldValue: UInt32, newValue: UInt32) {
        pointer.pointee.wrappingSubtract(n, ordering: ordering)
    }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline @discardableResult
    func bitwiseOr(_ bits: UInt32, ordering: AtomicUpdateOrdering) -> (oldValue: UInt32, newValue: UInt32) {
        pointer.pointee.bitwiseOr(bits, ordering: ordering)
    }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline @discardableResult
    func bitwiseAnd(_ bits: UInt32, ordering: AtomicUpdateOrdering) -> (oldValue: UInt32, newValue: UInt32) {
        pointer.pointee.bitwiseAnd(bits, ordering: ordering)
    }
}

// Loads, stores, exchanges and compare-exchanges of any 64-bit word (page-table
// entries). The same as the 32-bit extension above: the standard library's
// Atomic declares these per storage size, so one generic extension cannot call them.
extension UnsafeAtomic where Value.AtomicRepresentation == _Atomic64BitStorage {
    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func load(ordering: AtomicLoadOrdering) -> Value { pointer.pointee.load(ordering: ordering) }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func store(_ value: Value, ordering: AtomicStoreOrdering) { pointer.pointee.store(value, ordering: ordering) }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func exchange(_ value: Value, ordering: AtomicUpdateOrdering) -> Value {
        pointer.pointee.exchange(value, ordering: ordering)
    }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func compareExchange(expected: Value, desired: Value, successOrdering: AtomicUpdateOrdering,
                         failureOrdering: AtomicLoadOrdering) -> (exchanged: Bool, original: Value) {
        pointer.pointee.compareExchange(expected: expected, desired: desired,
                                        successOrdering: successOrdering, failureOrdering: failureOrdering)
    }

    /// Compare-exchange in the C form: on failure `expected` becomes the
    /// value found (for retry loops).
    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline
    func compareExchange(_ expected: inout Value, _ desired: Value, successOrdering: AtomicUpdateOrdering,
                         failureOrdering: AtomicLoadOrdering) -> Bool {
        let r = pointer.pointee.compareExchange(expected: expected, desired: desired,
                                                successOrdering: successOrdering, failureOrdering: failureOrdering)
        expected = r.original
        return r.exchanged
    }
}

extension UnsafeAtomic where Value == UInt64 {
    /// Adds `n` with wrap-around.
    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline @discardableResult
    func wrappingAdd(_ n: UInt64, ordering: AtomicUpdateOrdering) -> (oldValue: UInt64, newValue: UInt64) {
        pointer.pointee.wrappingAdd(n, ordering: ordering)
    }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline @discardableResult
    func bitwiseOr(_ bits: UInt64, ordering: AtomicUpdateOrdering) -> (oldValue: UInt64, newValue: UInt64) {
        pointer.pointee.bitwiseOr(bits, ordering: ordering)
    }

    @_semantics("atomics.requires_constant_orderings") @_transparent @usableFromInline @discardableResult
    func bitwiseAnd(_ bits: UInt64, ordering: AtomicUpdateOrdering) -> (oldValue: UInt64, newValue: UInt64) {
        pointer.pointee.bitwiseAnd(bits, ordering: ordering)
    }
}
