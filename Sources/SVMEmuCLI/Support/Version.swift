// `svmemu --version` and the JSON reports' `version` and `revision`.
import Foundation

/// The package's version, and the git revision of the checkout the binary
/// was built in.
///
/// SwiftPM has no build-time constants without a build-tool plugin, and a
/// plugin that runs git on every build is neither offline-safe nor cheap.
/// So the version is a constant here, and the revision is read when asked,
/// from the files of the checkout the executable sits in (a binary built
/// with `swift build` lives in `<checkout>/.build/...`): `.git/HEAD` and the
/// ref it names (loose or in `packed-refs`, worktrees included). No process
/// is started; it costs a few small file reads. A binary copied out of its
/// `.build` directory has no revision. The revision is the checkout's at run
/// time: after a commit without a rebuild it is newer than the binary.
public enum SVMEmuVersion {
    /// The package version; raised by hand with each tagged release.
    public static let package = "0.1.0"

    /// The full commit hash of the checkout this executable was built in,
    /// or nil.
    public static var revision: String? { cachedRevision }
    private static let cachedRevision: String? = executablePath().flatMap(GitCheckout.revision(forExecutable:))

    /// What `svmemu --version` prints: "0.1.0 (git 36fa374c1d2e)" or "0.1.0".
    public static var description: String {
        revision.map { "\(package) (git \($0.prefix(12)))" } ?? package
    }

    /// The running executable's path (/proc/self/exe), symbolic links resolved.
    ///
    /// The corresponding C function is `readlink`.
    static func executablePath() -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// The few git files needed to name a checkout's commit, read directly.
enum GitCheckout {
    /// The commit of the checkout an executable at `path` was built in: the
    /// directory above the last `.build` component of the path (SwiftPM's
    /// build directory, `.build-*` too), if it holds `Package.swift` and
    /// `.git`. Nil otherwise.
    static func revision(forExecutable path: String) -> String? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        guard let build = parts.lastIndex(where: { $0 == ".build" || $0.hasPrefix(".build-") || $0.hasPrefix(".build_") }),
              build > 0 else { return nil }
        let checkout = parts[..<build].joined(separator: "/")
        guard access(checkout + "/Package.swift", F_OK) == 0 else { return nil }
        return revision(checkout: checkout)
    }

    /// The commit `HEAD` names in the checkout at `checkout`, or nil.
    static func revision(checkout: String) -> String? {
        guard let gitDir = gitDirectory(checkout),
              let head = readLine(gitDir + "/HEAD") else { return nil }
        guard head.hasPrefix("ref: ") else { return isCommitHash(head) ? head : nil }
        let ref = String(head.dropFirst("ref: ".count))
        // A worktree keeps HEAD in its own directory and refs in the common one.
        let common = readLine(gitDir + "/commondir").map { $0.hasPrefix("/") ? $0 : gitDir + "/" + $0 } ?? gitDir
        for dir in [gitDir, common] {
            if let hash = readLine(dir + "/" + ref), isCommitHash(hash) { return hash }
        }
        guard let packed = readFile(common + "/packed-refs") else { return nil }
        for line in packed.split(separator: "\n") where line.hasSuffix(" " + ref) {
            let hash = String(line.prefix { $0 != " " })
            if isCommitHash(hash) { return hash }
        }
        return nil
    }

    /// `.git` if it is a directory; the directory a `.git` file points to
    /// ("gitdir: ..."), for worktrees and submodules.
    static func gitDirectory(_ checkout: String) -> String? {
        let dotGit = checkout + "/.git"
        var st = stat()
        guard stat(dotGit, &st) == 0 else { return nil }
        if (st.st_mode & S_IFMT) == S_IFDIR { return dotGit }
        guard let line = readLine(dotGit), line.hasPrefix("gitdir: ") else { return nil }
        let dir = String(line.dropFirst("gitdir: ".count))
        return dir.hasPrefix("/") ? dir : checkout + "/" + dir
    }

    static func isCommitHash(_ s: String) -> Bool {
        (s.utf8.count == 40 || s.utf8.count == 64) && s.utf8.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) }
    }

    /// The first line of a small file, without its newline.
    static func readLine(_ path: String) -> String? {
        readFile(path).map { String($0.prefix { $0 != "\n" }) }
    }

    /// A small file's content, or nil.
    static func readFile(_ path: String) -> String? {
        FileManager.default.contents(atPath: path).map { String(decoding: $0, as: UTF8.self) }
    }
}
