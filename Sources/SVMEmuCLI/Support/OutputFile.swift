// Output files (`--svg`, `--trace`): checked before a run, written after it.
import ArgumentParser
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

    /// Refuses one file named by two output options (`--svg x --trace x`):
    /// the second write would replace the first silently. Paths are
    /// compared as the system resolves them: the same spelling, or two
    /// spellings of one existing file (same device and inode), or two
    /// spellings of one new file in the same directory.
    ///
    /// - Parameter files: each option's flag and path, nil when not given.
    /// - Throws: `ValidationError` (exit status 64) naming both flags and the path.
    public static func checkDistinct(_ files: [(flag: String, path: String?)]) throws(ValidationError) {
        let given = files.compactMap { f in f.path.map { (flag: f.flag, path: $0) } }
        for i in given.indices {
            for j in given.indices where j > i && sameFile(given[i].path, given[j].path) {
                throw ValidationError("\(given[i].flag) and \(given[j].flag) name the same file (\(given[j].path)); "
                                      + "the second would overwrite the first: give each its own path")
            }
        }
    }

    /// Whether `a` and `b` name one file: the same text, the same inode, or
    /// (for files not there yet) the same name in the same directory.
    static func sameFile(_ a: String, _ b: String) -> Bool {
        if a == b { return true }
        var sa = stat(), sb = stat()
        if stat(a, &sa) == 0 && stat(b, &sb) == 0 { return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino }
        func split(_ p: String) -> (dir: String, name: String) {
            guard let slash = p.lastIndex(of: "/") else { return (".", p) }
            let dir = String(p[..<slash])
            return (dir.isEmpty ? "/" : dir, String(p[p.index(after: slash)...]))
        }
        let (da, na) = split(a), (db, nb) = split(b)
        guard na == nb, !na.isEmpty else { return false }
        return stat(da, &sa) == 0 && stat(db, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }

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

    /// The temporary file `write` fills before renaming it to `target`: in
    /// the same directory (a rename does not cross file systems), hidden,
    /// named for the process.
    static func temporaryPath(for target: String) -> String {
        let slash = target.lastIndex(of: "/")
        let dir = slash.map { String(target[...$0]) } ?? ""
        let name = slash.map { String(target[target.index(after: $0)...]) } ?? target
        return dir + "." + name + ".svmemu-\(getpid()).tmp"
    }

    /// Whether `path` names something that is not a regular file (a
    /// device such as /dev/null or /dev/full, a FIFO, a terminal, or a
    /// symbolic link to one): `write` writes it in place, since renaming a
    /// file over it would replace the device node itself.
    static func writesInPlace(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && st.st_mode & S_IFMT != S_IFREG
    }

    /// The file a rename replaces: the file a symbolic link names (the
    /// link stays), else `path` itself.
    static func renameTarget(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// Writes `text` as the file's whole content (mode 0644 for a new file):
    /// into a temporary file in the same directory, renamed over `path`
    /// once complete, so that an interrupted or failed write never leaves a
    /// half-written file under the name asked for (a failed one removes
    /// its temporary file; SIGINT's handler does too, `Interrupt`). A
    /// symbolic link keeps pointing where it did: the file it names is
    /// replaced. What is not a regular file (`/dev/full`, `/dev/stdout`, a
    /// FIFO) is written in place, and its write errors are reported.
    ///
    /// - Throws: `CLIError.outputPath` with the path and the system's reason
    ///   (for /dev/full: "No space left on device").
    ///
    /// The corresponding C functions are `open`, `write`, `close` and `rename`.
    public func write(_ text: String) throws(CLIError) {
        if Self.writesInPlace(path) {
            do { try Self.write(text, to: path, truncate: false) } catch { throw .outputPath(path: path, reason: error.reason) }
            return
        }
        let target = Self.renameTarget(path)
        let temporary = Self.temporaryPath(for: target)
        Interrupt.writing(temporary)
        defer { Interrupt.writing(nil) }
        do { try Self.write(text, to: temporary, truncate: true) } catch {
            unlink(temporary)
            throw .outputPath(path: path, reason: error.reason)
        }
        guard rename(temporary, target) == 0 else {
            let reason = CLIError.reason(errno)
            unlink(temporary)
            throw .outputPath(path: path, reason: reason)
        }
    }

    /// Why a write failed.
    struct WriteFailure: Error { let reason: String }

    /// Writes all of `bytes` to `fd`, again after EINTR; returns the errno
    /// of a failed write, 0 when all was written.
    static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32 {
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                return errno
            }
            done += n
        }
        return 0
    }

    /// Writes `text` to the file at `path` (created if missing; emptied
    /// first with `truncate`).
    private static func write(_ text: String, to path: String, truncate: Bool) throws(WriteFailure) {
        let fd = open(path, O_WRONLY | O_CREAT | (truncate ? O_TRUNC : 0) | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw WriteFailure(reason: CLIError.reason(errno)) }
        var failure = Array(text.utf8).withUnsafeBytes { writeAll(fd, $0) }
        if close(fd) != 0 && failure == 0 { failure = errno }
        if failure != 0 { throw WriteFailure(reason: CLIError.reason(failure)) }
    }
}
