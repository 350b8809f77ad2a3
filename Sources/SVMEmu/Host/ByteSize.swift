// Byte counts as people write them: one reader for every size the command
// line, the harnesses and the reports take or show.

/// A byte count written as a number with an optional binary suffix: `65536`,
/// `512K`, `256M`, `1G`, `2MiB`, `4kb` (K, M, G, T are powers of 1024; an
/// `iB` or `B` after the letter is allowed; case does not matter; spaces
/// around it are ignored).
public enum ByteSize {
    public static let kib = 1 << 10
    public static let mib = 1 << 20
    public static let gib = 1 << 30
    public static let tib = 1 << 40

    /// The suffix letters and their multipliers, largest first (for `format`).
    static let units: [(letter: Character, bytes: Int)] = [("T", tib), ("G", gib), ("M", mib), ("K", kib)]

    /// The value of `text`, or nil if it is not a size (no digits, an
    /// unknown suffix, a value beyond `Int`). A sign is kept, so that `-3M`
    /// reaches the range check and is refused with the range.
    public static func parse(_ text: String) -> Int? {
        var s = Substring(text.uppercased())
        while s.first == " " { s.removeFirst() }
        while s.last == " " { s.removeLast() }
        for suffix in ["IB", "B"] where s.hasSuffix(suffix) && s.count > suffix.count {
            s.removeLast(suffix.count)
            break
        }
        var unit = 1
        if let last = s.last, let u = units.first(where: { $0.letter == last }) {
            unit = u.bytes
            s.removeLast()
        }
        guard let n = Int(s) else { return nil }
        let (bytes, overflow) = n.multipliedReportingOverflow(by: unit)
        return overflow ? nil : bytes
    }

    /// `bytes` with the largest suffix that divides it: 2097152 -> "2M",
    /// 524288 -> "512K", 4097 -> "4097".
    public static func format(_ bytes: Int) -> String {
        for u in units where bytes != 0 && bytes % u.bytes == 0 { return "\(bytes / u.bytes)\(u.letter)" }
        return "\(bytes)"
    }

    /// Like `format`, with one decimal in the largest unit not above the
    /// value (for figures, not arguments): 37580963840 -> "35.0 GiB".
    public static func describe(_ bytes: Int) -> String {
        for (letter, unit) in units where bytes >= unit {
            let tenths = (bytes * 10 + unit / 2) / unit
            return "\(tenths / 10).\(tenths % 10) \(letter)iB"
        }
        return "\(bytes) bytes"
    }
}
