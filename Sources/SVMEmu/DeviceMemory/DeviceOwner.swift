import Synchronization

/// The opaque owner token of a device page map (`pgmap->owner`, `pgmap_owner`).
///
/// migrate_vma only *filters* by it: device-private pages are collected only
/// when their page map's owner equals the caller's. Two devices of one driver
/// may share an owner (they can then migrate each other's pages).
public struct DeviceOwner: Hashable, Sendable, CustomStringConvertible {
    /// The token's value.
    public let rawValue: UInt64
    /// The token with this value (for drivers that keep their own numbering).
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    private static let counter = Atomic<UInt64>(1)
    /// A fresh token, distinct from every other `unique()` one.
    public static func unique() -> DeviceOwner {
        DeviceOwner(rawValue: counter.add(1, ordering: .relaxed).newValue)
    }
    /// `owner#N`.
    public var description: String { "owner#\(rawValue)" }
}
