import Foundation
import Testing

/// The outer-layer issue's measurable shape goals, read from the checkout
/// (Docs/backbone.md, "Where the outer layer stands"): no Swift file in
/// Sources over 500 lines, and at least 95% of SVMStress's public
/// declarations with a documentation comment.
@Suite("source shape")
struct SourceShapeTests {
    static let sources = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Sources")

    /// Every `.swift` file below `directory`, with its lines.
    static func swiftFiles(below directory: URL) throws -> [(path: String, lines: [Substring])] {
        guard let walker = FileManager.default.enumerator(at: directory, includingPropertiesForKeys: nil) else {
            throw CocoaError(.fileReadNoSuchFile)
        }
        var files: [(String, [Substring])] = []
        for case let url as URL in walker where url.pathExtension == "swift" {
            let text = try String(contentsOf: url, encoding: .utf8)
            var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
            if lines.last == "" { lines.removeLast() }
            files.append((url.path.replacingOccurrences(of: directory.path + "/", with: ""), lines))
        }
        return files
    }

    @Test("no Swift file in Sources is over 500 lines")
    func noLongFiles() throws {
        let files = try Self.swiftFiles(below: Self.sources)
        #expect(files.count > 100)
        let long = files.filter { $0.lines.count > 500 }.map { "\($0.path): \($0.lines.count) lines" }
        #expect(long.isEmpty, "split these files: \(long.joined(separator: ", "))")
    }

    @Test("at least 95% of SVMStress's public declarations are documented")
    func svmStressDocumented() throws {
        var total = 0, documented = 0
        var missing: [String] = []
        for file in try Self.swiftFiles(below: Self.sources.appendingPathComponent("SVMStress")) {
            for (i, line) in file.lines.enumerated() {
                let words = line.split(separator: " ").filter { !$0.hasPrefix("@") }
                guard words.first == "public", words.count > 1, words[1] != "import", words[1] != "extension" else { continue }
                total += 1
                // The comment stands above the declaration's attributes.
                var j = i - 1
                while j >= 0, file.lines[j].trimmingCharacters(in: .whitespaces).hasPrefix("@") { j -= 1 }
                let above = j >= 0 ? file.lines[j].trimmingCharacters(in: .whitespaces) : ""
                if above.hasPrefix("///") || above.hasSuffix("*/") { documented += 1 } else { missing.append("\(file.path):\(i + 1)") }
            }
        }
        #expect(total > 500)
        #expect(Double(documented) >= 0.95 * Double(total),
                "\(documented) of \(total) public declarations documented; first undocumented: \(missing.prefix(10).joined(separator: ", "))")
    }
}
