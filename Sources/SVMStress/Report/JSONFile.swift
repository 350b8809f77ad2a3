import Foundation

/// Why a JSON file a user named cannot be used: one line for the user
/// ("No such file or directory", "missing key cases", ...).
public struct JSONFileFailure: Error, Sendable, Equatable {
    /// What is wrong, without the path.
    public let reason: String
}

/// Reading JSON files the user names (`--machine FILE`, `--reference FILE`),
/// with errors a user can read instead of Foundation's error domains.
enum JSONFile {
    /// The bytes of the file at `path`.
    static func read(_ path: String) throws(JSONFileFailure) -> Data {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw JSONFileFailure(reason: "No such file or directory")
        }
        if isDirectory.boolValue { throw JSONFileFailure(reason: "Is a directory") }
        do { return try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw JSONFileFailure(reason: FileManager.default.isReadableFile(atPath: path) ? error.localizedDescription : "Permission denied")
        }
    }

    /// `data` decoded as `T`; a failure names the key or the position.
    static func decode<T: Decodable>(_ type: T.Type, from data: Data) throws(JSONFileFailure) -> T {
        do { return try JSONDecoder().decode(type, from: data) } catch {
            switch error {
            case DecodingError.keyNotFound(let key, let c):
                throw JSONFileFailure(reason: "missing key \((c.codingPath.map(\.stringValue) + [key.stringValue]).joined(separator: "."))")
            case DecodingError.typeMismatch(_, let c), DecodingError.valueNotFound(_, let c):
                throw JSONFileFailure(reason: "wrong type at \(c.codingPath.map(\.stringValue).joined(separator: ".")): \(c.debugDescription)")
            case DecodingError.dataCorrupted(let c):
                throw JSONFileFailure(reason: "not valid JSON: \(c.underlyingError.map { "\($0)" } ?? c.debugDescription)")
            default:
                throw JSONFileFailure(reason: "\(error)")
            }
        }
    }
}
