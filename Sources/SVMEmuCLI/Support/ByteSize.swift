// Sizes on the command line (`--size`, `--max-size`): checked against each
// flag's range with `ByteSize`'s one set of rules.
import ArgumentParser
import SVMEmu

extension ByteSize {
    /// The value of `text` given for `flag`, checked against `range` and
    /// `multiple`.
    ///
    /// - Throws: `ValidationError` (exit status 64) whose message names the
    ///   flag, what was given, and the allowed range: "--size must be 2M to
    ///   64G (got 0)".
    public static func check(_ text: String, flag: String, range: ClosedRange<Int>,
                             multiple: Int = 1) throws(ValidationError) -> Int {
        let allowed = "\(format(range.lowerBound)) to \(format(range.upperBound))"
            + (multiple > 1 ? ", a multiple of \(format(multiple))" : "")
        guard let bytes = parse(text) else {
            throw ValidationError("\(flag): '\(text)' is not a size; give bytes with an optional K, M or G suffix "
                                  + "(binary units), \(allowed)")
        }
        guard range.contains(bytes) else { throw ValidationError("\(flag) must be \(allowed) (got \(text))") }
        guard bytes % multiple == 0 else { throw ValidationError("\(flag) must be \(allowed) (got \(text))") }
        return bytes
    }
}
