import Glibc
import MirrorDriver
import SVMStress
import Testing
@testable import SVMEmuCLI

/// A pseudo-terminal: `secondary` is a terminal for isatty; what is written
/// to it is read back from `primary`.
final class PseudoTerminal {
    let primary: Int32
    let secondary: Int32

    /// TIOCSPTLCK and TIOCGPTN (asm-generic/ioctls.h): unlock the secondary,
    /// read its number. posix_openpt and friends are not in Swift's Glibc module.
    static let unlockRequest: UInt = 0x4004_5431
    static let numberRequest: UInt = 0x8004_5430

    init() throws {
        let primary = open("/dev/ptmx", O_RDWR | O_NOCTTY)
        try #require(primary >= 0, "no /dev/ptmx")
        var unlock: Int32 = 0
        var number: Int32 = -1
        let secondary = ioctl(primary, Self.unlockRequest, &unlock) == 0 && ioctl(primary, Self.numberRequest, &number) == 0
            ? open("/dev/pts/\(number)", O_RDWR | O_NOCTTY) : -1
        if secondary < 0 { close(primary) }
        try #require(secondary >= 0, "cannot open the secondary of /dev/ptmx")
        self.primary = primary
        self.secondary = secondary
        // Raw: no newline translation or echo in what is read back.
        var t = termios()
        tcgetattr(secondary, &t)
        cfmakeraw(&t)
        tcsetattr(secondary, TCSANOW, &t)
    }

    /// Everything written so far (non-blocking read).
    func drain() -> String {
        let flags = fcntl(primary, F_GETFL)
        _ = fcntl(primary, F_SETFL, flags | O_NONBLOCK)
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(primary, $0.baseAddress!, $0.count) }
            guard n > 0 else { break }
            out += buffer[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    deinit {
        close(secondary)
        close(primary)
    }
}

@Suite("svmemu progress lines")
struct ProgressLineTests {
    @Test("a progress line shows when the stream it writes is a terminal, whatever standard output is")
    func decidedByItsOwnStream() throws {
        let terminal = try PseudoTerminal()
        let line = ProgressLine(label: "svmemu test", fd: terminal.secondary)
        #expect(line.enabled)
        #expect(line.sink != nil)
        line.say("round 1/3")
        line.done()
        #expect(terminal.drain() == "\r\u{1B}[Ksvmemu test: round 1/3\r\u{1B}[K")

        var ends: [Int32] = [0, 0]
        try #require(pipe(&ends) == 0)
        defer { close(ends[0]); close(ends[1]) }
        let piped = ProgressLine(label: "svmemu test", fd: ends[1])
        #expect(!piped.enabled)
        #expect(piped.sink == nil)
        piped.say("round 1/3")
        piped.done()
        _ = fcntl(ends[0], F_SETFL, O_NONBLOCK)
        var byte: UInt8 = 0
        #expect(read(ends[0], &byte, 1) == -1, "nothing written to a pipe")
        #expect(ProgressLine(label: "").fd == STDERR_FILENO, "standard error by default")
    }

    @Test("the livelock storm's progress goes to the progress line's stream when that is a terminal")
    func stormProgress() throws {
        let terminal = try PseudoTerminal()
        var s = StormSettings(faultPolicy: .trylock, driverLock: .exclusive, migrateToRAMWorkMicros: 0,
                              threads: 2, pages: 2, stallSeconds: 5)
        s.joinTimeoutSeconds = 10
        let r = try LivelockCommand.runStorm(s, label: "storm", progress: ProgressLine(label: "", fd: terminal.secondary))
        #expect(r.pagesMigrated == 2)
        let shown = terminal.drain()
        // The harness reports once more when the storm ends: at least that line, then the erase.
        #expect(shown.contains("storm: page 2/2"), "\(shown.debugDescription)")
        #expect(shown.hasSuffix("\r\u{1B}[K"))
    }
}
