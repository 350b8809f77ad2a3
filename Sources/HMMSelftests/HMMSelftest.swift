import Foundation
import SVMEmu

/// One case of the kernel's hmm-tests (tools/testing/selftests/mm/hmm-tests.c)
/// as the emulator runs it: its fixture and name as the kernel's harness
/// prints them (`hmm.hmm_device_private.open_close`), and its body. The
/// bodies are the ported cases (the same return codes, cpages, faults,
/// bytes and permissions the kernel's test expects); ConformanceTests runs
/// every one, and `svmemu hmm-tests` prints them as kselftest TAP.
public struct HMMSelftest: Sendable, CustomStringConvertible {
    /// Which tests a case belongs to.
    public enum Origin: String, Sendable, Codable {
        /// In Linux 6.12's hmm-tests (the kernel rig's).
        case kernel612 = "6.12"
        /// In later kernels' hmm-tests (the device-THP cases of 2025).
        case newerKernel = "newer"
        /// The emulator's own case in the same shape (not in any kernel).
        case emulator
    }

    /// FIXTURE(hmm) or FIXTURE(hmm2).
    public let fixture: String
    /// The test's name (TEST_F(hmm, name)).
    public let name: String
    public let origin: Origin
    let body: @Sendable (HMMVariant) throws -> Void

    init(_ fixture: String, _ name: String, _ origin: Origin = .kernel612,
         _ body: @escaping @Sendable (HMMVariant) throws -> Void) {
        self.fixture = fixture
        self.name = name
        self.origin = origin
        self.body = body
    }

    /// `hmm.hmm_device_private.open_close`: fixture, variant, name.
    public func fullName(_ variant: HMMVariant) -> String {
        "\(fixture).\(fixture == "hmm2" ? "hmm2_" + variant.rawValue.dropFirst(4) : variant.rawValue).\(name)"
    }

    public var description: String { "\(fixture).\(name)" }

    /// Every case, in the kernel's order within each fixture (its TEST_F
    /// order in hmm-tests.c); the newer kernels' and the emulator's cases
    /// follow the 6.12 ones of their fixture.
    public static let all: [HMMSelftest] = [
        HMMSelftest("hmm", "open_close") { try HMMCases().open_close($0) },
        HMMSelftest("hmm", "anon_read") { try HMMCases().anon_read($0) },
        HMMSelftest("hmm", "anon_read_prot") { try HMMCases().anon_read_prot($0) },
        HMMSelftest("hmm", "anon_write") { try HMMCases().anon_write($0) },
        HMMSelftest("hmm", "anon_write_prot") { try HMMCases().anon_write_prot($0) },
        HMMSelftest("hmm", "anon_write_child") { try HMMForkCases().anon_write_child($0) },
        HMMSelftest("hmm", "anon_write_child_shared") { try HMMForkCases().anon_write_child_shared($0) },
        HMMSelftest("hmm", "anon_write_huge") { try HMMCases().anon_write_huge($0) },
        HMMSelftest("hmm", "anon_write_hugetlbfs") { try HMMHugeTLBCases().anon_write_hugetlbfs($0) },
        HMMSelftest("hmm", "file_read") { try HMMFileCases().file_read($0) },
        HMMSelftest("hmm", "file_write") { try HMMFileCases().file_write($0) },
        HMMSelftest("hmm", "migrate") { try HMMCases().migrate($0) },
        HMMSelftest("hmm", "migrate_file_private") { try HMMFileCases().migrate_file_private($0) },
        HMMSelftest("hmm", "migrate_fault") { try HMMCases().migrate_fault($0) },
        HMMSelftest("hmm", "migrate_release") { try HMMCases().migrate_release($0) },
        HMMSelftest("hmm", "migrate_shared") { try HMMCases().migrate_shared($0) },
        HMMSelftest("hmm", "migrate_multiple") { try HMMCases().migrate_multiple($0) },
        HMMSelftest("hmm", "anon_read_multiple") { try HMMCases().anon_read_multiple($0) },
        HMMSelftest("hmm", "anon_teardown") { try HMMCases().anon_teardown($0) },
        HMMSelftest("hmm", "mixedmap") { try HMMFileCases().mixedmap($0) },
        HMMSelftest("hmm", "compound") { try HMMHugeTLBCases().compound($0) },
        HMMSelftest("hmm", "exclusive") { try HMMExclusiveCases().exclusive($0) },
        HMMSelftest("hmm", "exclusive_mprotect") { try HMMExclusiveCases().exclusive_mprotect($0) },
        HMMSelftest("hmm", "exclusive_cow") { try HMMExclusiveCases().exclusive_cow($0) },
        HMMSelftest("hmm", "hmm_gup_test") { try HMMGUPCases().hmm_gup_test($0) },
        HMMSelftest("hmm", "hmm_cow_in_device") { try HMMForkCases().hmm_cow_in_device($0) },
        HMMSelftest("hmm", "migrate_anon_huge_empty", .newerKernel) { try HMMHugeCases().migrate_anon_huge_empty($0) },
        HMMSelftest("hmm", "migrate_anon_huge_zero", .newerKernel) { try HMMHugeCases().migrate_anon_huge_zero($0) },
        HMMSelftest("hmm", "migrate_anon_huge_free", .newerKernel) { try HMMHugeCases().migrate_anon_huge_free($0) },
        HMMSelftest("hmm", "migrate_anon_huge_fault", .newerKernel) { try HMMHugeCases().migrate_anon_huge_fault($0) },
        HMMSelftest("hmm", "migrate_partial_unmap_fault", .newerKernel) { try HMMHugeCases().migrate_partial_unmap_fault($0) },
        HMMSelftest("hmm", "migrate_remap_fault", .newerKernel) { try HMMHugeCases().migrate_remap_fault($0) },
        HMMSelftest("hmm", "migrate_anon_huge_err", .newerKernel) { try HMMHugeCases().migrate_anon_huge_err($0) },
        HMMSelftest("hmm", "migrate_anon_huge_zero_err", .newerKernel) { try HMMHugeCases().migrate_anon_huge_zero_err($0) },
        HMMSelftest("hmm", "pinned_page_is_not_migrated", .emulator) { try HMMGUPCases().pinned_page_is_not_migrated($0) },
        HMMSelftest("hmm2", "migrate_mixed") { try HMMCases().migrate_mixed($0) },
        HMMSelftest("hmm2", "snapshot") { try HMMCases().snapshot($0) },
        HMMSelftest("hmm2", "double_map") { try HMMCases().double_map($0) },
    ]

    /// The case `name` of `fixture`, or nil.
    public static func named(_ fixture: String, _ name: String) -> HMMSelftest? {
        all.first { $0.fixture == fixture && $0.name == name }
    }

    /// Runs the case on a fresh fixture of `variant`; what it found.
    public func run(_ variant: HMMVariant) -> HMMCheckRecord {
        let record = HMMCheckRecord()
        HMMCheckRecord.$current.withValue(record) {
            do { try body(variant) } catch is HMMRequirementFailed {
                record.terminate()    // the failed requirement is recorded already
            } catch {
                record.add(HMMFailure(file: "", line: 0, message: "threw \(error)"))
                record.terminate()
            }
        }
        return record
    }
}

/// One failed expectation of a case.
public struct HMMFailure: Sendable, Equatable, Codable {
    /// The source file (`HMMCases.swift`) and line of the check.
    public var file: String
    public var line: Int
    /// "Expected <the condition>" or what was thrown.
    public var message: String
}

/// What one run of a case found: its failed expectations, in order.
public final class HMMCheckRecord: @unchecked Sendable {
    /// The record of the case running on this task (the cases run on the
    /// caller's thread and start no thread that checks).
    @TaskLocal public static var current: HMMCheckRecord?

    private let lock = NSLock()
    private var list: [HMMFailure] = []

    public init() {}

    private var ended = false

    public var failures: [HMMFailure] { lock.withLock { list } }
    /// Whether a failed requirement or a thrown error ended the case.
    public var terminated: Bool { lock.withLock { ended } }

    func terminate() { lock.withLock { ended = true } }

    func add(_ failure: HMMFailure) { lock.withLock { list.append(failure) } }
}

/// A `require` that failed: the case ends (ASSERT_* in the kernel's harness).
public struct HMMRequirementFailed: Error, CustomStringConvertible {
    public let description: String
}

private func record(_ message: String, _ file: String, _ line: Int) {
    let name = file.split(separator: "/").last.map(String.init) ?? file
    let failure = HMMFailure(file: name, line: line, message: message)
    if let r = HMMCheckRecord.current {
        r.add(failure)
    } else {
        // No case is running: a fixture used on its own. Say it rather than lose it.
        FileHandle.standardError.write(Data("\(name):\(line): \(message)\n".utf8))
    }
}

/// EXPECT_TRUE: records a failure (the case goes on) when `condition` is false.
public func expect(_ condition: Bool, _ text: String, _ comment: @autoclosure () -> String = "",
                   file: String = #fileID, line: Int = #line) {
    guard !condition else { return }
    let c = comment()
    record("Expected " + text + (c.isEmpty ? "" : " (" + c + ")"), file, line)
}

/// ASSERT_TRUE: records a failure and ends the case when `condition` is false.
public func require(_ condition: Bool, _ text: String, _ comment: @autoclosure () -> String = "",
                    file: String = #fileID, line: Int = #line) throws {
    guard !condition else { return }
    let c = comment()
    let message = "Expected " + text + (c.isEmpty ? "" : " (" + c + ")")
    record(message, file, line)
    throw HMMRequirementFailed(description: message)
}

/// A failure with its own message.
public func recordIssue(_ message: String, file: String = #fileID, line: Int = #line) {
    record(message, file, line)
}
