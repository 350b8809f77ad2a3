import Foundation
import MirrorDriver
@testable import SVMStress

/// A storm result with the fields the exit status and the JSON depend on
/// (no storm is run).
func stormResult(livelocked: Bool, teardownClean: Bool = true, dataIntact: Bool = true,
                 error: String? = nil) throws -> StormResult {
    // CallStats has no public memberwise initializer; it decodes.
    let calls = try JSONDecoder().decode(CallStats.self, from: Data(
        #"{"total":0,"perPageMean":0,"perPageP50":0,"perPageP99":0,"perPageMax":0}"#.utf8))
    return StormResult(settings: StormSettings(), pagesMigrated: 0, livelocked: livelocked, stalledPage: livelocked ? 0 : nil,
                       stall: nil, migrateToRAMCalls: calls, faultRetries: 0, faultRetriesPerPage: .empty,
                       pageMicros: .empty, deviceMigrations: 0, seconds: 1, teardownClean: teardownClean,
                       teardownIssues: teardownClean ? [] : ["a folio stayed locked"], dataIntact: dataIntact,
                       error: error, perPage: [])
}
