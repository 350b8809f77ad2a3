import Foundation

/// Human-readable reports of storm results: one column per run, side by side.
public enum StormReport {

    /// A column's title: "legacy + exclusive".
    public static func title(_ r: StormResult) -> String {
        "\(r.settings.faultPolicy.rawValue) + \(r.settings.driverLock.rawValue) lock"
    }

    /// The table, then one paragraph per stall and per unclean teardown.
    public static func table(_ results: [StormResult], titles: [String]? = nil) -> String {
        guard !results.isEmpty else { return "" }
        let heads = titles ?? results.map(title)
        func num(_ v: Double) -> String {
            v == v.rounded() && abs(v) < 1e15 ? String(Int(v)) : String(format: "%.1f", v)
        }
        func dist(_ d: StormDistribution) -> String {
            d.count == 0 ? "-" : "\(num(d.mean)) / \(num(d.p50)) / \(num(d.p99)) / \(num(d.max))"
        }
        var rows: [(String, [String])] = []
        func row(_ name: String, _ f: (StormResult) -> String) { rows.append((name, results.map(f))) }
        row("scenario") { $0.settings.scenario.rawValue }
        row("fault policy") { $0.settings.faultPolicy.rawValue }
        row("driver lock in migrateToRAM") { $0.settings.driverLock.rawValue }
        row("migrateToRAM work (µs)") { String($0.settings.migrateToRAMWorkMicros) }
        if results.contains(where: { $0.settings.migrateToRAMLookupMicros > 0 }) {
            row("  before setup (µs)") { String($0.settings.migrateToRAMLookupMicros) }
        }
        row("threads x pages") { "\($0.settings.threads) x \($0.settings.pages) (\($0.settings.pageSize.rawValue))" }
        row("outcome") { r in
            if r.livelocked { return "LIVELOCK at page \(r.stalledPage ?? -1)" }
            if r.error != nil { return "ERROR" }
            return "completed"
        }
        row("pages migrated") { "\($0.pagesMigrated) / \($0.settings.pages)" }
        row("migrateToRAM calls") { String($0.migrateToRAMCalls.total) }
        row("  per page mean/p50/p99/max") { r in
            r.pagesMigrated == 0 ? "-" : "\(num(r.migrateToRAMCalls.perPageMean)) / \(num(r.migrateToRAMCalls.perPageP50)) / "
                + "\(num(r.migrateToRAMCalls.perPageP99)) / \(num(r.migrateToRAMCalls.perPageMax))"
        }
        if let stalled = results.first(where: { $0.stall != nil }), stalled.stall != nil {
            row("  on the stalled page") { r in r.stall.map { String($0.migrateToRAMCallsOnPage) } ?? "-" }
        }
        row("fault retries") { String($0.faultRetries) }
        row("  per page mean/p50/p99/max") { dist($0.faultRetriesPerPage) }
        if results.contains(where: { $0.settings.scenario == .pingPong || $0.settings.scenario == .twoDevices }) {
            row("migrations to device") { String($0.deviceMigrations) }
        }
        row("µs per page mean/p50/p99/max") { dist($0.pageMicros) }
        row("seconds") { String(format: "%.2f", $0.seconds) }
        row("teardown") { $0.teardownClean ? "clean" : "\($0.teardownIssues.count) issue(s)" }
        row("data after the storm") { $0.dataIntact ? "intact" : "NOT intact" }

        var table = Table([""] + heads, align: [.left], rule: true)
        for (name, cells) in rows { table.add([name] + cells) }
        var out = table.text
        for (i, r) in results.enumerated() {
            if let s = r.stall { out += "\n\(heads[i]): \(s.summary)\n" }
            if let e = r.error { out += "\n\(heads[i]): error: \(e)\n" }
            if !r.teardownClean {
                out += "\n\(heads[i]): teardown issues:\n" + r.teardownIssues.map { "  - \($0)\n" }.joined()
            }
        }
        return out
    }

    /// The progress line (no newline): pages done, calls, time since progress.
    public static func progressLine(_ p: StormProgress, label: String = "") -> String {
        var s = label.isEmpty ? "" : label + ": "
        s += "page \(p.pagesDone)/\(p.pages)  migrateToRAM calls \(p.migrateToRAMCalls)  retries \(p.faultRetries)  "
        s += String(format: "%.1f s", p.seconds)
        if p.secondsSinceProgress >= 0.5 { s += String(format: "  (no progress for %.1f s)", p.secondsSinceProgress) }
        return s
    }
}
