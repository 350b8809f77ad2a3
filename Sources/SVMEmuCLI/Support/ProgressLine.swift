// The one-line progress display of long runs.
#if canImport(Glibc)
import Glibc
#endif

/// A progress line for runs that take more than a few seconds, rewritten in
/// place (`\r`, erase to end of line) on one stream, standard error by
/// default.
///
/// Whether it shows is decided by the stream it writes to: it is silent when
/// that stream is not a terminal, so a redirected standard error stays free
/// of control characters whatever standard output is (and `--json` on
/// standard output is never mixed with it).
public struct ProgressLine: Sendable {
    /// Prefixed to every status ("svmemu bench thp: ..."); empty for none.
    public let label: String
    /// The file descriptor written to.
    public let fd: Int32
    /// `isatty(fd)`, read once, and not `--quiet`.
    public let enabled: Bool

    /// `--quiet` (`ReportFileOptions`): every progress line off. Set once,
    /// before the run starts its threads (`SVMEmuCommand.runAndExit`).
    nonisolated(unsafe) static var quiet = false

    static let eraseLine = "\r\u{1B}[K"

    public init(label: String, fd: Int32 = STDERR_FILENO) {
        self.label = label
        self.fd = fd
        enabled = !Self.quiet && isatty(fd) != 0
    }

    /// Replaces the line with `status`.
    public func say(_ status: String) {
        guard enabled else { return }
        Interrupt.note((label.isEmpty ? "" : label + ": ") + status)
        put(Self.eraseLine + (label.isEmpty ? "" : label + ": ") + status)
    }

    /// Clears the line.
    public func done() {
        guard enabled else { return }
        put(Self.eraseLine)
    }

    /// `say` as a closure for the harnesses' `progress` settings; nil when
    /// the line is off, so that a harness does not even format its status.
    public var sink: (@Sendable (String) -> Void)? {
        guard enabled else { return nil }
        let line = self
        return { @Sendable status in line.say(status) }
    }

    /// Writes all of `text` (a progress line is best effort: errors end it).
    ///
    /// The corresponding C function is `write`.
    private func put(_ text: String) {
        var bytes = Array(text.utf8)
        bytes.withUnsafeMutableBytes { buffer in
            var done = 0
            while done < buffer.count {
                let n = write(fd, buffer.baseAddress! + done, buffer.count - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return }
                done += n
            }
        }
    }
}
