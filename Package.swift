// swift-tools-version: 6.1
import PackageDescription

// Data flow: KVM (ioctls, vCPU) -> Devices (deterministic models) -> EventLog (on-disk/wire format)
// -> Machine (board, run loop, record/replay sessions) -> Pair (channel, output gate, fencing, failover) -> lockstep CLI.
let package = Package(
    name: "Lockstep",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "lockstep", targets: ["lockstep"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        // Thin C shim: ioctl numbers, kvm_run access, the kick signal, page loops, CRC32C.
        .target(name: "CLockstep"),
        .systemLibrary(name: "CCapstone", pkgConfig: "capstone", providers: [.apt(["libcapstone-dev"])]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .target(name: "KVM", dependencies: ["CLockstep"]),
        .target(name: "Devices"),
        .target(name: "EventLog", dependencies: ["CLockstep"]),
        .target(name: "Machine", dependencies: ["KVM", "Devices", "EventLog", "CLockstep", "CCapstone", "COpenSSL"]),
        // The FT link: frames, handshake, pre-shared-key auth, AES-256-GCM, heartbeats.
        .target(name: "Channel", dependencies: ["CLockstep", "COpenSSL"]),
        // Pure failover state machine and the fence (no split brain).
        .target(name: "Failover", dependencies: ["CLockstep", "EventLog", "COpenSSL"]),
        // The live pair: primary/secondary sessions, output gate, status, lag harness.
        .target(name: "Pair", dependencies: ["Machine", "EventLog", "Channel", "Failover",
                                             .product(name: "Histogram", package: "hdrhistogram-swift")]),
        .executableTarget(name: "lockstep", dependencies: [
            "Machine", "Pair", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices"]),
        .testTarget(name: "EventLogTests", dependencies: ["EventLog"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM"]),
        .testTarget(name: "MachineTests", dependencies: ["Machine"]),
        .testTarget(name: "ChannelTests", dependencies: ["Channel"]),
        .testTarget(name: "FailoverTests", dependencies: ["Failover"]),
        .testTarget(name: "PairTests", dependencies: ["Pair", "Channel", "Machine"]),
    ]
)
