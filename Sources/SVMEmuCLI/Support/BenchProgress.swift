import Foundation

/// A one-line progress display on standard error for benchmarks that run for
/// more than a few seconds; silent when standard error is not a terminal (so
/// `--json` output piped elsewhere stays clean either way: it goes to stdout).
struct BenchProgress {
    let label: String
    let enabled = isatty(STDERR_FILENO) != 0

    func say(_ status: String) {
        guard enabled else { return }
        FileHandle.standardError.write(Data(("\r\u{1B}[K" + label + ": " + status).utf8))
    }

    /// Clears the line.
    func done() {
        guard enabled else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
    }
}
