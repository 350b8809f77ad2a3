// `svmemu --version` and the JSON reports' `version`.

/// The package's version.
public enum SVMEmuVersion {
    /// The package version, set by hand when a release is tagged (SwiftPM
    /// has no build-time constants without a plugin).
    public static let package = "0.1.0"

    /// The git revision of the checkout the binary was built in; nil until
    /// revisions are read (see `--version`).
    public static var revision: String? { nil }
}
