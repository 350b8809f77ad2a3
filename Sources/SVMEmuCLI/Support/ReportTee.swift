// `--output FILE`: standard output copied into a file as the run writes it.
import ArgumentParser
import Foundation
#if canImport(Glibc)
import Glibc
#endif

extension ReportFileOptions {
    /// The `ReportFileOptions` group of a parsed command, nil for a command
    /// without one (`calibrate` declares its own `--output`, the profile, and `--quiet`).
    static func find(in command: Any) -> ReportFileOptions? {
        for child in Mirror(reflecting: command).children {
            if let group = child.value as? any ReflectedArgumentGroup, let files = group.reflectedGroup as? ReportFileOptions {
                return files
            }
        }
        return nil
    }
}

/// Standard output through a pipe: a thread copies every byte to the real
/// standard output as it comes (a run's live lines stay live) and keeps it;
/// `finish()` writes what was kept to the file (`OutputFile.write`: a
/// temporary file renamed, never a half-written one).
///
/// Not a hot path: one copy of the report.
final class ReportTee: @unchecked Sendable {
    let file: OutputFile
    /// The real standard output, duplicated.
    private let saved: Int32
    private let readEnd: Int32
    /// Written by the pump thread only, read after `done`.
    private var kept: [UInt8] = []
    /// The errno of a failed write to the real standard output, 0 if none.
    private var writeError: Int32 = 0
    private let done = DispatchSemaphore(value: 0)

    /// Starts the copy.
    ///
    /// - Throws: `CLIError.outputPath` when the pipe cannot be made.
    ///
    /// The corresponding C functions are `pipe`, `dup` and `dup2`.
    init(_ file: OutputFile) throws(CLIError) {
        self.file = file
        try StandardOutput.finish()
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw .outputPath(path: file.path, reason: CLIError.reason(errno)) }
        saved = dup(STDOUT_FILENO)
        readEnd = fds[0]
        guard saved >= 0, dup2(fds[1], STDOUT_FILENO) >= 0 else {
            throw .outputPath(path: "standard output", reason: CLIError.reason(errno))
        }
        close(fds[1])
        let thread = Thread { [self] in self.pump() }
        thread.start()
    }

    /// Copies the pipe to the real standard output and keeps it, until the
    /// write end is closed.
    private func pump() {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(readEnd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            kept.append(contentsOf: buffer[0..<n])
            if writeError == 0 { writeError = buffer.withUnsafeBytes { OutputFile.writeAll(saved, UnsafeRawBufferPointer(rebasing: $0[..<n])) } }
        }
        close(readEnd)
        done.signal()
    }

    /// Restores standard output, waits for the copy and writes the file
    /// (`keep`: false for a run that could not run, which leaves no file).
    ///
    /// - Throws: `CLIError.outputPath` for the file, or for standard output
    ///   when a write to it failed.
    func finish(keep: Bool = true) throws(CLIError) {
        try? StandardOutput.finish()
        dup2(saved, STDOUT_FILENO)  // closes the pipe's write end: the pump reads to its end
        done.wait()
        close(saved)  // only now: the pump writes to it until then
        if keep { try file.write(String(decoding: kept, as: UTF8.self)) }
        if writeError != 0 { throw .outputPath(path: "standard output", reason: CLIError.reason(writeError)) }
    }
}
