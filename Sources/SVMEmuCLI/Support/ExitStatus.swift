// What `svmemu` exits with, and the errors that are not argument errors.
import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// The exit statuses of every `svmemu` command (also in the commands' help,
/// README.md and Docs/livelock.md):
///
/// - 0: the command ran and printed its results. A detected livelock is a
///   result: `svmemu livelock` exits 0 on it unless `--fail-on-livelock`.
/// - 1 (`failure`): the command could not run or its run failed: an output
///   path cannot be written, the host has too little memory for the size
///   asked, a harness error, a storm thread's access failed, a teardown that
///   was not clean, data that did not survive. The message says which, with
///   the path or the figures; no usage line.
/// - 2 (`livelockDetected`): `svmemu livelock --fail-on-livelock` and the
///   watchdog declared a livelock (and nothing else failed: 1 wins).
/// - 64 (ArgumentParser's `validationFailure`, EX_USAGE): an argument is
///   invalid; the message names the flag and what it accepts, then the usage.
/// - 130: interrupted by SIGINT (`Interrupt`): one line on standard error.
///
/// Status 1 also covers a host that refuses the machine's address space
/// (`HostMemoryRefusal`, under `ulimit -v`) and a standard output that
/// cannot be written (`StandardOutput`).
public enum ExitStatus {
    public static let success = ExitCode.success
    public static let failure = ExitCode.failure
    public static let livelockDetected = ExitCode(2)
    /// `svmemu explore` found a livelock, deadlock, lost write, leak or
    /// invariant violation; `svmemu merge`: a seed of the sweep failed.
    public static let found = ExitCode(3)
    public static let usage = ExitCode.validationFailure

    /// The paragraph the commands' help ends with.
    static let helpParagraph = """
        Exit status: 0 the run finished and its results are printed; 1 the command could not \
        run or its run failed (an output path or standard output that cannot be written, too \
        little memory or address space, a failed check); 64 an invalid argument (the message \
        names the flag and its range; one path for two output files); 130 interrupted (SIGINT).
        """
}

/// An error that is not about the arguments' syntax: the host cannot do what
/// was asked, or the run failed. ArgumentParser prints `Error: <description>`
/// without the usage line and exits with status 1 (`ExitStatus.failure`).
public enum CLIError: Error, CustomStringConvertible, Equatable {
    /// An output file cannot be created or written: the path and the
    /// system's reason (strerror of the errno).
    case outputPath(path: String, reason: String)
    /// The host has less memory available than the run needs.
    case notEnoughMemory(String)
    /// A harness or the emulator reported a failure.
    case runFailed(String)

    public var description: String {
        switch self {
        case .outputPath(let path, let reason): "cannot write \(path): \(reason)"
        case .notEnoughMemory(let m), .runFailed(let m): m
        }
    }

    /// The system's text for `errno` (strerror), e.g. "No such file or directory".
    static func reason(_ code: Int32) -> String {
        guard let text = strerror(code) else { return "errno \(code)" }
        return String(cString: text)
    }
}
