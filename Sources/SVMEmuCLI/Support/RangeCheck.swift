// Numeric arguments: one message shape for a value outside its range.
import ArgumentParser

/// Refuses `value` outside `range` with the flag, the range and the value:
/// "--rounds must be 1...20 (got -3)". Numeric options are declared with
/// `parsing: .unconditional`, so that `--rounds -3` reaches this check
/// instead of ArgumentParser reading `-3` as an unknown flag ("Missing value").
///
/// - Throws: `ValidationError` (exit status 64).
func checkRange<T: Comparable>(_ value: T, _ range: ClosedRange<T>, flag: String) throws(ValidationError) {
    guard range.contains(value) else {
        throw ValidationError("\(flag) must be \(range.lowerBound)...\(range.upperBound) (got \(value))")
    }
}
