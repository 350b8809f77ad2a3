import Foundation

/// The warning a benchmark prints first in a debug build, where its figures
/// mean nothing: `<command>: warning: this is a debug build; ...` on
/// standard error. Nothing in a release build.
func warnIfDebugBuild(_ command: String) {
    #if DEBUG
    FileHandle.standardError.write(Data("\(command): warning: this is a debug build; figures are not meaningful (use swift build -c release)\n".utf8))
    #endif
}
