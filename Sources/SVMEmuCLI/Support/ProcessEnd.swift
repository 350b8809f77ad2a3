// How `svmemu` ends: standard output checked, an interrupt reported, no
// half-written output file left behind.
import ArgumentParser
import SVMEmu
#if canImport(Glibc)
@preconcurrency import Glibc
#endif

extension SVMEmuCommand {
    /// Parses `arguments` (the process's by default), runs the command and
    /// exits: what `main.swift` calls instead of `main()`.
    ///
    /// Beyond `main()`: a closed standard output is refused before anything
    /// runs, and one that could not be written (a full disk, /dev/full) at
    /// the end turns status 0 (or 2) into 1 with a message on standard
    /// error; SIGINT ends the run with status 130 and one line on standard
    /// error (`Interrupt`); `svmemu help <unknown>` exits 64
    /// (`checkHelpTopic`); a command's `--quiet` turns the progress line
    /// off and its `--output FILE` gets a copy of standard output
    /// (`ReportFileOptions`, `ReportTee`), written when the run ends.
    public static func runAndExit(_ arguments: [String]? = nil) -> Never {
        Interrupt.install()
        do {
            try StandardOutput.checkOpen()
            try checkHelpTopic(arguments ?? Array(CommandLine.arguments.dropFirst()))
            var command = try parseAsRoot(arguments)
            Interrupt.running(JSONReport<Int>.commandPath(type(of: command)))
            let files = ReportFileOptions.find(in: command)
            if files?.quiet == true { ProgressLine.quiet = true }
            let tee = try files?.output.map { path throws(CLIError) in try ReportTee(OutputFile(path)) }
            do {
                try command.run()
            } catch {
                try StandardOutput.finish()
                // A status the report goes with (2, 3, or 1 after a failed check) keeps the file;
                // a run that could not run has no report to keep.
                try tee?.finish(keep: error is ExitCode)
                throw error
            }
            try StandardOutput.finish()
            try tee?.finish()
            exit()
        } catch let refusal as HostMemoryRefusal {
            exit(withError: CLIError.notEnoughMemory("svmemu \(String(cString: Interrupt.commandBuffer)): \(refusal)"))
        } catch {
            exit(withError: error)
        }
    }
}

/// Standard output at the end of a run.
public enum StandardOutput {
    /// The C library's `stdout`, read once the program runs (a global the
    /// C library owns).
    static func standardOutput() -> UnsafeMutablePointer<FILE> {
        nonisolated(unsafe) let stream = stdout
        return stream!
    }

    /// Refuses to run with standard output closed: the results would go
    /// nowhere, and the first file the run opens would take descriptor 1
    /// and receive them.
    ///
    /// - Throws: `CLIError.outputPath` ("standard output: Bad file descriptor").
    ///
    /// The corresponding C function is `fcntl(F_GETFD)`.
    static func checkOpen() throws(CLIError) {
        if fcntl(STDOUT_FILENO, F_GETFD) < 0 { throw .outputPath(path: "standard output", reason: CLIError.reason(errno)) }
    }

    /// Flushes `stream` (the C library's `stdout` by default, where `print`
    /// writes) and reports whether every write to it succeeded.
    ///
    /// - Throws: `CLIError.outputPath` with the system's reason ("No space
    ///   left on device" for /dev/full).
    ///
    /// The corresponding C functions are `fflush` and `ferror`.
    public static func finish(_ stream: UnsafeMutablePointer<FILE>? = nil) throws(CLIError) {
        let stream = stream ?? standardOutput()
        errno = 0
        let flushed = fflush(stream) == 0
        let code = errno
        guard flushed && ferror(stream) == 0 else {
            throw .outputPath(path: "standard output", reason: CLIError.reason(code != 0 ? code : EIO))
        }
    }
}

/// SIGINT (Ctrl-C) during a run: the process ends at once with status 130
/// (128 + SIGINT, as a shell reports it), after one line on standard error
/// that says what was interrupted and how far it had got (the last progress
/// status, when a progress line was shown), and after removing the
/// temporary file of an output being written. Output files are written to
/// a temporary name and renamed (`OutputFile.write`), so no half-written
/// file is ever left under the name asked for.
///
/// The handler only calls async-signal-safe functions (`write`, `unlink`,
/// `_exit`) on buffers prepared beforehand.
public enum Interrupt {
    static let capacity = 512
    /// The command ("numa"), the last progress status, the temporary file
    /// being written: NUL-terminated, read by the handler.
    nonisolated(unsafe) static let commandBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: capacity)
    nonisolated(unsafe) static let statusBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: capacity)
    nonisolated(unsafe) static var stderrIsTerminal = false
    nonisolated(unsafe) static let temporaryBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: Int(PATH_MAX) + 1)

    /// Installs the handler (once per process, before any thread starts)
    /// and unblocks SIGINT.
    ///
    /// The corresponding C functions are `sigaction` and `pthread_sigmask`.
    static func install() {
        stderrIsTerminal = isatty(STDERR_FILENO) != 0
        for b in [commandBuffer, statusBuffer, temporaryBuffer] { b[0] = 0 }
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in Interrupt.handle() }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        sigaction(SIGINT, &action, nil)
        // A parent may have started us with SIGINT blocked (a test runner's
        // thread does); the threads a run starts inherit this thread's mask.
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    /// Notes the subcommand's path ("bench migrate"), for the message.
    static func running(_ command: String) { store(command, in: commandBuffer, capacity: capacity) }

    /// Notes how far the run has got (what its progress line says).
    public static func note(_ status: String) { store(status, in: statusBuffer, capacity: capacity) }

    /// Notes the temporary file being written (nil: none).
    static func writing(_ path: String?) { store(path ?? "", in: temporaryBuffer, capacity: Int(PATH_MAX) + 1) }

    /// Orders the writers of the buffers: one command runs per process, but
    /// the test suites run several at once in one (the handler reads
    /// without it: it cannot take a lock).
    static let storeLock = LockedValue<Void>(())

    static func store(_ text: String, in buffer: UnsafeMutablePointer<CChar>, capacity: Int) {
        var bytes = Array(text.utf8.prefix(capacity - 1))
        bytes.append(0)
        storeLock.withLock { _ in
            // Terminate first, so the handler never reads a half-copied string unterminated.
            buffer[0] = 0
            bytes.withUnsafeBufferPointer { b in
                for i in (0..<b.count).reversed() { buffer[i] = CChar(bitPattern: b[i]) }
            }
        }
    }

    /// The handler: the line, the temporary file removed, `_exit(130)`.
    static func handle() -> Never {
        func put(_ s: UnsafePointer<CChar>) { _ = write(STDERR_FILENO, s, strlen(s)) }
        if stderrIsTerminal { put("\r\u{1B}[K") }  // over a progress line
        put("svmemu")
        if commandBuffer[0] != 0 { put(" "); put(commandBuffer) }
        put(": interrupted (SIGINT)")
        if statusBuffer[0] != 0 { put(" at: "); put(statusBuffer) } else { put(" before the run finished") }
        put("; the run did not finish and no output file was written\n")
        if temporaryBuffer[0] != 0 { unlink(temporaryBuffer) }
        _exit(130)
    }
}
