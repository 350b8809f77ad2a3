import Foundation

/// What a run of the hmm-tests covers.
public struct HMMSelftestOptions: Sendable, Equatable {
    /// Run the hmm_device_coherent variants on the emulator's coherent
    /// device memory; false: skip them as the kernel does when test_hmm has
    /// no coherent device (loaded without spm_addr_dev0/1, as on the rig).
    public var coherentDevice = true
    /// Add the cases later kernels have (device THP, 2025) after the 6.12 ones.
    public var newerKernelCases = false
    /// Add the emulator's own cases in the same shape.
    public var emulatorCases = false

    public init() {}
}

/// One case's outcome, numbered as the harness numbers it.
public struct HMMSelftestResult: Sendable, Equatable, Codable {
    public var number: Int
    /// `hmm.hmm_device_private.open_close`.
    public var name: String
    /// pass, fail or skip.
    public var result: String
    /// Why a case was skipped.
    public var skipReason: String?
    /// Its failed expectations.
    public var failures: [HMMFailure]
    /// Whether a failed requirement (or a thrown error) ended it early.
    public var terminated: Bool
    /// Host seconds the case took.
    public var seconds: Double
}

/// The outcome of a run: every case, and the harness's totals.
public struct HMMSelftestReport: Sendable, Equatable, Encodable {
    public var tests: [HMMSelftestResult]
    public var pass: Int
    public var fail: Int
    public var skip: Int
    /// Whether the coherent variants ran (false: skipped as on a kernel without a coherent device).
    public var coherentDevice: Bool
    /// The kselftest TAP text.
    public var tap: String

    enum CodingKeys: String, CodingKey { case tests, pass, fail, skip, coherentDevice }
}

/// Runs the hmm-tests the way the kernel's kselftest harness does
/// (tools/testing/selftests/kselftest_harness.h): fixture by fixture, each
/// fixture's variants in order, each variant's tests in order; and prints
/// the same TAP lines, so that the output compares line by line with a real
/// kernel's selftest log.
public enum HMMSelftestRunner {
    /// The kernel's reason for a coherent variant without a coherent device.
    public static let coherentSkipReason = "DEVICE_COHERENT not available"
    /// What hmm_open() prints on standard error for the missing device.
    public static let coherentOpenFailure = "could not open hmm dmirror driver (/dev/hmm_dmirror2)"

    /// The cases and variants of a run, in the harness's order.
    public static func plan(_ options: HMMSelftestOptions) -> [(test: HMMSelftest, variant: HMMVariant)] {
        let tests = HMMSelftest.all.filter {
            switch $0.origin {
            case .kernel612: true
            case .newerKernel: options.newerKernelCases
            case .emulator: options.emulatorCases
            }
        }
        var plan: [(HMMSelftest, HMMVariant)] = []
        for fixture in ["hmm", "hmm2"] {
            for variant in HMMVariant.allCases {
                for t in tests where t.fixture == fixture { plan.append((t, variant)) }
            }
        }
        return plan
    }

    /// Runs the plan; `line` hears each TAP line as it is made (standard
    /// output), `diagnostic` what the kernel's test prints on standard error.
    public static func run(_ options: HMMSelftestOptions, line: (String) -> Void = { _ in },
                           diagnostic: (String) -> Void = { _ in }) -> HMMSelftestReport {
        let plan = plan(options)
        var tap = ""
        func say(_ s: String) {
            tap += s + "\n"
            line(s)
        }
        let fixtures = Set(plan.map { "\($0.test.fixture)/\($0.variant)" }).count
        say("TAP version 13")
        say("1..\(plan.count)")
        say("# Starting \(plan.count) tests from \(fixtures) test cases.")
        var results: [HMMSelftestResult] = []
        for (i, (test, variant)) in plan.enumerated() {
            let name = test.fullName(variant)
            say("#  RUN           \(name) ...")
            let start = DispatchTime.now().uptimeNanoseconds
            if variant.isCoherent && !options.coherentDevice {
                diagnostic(coherentOpenFailure)
                say("#      SKIP      \(coherentSkipReason)")
                say("#            OK  \(name)")
                say("ok \(i + 1) \(name) # SKIP \(coherentSkipReason)")
                results.append(HMMSelftestResult(number: i + 1, name: name, result: "skip", skipReason: coherentSkipReason,
                                                 failures: [], terminated: false, seconds: 0))
                continue
            }
            let record = test.run(variant)
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            let failures = record.failures
            let terminated = record.terminated
            for f in failures {
                say("# \(f.file):\(f.line):\(test.name):\(f.message)")
            }
            if terminated { say("# \(test.name): Test terminated by assertion") }
            if failures.isEmpty && !terminated {
                say("#            OK  \(name)")
                say("ok \(i + 1) \(name)")
            } else {
                say("#          FAIL  \(name)")
                say("not ok \(i + 1) \(name)")
            }
            results.append(HMMSelftestResult(number: i + 1, name: name,
                                             result: failures.isEmpty && !terminated ? "pass" : "fail", skipReason: nil,
                                             failures: failures, terminated: terminated, seconds: seconds))
        }
        let pass = results.filter { $0.result == "pass" }.count
        let fail = results.filter { $0.result == "fail" }.count
        let skip = results.filter { $0.result == "skip" }.count
        say("# \(fail == 0 ? "PASSED" : "FAILED"): \(pass + skip) / \(plan.count) tests passed.")
        say("# Totals: pass:\(pass) fail:\(fail) xfail:0 xpass:0 skip:\(skip) error:0")
        return HMMSelftestReport(tests: results, pass: pass, fail: fail, skip: skip,
                                 coherentDevice: options.coherentDevice, tap: tap)
    }
}
