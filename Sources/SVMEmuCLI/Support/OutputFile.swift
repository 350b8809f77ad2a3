// Output files (`--svg`, `--trace`): checked before a run, written after it.
#if canImport(Glibc)
import Glibc
#endif

/// A file a command writes its report to.
///
/// A run can take minutes; a path that cannot be written must be refused
/// before it starts, not after. `checkWritable()` makes the same system calls
/// the final write makes (an `open` for writing, creating the file if it is
/// not there), so what it accepts the write accepts, barring a change to the
/// file system in between.
public struct OutputFile: Sendable, Equatable {
    /// The path as the user gave it.
    public let path: String

    public init(_ path: String) { self.path = path }

    /// Checks that the file can be written: opens it for writing, creating it
    /// if it does not exist (and removing it again), never truncating it.
    ///
    /// - Throws: `CLIError.outputPath` with the path and the system's reason
    ///   (for a missing directory: "No such file or directory"; for a
    ///   directory given as the file: "Is a directory"; for a read-only
    ///   directory: "Permission denied").
    ///
    /// The corresponding C functions are `open` and `unlink`.
    public func checkWritable() throws(CLIError) {
        guard !path.isEmpty else { throw .outputPath(path: "''", reason: CLIError.reason(ENOENT)) }
        let existed = access(path, F_OK) == 0
        let fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .outputPath(path: path, reason: CLIError.reason(errno)) }
        close(fd)
        if !existed { unlink(path) }
    }

    /// Writes `text` as the file's whole content (created with mode 0644 if
    /// needed, truncated otherwise).
    ///
    /// - Throws: `CLIError.outputPath` with the path and the system's reason.
    ///
    /// The corresponding C functions are `open`, `write` and `close`.
    public func write(_ text: String) throws(CLIError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .outputPath(path: path, reason: CLIError.reason(errno)) }
        var failure: Int32 = 0
        var bytes = Array(text.utf8)
        bytes.withUnsafeMutableBytes { buffer in
            var done = 0
            while done < buffer.count {
                let n = Glibc.write(fd, buffer.baseAddress! + done, buffer.count - done)
                if n < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    return
                }
                done += n
            }
        }
        if close(fd) != 0 && failure == 0 { failure = errno }
        if failure != 0 { throw .outputPath(path: path, reason: CLIError.reason(failure)) }
    }
}
