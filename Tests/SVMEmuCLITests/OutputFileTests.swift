import ArgumentParser
import Foundation
import Glibc
import Testing
@testable import SVMEmuCLI

/// A fresh directory under /tmp, removed with everything in it afterwards.
func withScratchDirectory<R>(_ body: (String) throws -> R) throws -> R {
    var template = Array("/tmp/svmemu-cli-test-XXXXXX".utf8CString)
    let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    let dir = try #require(made.map { String(cString: $0) })
    defer {
        chmod(dir, 0o700)
        try? FileManager.default.removeItem(atPath: dir)
    }
    return try body(dir)
}

@Suite("svmemu output files")
struct OutputFileTests {
    @Test("a file in a directory that does not exist is refused with the path and the system's reason")
    func missingDirectory() throws {
        #expect(throws: CLIError.outputPath(path: "/nonexistent/svmemu/phases.svg", reason: "No such file or directory")) {
            try OutputFile("/nonexistent/svmemu/phases.svg").checkWritable()
        }
    }

    @Test("a path through a regular file, and a directory given as the file, are refused")
    func notADirectory() throws {
        try withScratchDirectory { dir in
            let file = OutputFile(dir + "/plain")
            try file.write("x")
            #expect(throws: CLIError.outputPath(path: dir + "/plain/trace.json", reason: "Not a directory")) {
                try OutputFile(dir + "/plain/trace.json").checkWritable()
            }
            #expect(throws: CLIError.outputPath(path: dir, reason: "Is a directory")) {
                try OutputFile(dir).checkWritable()
            }
        }
    }

    @Test("a read-only directory is refused (as a user other than root, who may write anyway)",
          .enabled(if: getuid() != 0))
    func readOnlyDirectory() throws {
        try withScratchDirectory { dir in
            chmod(dir, 0o500)
            #expect(throws: CLIError.outputPath(path: dir + "/x.svg", reason: "Permission denied")) {
                try OutputFile(dir + "/x.svg").checkWritable()
            }
        }
    }

    @Test("the check leaves no file behind and does not touch an existing one; the write replaces the content")
    func checkHasNoEffect() throws {
        try withScratchDirectory { dir in
            let fresh = dir + "/fresh.svg"
            try OutputFile(fresh).checkWritable()
            #expect(access(fresh, F_OK) != 0, "the check removed the file it created")
            let kept = OutputFile(dir + "/kept.json")
            try kept.write("first content")
            try kept.checkWritable()
            var st = stat()
            #expect(stat(kept.path, &st) == 0 && st.st_size == 13, "not truncated by the check")
            try kept.write("two")
            #expect(stat(kept.path, &st) == 0 && st.st_size == 3, "truncated by the write")
        }
    }

    @Test("an output file that is a device (/dev/full) is written in place and its error reported; a symbolic link stays a link and its file gets the report")
    func devicesAndLinks() throws {
        // Renaming a finished file over /dev/full would replace the device
        // node with a regular file: the path must be written in place.
        try #require(OutputFile.writesInPlace("/dev/full") && OutputFile.writesInPlace("/dev/null"))
        #expect(throws: CLIError.outputPath(path: "/dev/full", reason: "No space left on device")) {
            try OutputFile("/dev/full").write("report")
        }
        var st = stat()
        #expect(stat("/dev/full", &st) == 0 && st.st_mode & S_IFMT == S_IFCHR, "/dev/full is still a character device")
        try OutputFile("/dev/null").write("report")
        #expect(stat("/dev/null", &st) == 0 && st.st_mode & S_IFMT == S_IFCHR)
        try withScratchDirectory { dir in
            #expect(!OutputFile.writesInPlace(dir + "/report.txt"), "a new file: temporary, then rename")
            try FileManager.default.createDirectory(atPath: dir + "/data", withIntermediateDirectories: false)
            let target = dir + "/data/report.txt"
            try OutputFile(target).write("old")
            #expect(symlink(target, dir + "/latest.txt") == 0)
            #expect(!OutputFile.writesInPlace(dir + "/latest.txt"), "a link to a regular file")
            try OutputFile(dir + "/latest.txt").write("new report")
            #expect(lstat(dir + "/latest.txt", &st) == 0 && st.st_mode & S_IFMT == S_IFLNK, "the link is still a link")
            #expect(try String(contentsOfFile: target, encoding: .utf8) == "new report")
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/data") == ["report.txt"], "no temporary file left")
        }
    }

    @Test("overhead refuses an unwritable --svg or --trace before any run, with exit status 1 and no usage line")
    func overheadChecksPathsFirst() throws {
        // preflight() is the first thing run() does; the run is kept tiny so
        // that a regression costs a second, not a 256 MiB run.
        var command = try SVMEmuCommand.parseAsRoot(
            ["overhead", "--size", "2M", "--rounds", "1", "--granularity", "4k", "--direction", "to-ram",
             "--trace", "/nonexistent/svmemu/faults.json"])
        let overhead = try #require(command as? OverheadCommand)
        #expect(throws: CLIError.outputPath(path: "/nonexistent/svmemu/faults.json", reason: "No such file or directory")) {
            try overhead.preflight()
        }
        do {
            try command.run()
            Issue.record("the run was not refused")
        } catch {
            #expect(error as? CLIError == .outputPath(path: "/nonexistent/svmemu/faults.json", reason: "No such file or directory"))
            #expect(SVMEmuCommand.exitCode(for: error) == ExitStatus.failure)
            let message = SVMEmuCommand.message(for: error)
            #expect(message == "cannot write /nonexistent/svmemu/faults.json: No such file or directory")
            #expect(!message.contains("Usage"))
        }
    }
}
