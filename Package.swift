// swift-tools-version: 6.1
// SVMEmu: a user-space emulator of Linux's device-memory migration (HMM / migrate_vma).
import PackageDescription

let strict: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "SVMEmu",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "SVMEmu", targets: ["SVMEmu"]),
        .library(name: "MirrorDriver", targets: ["MirrorDriver"]),
        .library(name: "GPUSVM", targets: ["GPUSVM"]),
        .library(name: "XeDriver", targets: ["XeDriver"]),
        .library(name: "SVMStress", targets: ["SVMStress"]),
        .library(name: "SVMDRM", targets: ["SVMDRM"]),
        .executable(name: "svmemu", targets: ["svmemu"]),
        .executable(name: "minimal-driver", targets: ["MinimalDriver"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        // `make docs`: the DocC site of SVMEmu (swift package generate-documentation).
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // Raw-memory atomics, futex waits and a futex mutex: the emulated kernel's
        // primitives, usable on pfn-indexed flat storage.
        .target(name: "CSVMSupport"),
        // The emulated kernel and hardware. What the kernel exports is `public`.
        .target(name: "SVMEmu", dependencies: ["CSVMSupport"], swiftSettings: strict),
        // The reference driver (like lib/test_hmm.c). Uses only public SVMEmu API.
        .target(name: "MirrorDriver", dependencies: ["SVMEmu"], swiftSettings: strict),
        // The machine profiles that ship with the package (Data/profiles/*.json).
        .target(name: "SVMProfiles", path: "Data", sources: ["ShippedProfiles.swift"],
                resources: [.copy("profiles"), .copy("kernel")], swiftSettings: strict),
        // The kernel's hmm-tests, ported: the cases and a kselftest-style
        // runner (`svmemu hmm-tests`, ConformanceTests). Public SVMEmu and
        // MirrorDriver API only.
        .target(name: "HMMSelftests", dependencies: ["SVMEmu", "MirrorDriver"], swiftSettings: strict),
        // The drm_gpusvm + drm_pagemap layer (drivers/gpu/drm/drm_gpusvm.c,
        // drm_pagemap.c) on the public SVMEmu API, and an Xe-like driver on it.
        .target(name: "GPUSVM", dependencies: ["SVMEmu"], swiftSettings: strict),
        .target(name: "XeDriver", dependencies: ["SVMEmu", "GPUSVM"], swiftSettings: strict),
        // Storm and overhead harnesses.
        .target(name: "SVMStress", dependencies: ["SVMEmu", "MirrorDriver", "GPUSVM", "XeDriver", "SVMProfiles"],
                swiftSettings: strict),
        // libdrm (Debian's libdrm-dev) and the nouveau SVM uAPI.
        .systemLibrary(name: "CLibDRM", pkgConfig: "libdrm",
                       providers: [.apt(["libdrm-dev"])]),
        .target(name: "SVMDRM", dependencies: ["CLibDRM", "SVMEmu", "MirrorDriver"], swiftSettings: strict),
        // The commands of `svmemu` (argument parsing, validation, reports), as a
        // library so that the tests can parse and check them; not a product.
        .target(
            name: "SVMEmuCLI",
            dependencies: [
                "SVMEmu", "MirrorDriver", "SVMStress", "SVMDRM", "HMMSelftests",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict),
        .executableTarget(name: "svmemu", dependencies: ["SVMEmuCLI"], swiftSettings: strict),
        .executableTarget(name: "MinimalDriver", dependencies: ["SVMEmu"],
                          path: "Examples/MinimalDriver", swiftSettings: strict),
        // The test machine (TestMachine: boot, teardown, audit) and bounded thread runs shared by the test suites (not a product).
        .target(name: "TestSupport", dependencies: ["CTestSupport", "SVMEmu", "MirrorDriver"], path: "Tests/TestSupport", swiftSettings: strict),
        // The test machine's start: lock-order validation on for every test (a load-time constructor).
        .target(name: "CTestSupport", dependencies: ["CSVMSupport"], path: "Tests/CTestSupport"),
        .testTarget(name: "SVMEmuTests", dependencies: ["SVMEmu", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "MirrorDriverTests", dependencies: ["SVMEmu", "MirrorDriver", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "SVMStressTests", dependencies: ["SVMEmu", "MirrorDriver", "SVMStress", "XeDriver", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "SVMEmuCLITests", dependencies: [
            "SVMEmuCLI", "SVMEmu", "SVMStress", "SVMDRM", "MirrorDriver", "TestSupport",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: strict),
        .testTarget(name: "SVMDRMTests", dependencies: ["SVMDRM", "SVMEmu", "MirrorDriver", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "XeDriverTests", dependencies: ["SVMEmu", "GPUSVM", "XeDriver", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "ConformanceTests", dependencies: ["SVMEmu", "MirrorDriver", "HMMSelftests", "TestSupport"],
                    exclude: ["Fixtures"], swiftSettings: strict),
    ]
)
