import ArgumentParser

// Commands whose implementation lands with their issues. Each file replaces its
// stand-in here when it arrives.

struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "demo", abstract: "The livelock, its fix, and the overhead breakdown.")
    func run() throws { throw ValidationError("svmemu demo is not built yet") }
}
struct LivelockCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "livelock", abstract: "Fault storm: show the livelock and the trylock fix.")
    func run() throws { throw ValidationError("svmemu livelock is not built yet") }
}
struct OverheadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "overhead", abstract: "Where a fault's time goes.")
    func run() throws { throw ValidationError("svmemu overhead is not built yet") }
}
struct BenchMigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "migrate", abstract: "Round trip RAM -> VRAM -> RAM against memcpy.")
    func run() throws { throw ValidationError("svmemu bench migrate is not built yet") }
}
