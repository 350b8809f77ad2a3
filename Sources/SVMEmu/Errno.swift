#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A kernel error code, as the emulated kernel returns it (the kernel returns `-errno`).
///
/// Like swift-system's `Errno`: a typed value with readable static names, so
/// `migrateVMASetup` failing the way `migrate_vma_setup()` fails with `-EINVAL`
/// throws `Errno.invalidArgument`.
public struct Errno: Error, Hashable, Sendable, RawRepresentable, CustomStringConvertible {
    /// The positive errno value (`EINVAL` is 22 on Linux).
    public let rawValue: Int32
    /// The error with this errno value.
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// `EPERM`: operation not permitted (dmirror: writing read-only memory).
    public static let notPermitted = Errno(rawValue: EPERM)
    /// `ENOENT`: no such entry (dmirror: nothing migrated).
    public static let noEntry = Errno(rawValue: ENOENT)
    /// `EINTR`
    public static let interrupted = Errno(rawValue: EINTR)
    /// `EIO`
    public static let ioError = Errno(rawValue: EIO)
    /// `EAGAIN`: try again (a racing fault, a busy page).
    public static let tryAgain = Errno(rawValue: EAGAIN)
    /// `ENOMEM`: out of memory.
    public static let noMemory = Errno(rawValue: ENOMEM)
    /// `EACCES`
    public static let permissionDenied = Errno(rawValue: EACCES)
    /// `EFAULT`: bad address (no VMA, PROT_NONE).
    public static let badAddress = Errno(rawValue: EFAULT)
    /// `EBUSY`
    public static let busy = Errno(rawValue: EBUSY)
    /// `EEXIST`
    public static let exists = Errno(rawValue: EEXIST)
    /// `ENODEV`
    public static let noDevice = Errno(rawValue: ENODEV)
    /// `EINVAL`: invalid argument.
    public static let invalidArgument = Errno(rawValue: EINVAL)
    /// `ENOSPC`
    public static let noSpace = Errno(rawValue: ENOSPC)
    /// `EFBIG`: a file would grow past the largest size it may have.
    public static let fileTooLarge = Errno(rawValue: EFBIG)
    /// `ERANGE`
    public static let outOfRange = Errno(rawValue: ERANGE)
    /// `ENOSYS`
    public static let notImplemented = Errno(rawValue: ENOSYS)
    /// `EOPNOTSUPP`
    public static let notSupported = Errno(rawValue: EOPNOTSUPP)
    /// `ETIMEDOUT`
    public static let timedOut = Errno(rawValue: ETIMEDOUT)
    /// `EBUSY`'s cousin used by migrate_pages: `EDEADLK`.
    public static let deadlock = Errno(rawValue: EDEADLK)

    /// The symbolic name, e.g. `EINVAL`.
    public var name: String {
        switch rawValue {
        case EPERM: "EPERM"
        case ENOENT: "ENOENT"
        case EINTR: "EINTR"
        case EIO: "EIO"
        case EAGAIN: "EAGAIN"
        case ENOMEM: "ENOMEM"
        case EACCES: "EACCES"
        case EFAULT: "EFAULT"
        case EBUSY: "EBUSY"
        case EEXIST: "EEXIST"
        case ENODEV: "ENODEV"
        case EINVAL: "EINVAL"
        case ENOSPC: "ENOSPC"
        case EFBIG: "EFBIG"
        case ERANGE: "ERANGE"
        case ENOSYS: "ENOSYS"
        case EOPNOTSUPP: "EOPNOTSUPP"
        case ETIMEDOUT: "ETIMEDOUT"
        case EDEADLK: "EDEADLK"
        default: "E\(rawValue)"
        }
    }

    /// The symbolic name and the C library's message: `EINVAL (Invalid argument)`.
    public var description: String {
        guard let cString = strerror(rawValue) else { return name }
        return "\(name) (\(String(cString: cString)))"
    }
}

/// What kind of rule a ``Diagnostic`` reports, for tests and tools that
/// match diagnostics (by kind, never by the text of the rule).
public enum DiagnosticKind: String, Sendable, Hashable, CaseIterable, Codable {
    /// A call out of sequence, or an argument the API documents as wrong
    /// (`WARN_ON`, `VM_BUG_ON` on a caller's input).
    case apiMisuse
    /// A function whose contract says a lock is held was called without it
    /// (`lockdep_assert_held()`, `mmap_assert_locked()`).
    case lockNotHeld
    /// A lock was held where none may be (`debug_check_no_locks_held()`).
    case lockHeld
    /// A CPU used a translation that a flush should have removed
    /// (``KernelConfiguration/checksStaleTLBEntries``).
    case staleTLB
    /// A reference count or map count went below zero, or a reference was
    /// taken on a folio that had none.
    case referenceCount
    /// A folio freed in a state it must not be freed in (`bad_page()`).
    case badPageState
    /// A wait reached its limit (the hung-task detector).
    case hungTask
    /// A limit of the emulated machine or the host: a table full, address
    /// space refused, more threads than CPUs.
    case machineLimit
}

/// A rule of the API that a caller (a driver) broke: the emulator's WARN_ON /
/// VM_BUG_ON. The emulated kernel records it, refuses the offending step, and
/// keeps its own state intact; it never corrupts memory silently.
public struct Diagnostic: Sendable, Hashable, CustomStringConvertible {
    /// What kind of rule was broken; match on this.
    public let kind: DiagnosticKind
    /// The rule broken, short and stable, for people, e.g.
    /// `"migrate_vma_pages: destination page must be locked"`.
    public let rule: String
    /// Which page, address or argument it concerned.
    public let detail: String
    /// A diagnostic of `rule` about `detail`, of kind `kind`.
    public init(rule: String, detail: String, kind: DiagnosticKind = .apiMisuse) {
        self.kind = kind
        self.rule = rule
        self.detail = detail
    }
    /// `WARNING: rule (detail)`, as the kernel log would show it.
    public var description: String { "WARNING: \(rule) (\(detail))" }
}

/// Stops the process for a broken contract that no error can answer (the
/// kernel's BUG_ON): a caller passed what the API documents as impossible.
/// The message names the rule and, unlike a `precondition`'s, is printed in
/// release builds too. Input that can be refused is refused with an
/// ``Errno`` or a diagnostic instead.
///
/// - Parameters:
///   - rule: the contract broken, with the offending value.
///   - file: the caller's file, for the message.
///   - line: the caller's line, for the message.
public func contractViolation(_ rule: @autoclosure () -> String,
                              file: StaticString = #fileID, line: UInt = #line) -> Never {
    fatalError("SVMEmu: \(rule())", file: file, line: line)
}
