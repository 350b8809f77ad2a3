import ArgumentParser
import Glibc
import Testing
@testable import SVMEmuCLI

/// Writes `text` to `path`, making the directories on the way.
private func put(_ text: String, _ path: String) throws {
    var dir = ""
    for part in path.split(separator: "/").dropLast() {
        dir += "/" + part
        mkdir(dir, 0o755)
    }
    try OutputFile(path).write(text)
}

@Suite("svmemu --version")
struct VersionTests {
    static let hash = "36fa3740457482ae4d98aecb030d1fbca250453b"
    static let other = "02eb43d0000000000000000000000000000000aa"

    @Test("--version prints the package version; the root help offers it")
    func versionFlag() throws {
        #expect(SVMEmuCommand.configuration.version.hasPrefix(SVMEmuVersion.package))
        #expect(SVMEmuCommand.helpMessage().contains("--version"))
        do {
            _ = try SVMEmuCommand.parseAsRoot(["--version"])
            Issue.record("--version did not exit")
        } catch {
            #expect(SVMEmuCommand.exitCode(for: error) == .success)
            #expect(SVMEmuCommand.message(for: error) == SVMEmuVersion.description)
        }
    }

    @Test("the revision comes from HEAD and its ref (loose, packed, detached) of the checkout above .build")
    func revisionFromCheckout() throws {
        try withScratchDirectory { dir in
            let checkout = dir + "/pkg"
            try put("// swift-tools-version: 6.1\n", checkout + "/Package.swift")
            try put("ref: refs/heads/cli\n", checkout + "/.git/HEAD")
            let binary = checkout + "/.build/x86_64-unknown-linux-gnu/release/svmemu"
            #expect(GitCheckout.revision(forExecutable: binary) == nil, "no ref yet")

            try put("# pack-refs with: peeled fully-peeled sorted\n\(Self.other) refs/heads/cli\n", checkout + "/.git/packed-refs")
            #expect(GitCheckout.revision(forExecutable: binary) == Self.other, "packed ref")

            try put(Self.hash + "\n", checkout + "/.git/refs/heads/cli")
            #expect(GitCheckout.revision(forExecutable: binary) == Self.hash, "a loose ref wins over packed-refs")

            try put(Self.other + "\n", checkout + "/.git/HEAD")
            #expect(GitCheckout.revision(forExecutable: binary) == Self.other, "detached HEAD")

            #expect(GitCheckout.revision(forExecutable: dir + "/bin/svmemu") == nil, "not in a .build directory")
            #expect(GitCheckout.revision(forExecutable: dir + "/.build/debug/svmemu") == nil, "no Package.swift above .build")
        }
    }

    @Test("a worktree's .git file leads to its HEAD, and its refs in the common directory")
    func worktree() throws {
        try withScratchDirectory { dir in
            try put("ref: refs/heads/feature\n", dir + "/main/.git/worktrees/wt/HEAD")
            try put("../..\n", dir + "/main/.git/worktrees/wt/commondir")
            try put(Self.hash + "\n", dir + "/main/.git/refs/heads/feature")
            try put("gitdir: \(dir)/main/.git/worktrees/wt\n", dir + "/wt/.git")
            try put("", dir + "/wt/Package.swift")
            #expect(GitCheckout.revision(forExecutable: dir + "/wt/.build/debug/svmemu") == Self.hash)
        }
    }
}
